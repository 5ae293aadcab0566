"""One rank of the 2-process checks in tests/test_distributed.py (started there with gloo's env).

``python tests/distributed_worker.py OUT``: joins the process group from RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT, runs every scenario in turn and writes ``OUT/rank<r>.pt`` (tensors)
and ``OUT/rank<r>.json`` (messages, step counts). Tiny float64 models, so all of it takes seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

import cnf
from cnf import distributed
from cnf.pairings import PairingsAhead

BATCH = 4  # per rank
SEED = 3


def data() -> torch.Tensor:
    return torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def tiny_flow(solver: cnf.Solver | None = None) -> cnf.CNF:
    torch.manual_seed(0)
    field = cnf.MLPField(2, hidden=(8, 8)).double()
    return cnf.CNF(field, solver=solver or cnf.Solver(method="rk4", step_size=0.25)).double()


def one_step(objective: str) -> dict[str, torch.Tensor]:
    flow = tiny_flow()
    result = cnf.train(flow, data(), iters=1, batch_size=BATCH, lr=1e-2, seed=SEED, objective=objective, progress=False)
    out = {f"param.{k}": v.detach().clone() for k, v in flow.named_parameters()}
    out.update({f"grad.{k}": v.grad.detach().clone() for k, v in flow.named_parameters()})
    out["loss"] = torch.tensor(result.history[0]["loss"], dtype=torch.float64)
    return out


class PoisonedField(nn.Module):
    """An MLP field that returns NaN from its ``poison_from``-th call on (on one rank)."""

    def __init__(self, poison_from: int | None) -> None:
        super().__init__()
        self.inner = cnf.MLPField(2, hidden=(8,))
        self.dim = 2
        self.calls = 0
        self.poison_from = poison_from

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(t, x)
        if self.poison_from is not None and self.calls >= self.poison_from:
            out = out * float("nan")
        return out


def main(out: Path) -> None:
    cluster = distributed.init("cpu", timeout=60)
    torch.set_num_threads(1)
    rank = cluster.rank
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, object] = {"world_size": cluster.world_size}

    for objective in ("likelihood", "flow_matching", "ot_flow_matching"):
        tensors.update({f"{objective}.{k}": v for k, v in one_step(objective).items()})

    # Global OT: this rank's draws and the x0 rows one global assignment gives it.
    generator = torch.Generator().manual_seed(100 + rank)
    x0 = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    x1 = torch.randn(6, 2, generator=generator, dtype=torch.float64) + 3.0 * rank
    tensors.update({"ot.x0": x0, "ot.x1": x1, "ot.paired": distributed.global_ot_pairing(x0, x1)})

    # Pairings solved ahead: 4 steps (2 blocks of 2, one step per rank each) of 3 points per rank.
    ahead = PairingsAhead(tiny_flow(), cluster.shard(data()) + 3.0 * rank, None, 3, SEED, cluster, threads=1)
    for step in range(4):
        x0, x1, _ = ahead.draws(step)
        tensors.update({f"ahead{step}.x0": x0, f"ahead{step}.x1": x1, f"ahead{step}.paired": ahead.paired(step, x0, x1)})
    # ... and within groups of equal context (labels 0 / 1), as a conditional flow pairs.
    labels = cluster.shard((torch.arange(16) % 2).double().unsqueeze(1))
    ahead = PairingsAhead(tiny_flow(), cluster.shard(data()) + 3.0 * rank, labels, 4, SEED, cluster, threads=1)
    for step in range(2):
        x0, x1, context = ahead.draws(step)
        paired = ahead.paired(step, x0, x1, context)
        tensors.update({f"ctx{step}.x0": x0, f"ctx{step}.x1": x1, f"ctx{step}.c": context, f"ctx{step}.paired": paired})

    # Two steps on 2 processes, checkpointed by rank 0, resumed on 1 process by the test.
    run = out / "run"
    cnf.train(tiny_flow(), data(), iters=2, batch_size=BATCH, seed=SEED, checkpoint_every=1, out=run, progress=False)

    # NaN on rank 1 at its 3rd field call: every rank stops at the same step, naming rank 1.
    flow = cnf.CNF(PoisonedField(3 if rank == 1 else None)).double()
    try:
        cnf.train(flow, data(), iters=10, batch_size=BATCH, objective="flow_matching", progress=False)
        info["nan"] = "no error"
    except cnf.TrainingError as error:
        info["nan"] = str(error)

    # A time limit reached at slightly different moments ends every rank at the same step.
    result = cnf.train(
        tiny_flow(), data(), iters=10**9, time_limit=0.5, batch_size=BATCH, objective="flow_matching", progress=False
    )
    info["time_limit_step"] = result.step
    info["time_limit_stopped_by"] = result.stopped_by

    # OT flow matching gathers inside its loss: rank 0 alone reaching its time limit must not leave
    # rank 1 waiting in that gather (every rank computes the loss, then they agree to stop). Rank 0's
    # limit has passed at step 0, the first step of a block of pairings, where rank 1's loss gathers.
    result = cnf.train(
        tiny_flow(), data(), iters=10**9, time_limit=1e-9 if rank == 0 else 10**6, batch_size=BATCH,
        objective="ot_flow_matching", progress=False,
    )  # fmt: skip
    info["ot_time_limit_step"] = result.step
    info["ot_time_limit_stopped_by"] = result.stopped_by

    torch.save(tensors, out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
