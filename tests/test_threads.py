"""cnf.threads.torch_threads: the count inside the block, the previous one back after it."""

import pytest
import torch

from cnf.threads import torch_threads


def test_torch_threads_sets_and_restores_even_on_error() -> None:
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with pytest.raises(RuntimeError, match="inside"), torch_threads(target) as count:
        assert count == target and torch.get_num_threads() == target
        raise RuntimeError("inside")
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_torch_threads_refuses_a_bad_count(bad: object) -> None:
    message = f"threads must be a positive int, got {bad!r}"
    with pytest.raises(ValueError, match=message), torch_threads(bad):  # type: ignore[arg-type]
        pass
