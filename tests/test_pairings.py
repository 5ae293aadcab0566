"""OT flow matching's assignments solved ahead (cnf.pairings), in one process (float64).

The 2-process form is checked in tests/test_distributed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cnf
from cnf.distributed import Cluster
from cnf.losses import DEFAULT_SIGMA_MIN, conditional_path, ot_flow_matching_loss, ot_pairing
from cnf.pairings import LOSS_STREAM, ROW_STREAM, PairingsAhead, can_pair_ahead, step_generator
from cnf.transforms import Standardize, TransformedFlow

SEED, BATCH = 5, 24


def data() -> torch.Tensor:
    return torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1


def small_flow() -> cnf.CNF:
    torch.manual_seed(0)
    return cnf.CNF(cnf.MLPField(2, hidden=(16, 16)).double(), solver=cnf.Solver(method="rk4", step_size=0.25)).double()


def assignment(x0: torch.Tensor, x1: torch.Tensor, ot_batch_size: int | None = None) -> torch.Tensor:
    """x0 reordered to x1 by one exact assignment on this pair of draws alone (within groups of
    ``ot_batch_size`` rows). (Minibatch rows are drawn with replacement, so repeated x1 rows make
    ties; the same solver on the same cost matrix breaks them the same way.)"""
    return x0[ot_pairing(x0, x1, ot_batch_size)]


def expected_step(step: int, ot_batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch, paired x0 and times, drawn here from the documented seeds."""
    rows = torch.randint(0, 200, (BATCH,), generator=step_generator(SEED, 0, step, ROW_STREAM))
    x1 = data()[rows]
    loss_generator = step_generator(SEED, 0, step, LOSS_STREAM)
    x0 = torch.randn(BATCH, 2, generator=loss_generator, dtype=torch.float64)
    t = torch.rand(BATCH, generator=loss_generator, dtype=torch.float64)
    return x1, assignment(x0, x1, ot_batch_size), t


@pytest.mark.parametrize(("threads", "ot_batch_size"), [(1, None), (2, None), (3, None), (1, 10), (2, 8)])
def test_each_step_is_paired_by_its_own_assignment(threads: int, ot_batch_size: int | None) -> None:
    """Whatever the block size (solved in the training thread, or ahead in 2 or 3 threads), step s
    gets the x0 that one exact assignment on step s's own draws gives (within groups of
    ``ot_batch_size`` rows when set), and the loss equals the loss on them."""
    flow = small_flow()
    ahead = PairingsAhead(flow, data(), None, BATCH, SEED, Cluster(), threads, ot_batch_size)
    for step in range(7):
        x1, x0, t = expected_step(step, ot_batch_size)
        assert torch.equal(ahead.rows(step), torch.randint(0, 200, (BATCH,), generator=step_generator(SEED, 0, step, ROW_STREAM)))
        loss = ot_flow_matching_loss(flow, x1, **ahead.loss_kwargs(step))
        xt, ut = conditional_path(x0, x1, t, DEFAULT_SIGMA_MIN)
        expected = (flow.field(t, xt) - ut).pow(2).sum(dim=1).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
        # the pairing is not the identity: it moved points (so the comparison above can fail)
        unpaired = torch.randn(BATCH, 2, generator=step_generator(SEED, 0, step, LOSS_STREAM), dtype=torch.float64)
        assert not torch.equal(x0, unpaired)


def test_preprocessed_flow_pairs_in_the_preprocessed_space() -> None:
    """A TransformedFlow is matched after standardisation: the pairing made ahead uses the same
    standardised x1 as the loss."""
    inner = small_flow()
    flow = TransformedFlow(inner, Standardize.fit(data()))
    ahead = PairingsAhead(flow, data(), None, BATCH, SEED, Cluster(), 2)
    x1, _, t = expected_step(0)
    z1, _ = flow.preprocess(x1)
    x0 = torch.randn(BATCH, 2, generator=step_generator(SEED, 0, 0, LOSS_STREAM), dtype=torch.float64)
    x0 = assignment(x0, z1)
    xt, ut = conditional_path(x0, z1, t, DEFAULT_SIGMA_MIN)
    expected = (inner.field(t, xt) - ut).pow(2).sum(dim=1).mean()
    assert ot_flow_matching_loss(flow, x1, **ahead.loss_kwargs(0)).item() == pytest.approx(expected.item(), rel=1e-12)


def test_a_pairing_for_other_draws_is_refused() -> None:
    ahead = PairingsAhead(small_flow(), data(), None, BATCH, SEED, Cluster(), 2)
    with pytest.raises(RuntimeError, match="the pairing of step 0 has shape"):
        ahead.paired(0, torch.zeros(BATCH + 1, 2, dtype=torch.float64), torch.zeros(BATCH + 1, 2, dtype=torch.float64))


def test_only_a_standard_normal_base_is_paired_ahead() -> None:
    field = cnf.MLPField(2, hidden=(8,))
    assert can_pair_ahead(cnf.CNF(field))
    base = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1)
    assert not can_pair_ahead(cnf.CNF(field, base=base))


def train_ot(
    threads: int, iters: int, out: Path | None = None, resume: Path | None = None, ot_batch_size: int | None = None
) -> cnf.CNF:
    flow = small_flow()
    cnf.train(
        flow, data(), objective="ot_flow_matching", iters=iters, batch_size=BATCH, seed=SEED, threads=threads,
        lr=1e-2, out=out, resume=resume, checkpoint_every=1, progress=False, ot_batch_size=ot_batch_size,
    )  # fmt: skip
    return flow


def test_training_with_ot_groups_does_not_depend_on_threads_and_differs_from_whole_batch_ot() -> None:
    one, two = train_ot(threads=1, iters=4, ot_batch_size=8), train_ot(threads=2, iters=4, ot_batch_size=8)
    whole = train_ot(threads=1, iters=4)
    for p1, p2 in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-12)
    assert any(not torch.allclose(p1, p0) for p1, p0 in zip(one.parameters(), whole.parameters()))


def test_training_does_not_depend_on_threads_and_resumes_exactly(tmp_path: Path) -> None:
    """Each step's draws come from its own seeds, so 1 or 2 threads (blocks of 1 or 2 steps) train
    the same model, and a run stopped after an odd step (inside a block of 2) and resumed ends
    where the uninterrupted run ends."""
    one = train_ot(threads=1, iters=5)
    two = train_ot(threads=2, iters=5)
    train_ot(threads=2, iters=3, out=tmp_path / "run")
    resumed = train_ot(threads=2, iters=5, resume=tmp_path / "run" / "checkpoint.pt")
    moved = False
    for p1, p2, p3, p0 in zip(one.parameters(), two.parameters(), resumed.parameters(), small_flow().parameters()):
        torch.testing.assert_close(p2, p1, rtol=0, atol=1e-12)
        torch.testing.assert_close(p3, p1, rtol=0, atol=1e-12)
        moved = moved or not torch.allclose(p1, p0)
    assert moved
