"""Torch's intra-op thread count for a block of work, restored afterwards.

On shared cores a team of torch threads waits for its slowest member, so the examples and the
training loop pin a count (see README, "Threads") and give the previous one back when done.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(count)``; the previous count comes back after."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"threads must be a positive int, got {count!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(previous)
