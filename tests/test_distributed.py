"""Devices and multi-process training (cnf.distributed): 2 CPU processes with gloo.

The processes are started from here with a timeout, so a hang fails the test instead of blocking
the suite; :mod:`tests.distributed_worker` runs every 2-process scenario in one process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import cnf
from cnf import distributed
from cnf.checkpoint import read_checkpoint
from cnf.cli import without_option
from cnf.flow import base_sample
from cnf.losses import DEFAULT_SIGMA_MIN, conditional_path, ot_pairing, ot_pairing_within_contexts
from cnf.pairings import LOSS_STREAM, ROW_STREAM, step_generator
from cnf.transforms import Standardize

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
HANG_GUARD = 180  # seconds: far above the few seconds these runs take on a busy 2-core machine

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def wait_or_kill(processes: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of ``processes``; past ``timeout`` they are killed and the test fails (a hang)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"processes still running after {timeout} s: a hang")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run tests/distributed_worker.py on 2 processes once; return its output folder."""
    out = tmp_path_factory.mktemp("two_ranks")
    port = str(free_port())
    processes, logs = [], []
    for rank in range(2):
        env = child_env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
        )  # fmt: skip
        logs.append((out / f"rank{rank}.log").open("w"))
        processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out)], env=env, stdout=logs[-1], stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
    try:
        codes = wait_or_kill(processes, HANG_GUARD)
    finally:
        for log in logs:
            log.close()
    text = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], f"worker exit codes {codes}:\n{text}"
    return out


def rank_output(folder: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = torch.load(folder / f"rank{rank}.pt", weights_only=True)
    return tensors, json.loads((folder / f"rank{rank}.json").read_text())


def union_batch_draws(objective: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What ranks 0 and 1 drew in their first step (their shards, their seeds), concatenated."""
    from distributed_worker import BATCH, SEED, data

    batches, x0s, ts = [], [], []
    for rank in range(2):
        cluster = distributed.Cluster(rank=rank, world_size=2)
        shard = cluster.shard(data())
        if objective == "ot_flow_matching":  # each step draws from its own seeds (cnf.pairings)
            rows_generator = step_generator(SEED, rank, 0, ROW_STREAM)
            loss_generator = step_generator(SEED, rank, 0, LOSS_STREAM)
        else:  # the rank's global stream
            torch.manual_seed(cluster.seed(SEED))
            rows_generator = loss_generator = None
        batches.append(shard[torch.randint(0, shard.shape[0], (BATCH,), generator=rows_generator)])
        if objective != "likelihood":  # the loss then draws x0 ~ N(0, I) and t ~ U(0, 1)
            x0s.append(torch.randn(BATCH, 2, dtype=torch.float64, generator=loss_generator))
            ts.append(torch.rand(BATCH, dtype=torch.float64, generator=loss_generator))
    if objective == "likelihood":
        return torch.cat(batches), None, None
    batch, x0 = torch.cat(batches), torch.cat(x0s)
    if objective == "ot_flow_matching":  # one assignment on the union batch
        x0 = x0[ot_pairing(x0, batch)]
    return batch, x0, torch.cat(ts)


@needs_gloo
@pytest.mark.parametrize("objective", ["likelihood", "flow_matching", "ot_flow_matching"])
def test_one_step_on_two_processes_equals_one_process_on_the_union_batch(two_ranks, objective) -> None:
    """DDP's averaged gradient on 2 ranks x 4 points is the gradient of the 8-point union batch's
    loss (computed here independently, in one process), and so is the Adam step; with OT flow
    matching the union's pairs come from one assignment on the 8 points. The solver is
    fixed-step rk4: an adaptive solver picks its steps from the whole batch, so halves would
    differ from the union by about the tolerance, not by rounding."""
    from distributed_worker import tiny_flow

    rank0, _ = rank_output(two_ranks, 0)
    rank1, _ = rank_output(two_ranks, 1)
    flow = tiny_flow()
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    batch, x0, t = union_batch_draws(objective)
    if objective == "likelihood":
        loss = -flow.log_prob(batch).mean()
    else:
        xt, ut = conditional_path(x0, batch, t, DEFAULT_SIGMA_MIN)
        loss = (flow.field(t, xt) - ut).pow(2).sum(dim=1).mean()
    loss.backward()
    optimizer.step()
    assert rank0[f"{objective}.loss"].item() == pytest.approx(loss.item(), abs=1e-10)
    for name, param in flow.named_parameters():
        for ranked in (rank0, rank1):  # both ranks hold the same, union-batch, state
            torch.testing.assert_close(ranked[f"{objective}.grad.{name}"], param.grad, rtol=0, atol=1e-10)
            torch.testing.assert_close(ranked[f"{objective}.param.{name}"], param.detach(), rtol=0, atol=1e-10)
    assert any(p.grad.abs().max() > 1e-3 for p in flow.parameters())  # a real gradient was compared


@needs_gloo
def test_global_ot_pairs_as_one_process_with_the_whole_batch(two_ranks) -> None:
    """Each rank's x1 rows get exactly the x0 rows that one assignment on the 12-point global
    batch gives them, which differs from pairing within each rank's 6 points."""
    parts = [rank_output(two_ranks, r)[0] for r in range(2)]
    x0 = torch.cat([p["ot.x0"] for p in parts])
    x1 = torch.cat([p["ot.x1"] for p in parts])
    expected = x0[ot_pairing(x0, x1)]
    paired = torch.cat([p["ot.paired"] for p in parts])
    torch.testing.assert_close(paired, expected, rtol=0, atol=0)
    local = torch.cat([p["ot.x0"][ot_pairing(p["ot.x0"], p["ot.x1"])] for p in parts])
    assert not torch.equal(local, expected)  # the ranks' data differ (shifted by 3), so pairing crosses ranks


@needs_gloo
def test_pairings_ahead_pair_each_step_on_the_global_batch(two_ranks) -> None:
    """Solved ahead, in blocks of 2 steps with one assignment per rank, every step's pairing is
    still the one assignment on that step's 6-point global batch."""
    parts = [rank_output(two_ranks, r)[0] for r in range(2)]
    crossed = False
    for step in range(4):
        x0 = torch.cat([p[f"ahead{step}.x0"] for p in parts])
        x1 = torch.cat([p[f"ahead{step}.x1"] for p in parts])
        expected = x0[ot_pairing(x0, x1)]
        torch.testing.assert_close(torch.cat([p[f"ahead{step}.paired"] for p in parts]), expected, rtol=0, atol=0)
        local = torch.cat([p[f"ahead{step}.x0"][ot_pairing(p[f"ahead{step}.x0"], p[f"ahead{step}.x1"])] for p in parts])
        crossed = crossed or not torch.equal(local, expected)
    assert crossed  # the ranks' data differ (shifted by 3), so pairing crosses ranks
    for step in range(2):  # per-point contexts: one assignment per label on the global batch
        x0, x1, c = (torch.cat([p[f"ctx{step}.{name}"] for p in parts]) for name in ("x0", "x1", "c"))
        expected = x0[ot_pairing_within_contexts(x0, x1, c)]
        torch.testing.assert_close(torch.cat([p[f"ctx{step}.paired"] for p in parts]), expected, rtol=0, atol=0)
        assert not torch.equal(expected, x0[ot_pairing(x0, x1)])  # the labels constrained the pairing


@needs_gloo
def test_checkpoint_of_two_processes_resumes_on_one_with_its_optimiser(two_ranks) -> None:
    from distributed_worker import BATCH, data, tiny_flow

    checkpoint = two_ranks / "run" / "checkpoint.pt"
    payload = read_checkpoint(checkpoint)
    assert payload["world_size"] == 2 and payload["step"] == 2
    assert not list((two_ranks / "run").glob("*.tmp"))  # rank 0 alone wrote, atomically
    log = [json.loads(line) for line in (two_ranks / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    flow = tiny_flow()
    result = cnf.train(flow, data(), iters=3, batch_size=BATCH, resume=checkpoint, progress=False)
    assert result.step == 3 and [r["step"] for r in result.history] == [1, 2, 3]
    # The optimiser state came along: Adam's step count and moments continue from the checkpoint.
    saved = payload["optimizer"]["state"][0]
    optimizer = torch.optim.Adam(tiny_flow().parameters(), lr=1e-3)
    optimizer.load_state_dict(payload["optimizer"])
    assert float(saved["step"]) == 2
    assert torch.count_nonzero(saved["exp_avg_sq"]) > 0


@needs_gloo
def test_nan_on_one_rank_stops_every_rank_naming_it(two_ranks) -> None:
    messages = [rank_output(two_ranks, r)[1]["nan"] for r in range(2)]
    assert "rank 1 of 2" in messages[0] and "non-finite loss" in messages[0]
    assert "rank 1 of 2" in messages[1] and "loss became nan" in messages[1]
    assert all("training stopped at step 3" in m for m in messages)


@needs_gloo
def test_time_limit_is_agreed_so_ranks_stop_at_the_same_step(two_ranks) -> None:
    infos = [rank_output(two_ranks, r)[1] for r in range(2)]
    assert infos[0]["time_limit_stopped_by"] == infos[1]["time_limit_stopped_by"] == "time_limit"
    assert infos[0]["time_limit_step"] == infos[1]["time_limit_step"] > 0
    # one rank's limit alone, with a loss that gathers (OT flow matching): both stop together
    assert infos[0]["ot_time_limit_stopped_by"] == infos[1]["ot_time_limit_stopped_by"] == "time_limit"
    assert infos[0]["ot_time_limit_step"] == infos[1]["ot_time_limit_step"] == 0


def worker_pid(parent: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among ``parent``'s descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    stack = list(children.get(parent, []))
    while stack:
        pid = stack.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"\0".join(environ):
            return pid
        stack.extend(children.get(pid, []))
    return None


@needs_gloo
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's pid through Linux /proc")
def test_killed_rank_ends_the_job_naming_it_and_keeps_the_checkpoint(tmp_path) -> None:
    """`cnf train --nproc 2`; rank 1 is killed (SIGKILL) after the first checkpoint: torchrun stops
    rank 0, the command fails naming rank 1 and the signal, and the checkpoint still loads."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "cnf", "train", "--nproc", "2", "--data", "moons", "--objective", "flow_matching",
        "--hidden", "8", "--n-train", "512", "--batch-size", "32", "--iters", "1000000", "--time-limit", "150",
        "--val-every", "1000", "--out", str(out),
    ]  # fmt: skip
    job = subprocess.Popen(
        command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.monotonic() + HANG_GUARD
    victim = None
    while time.monotonic() < deadline and job.poll() is None:
        if (out / "checkpoint.pt").is_file():
            victim = worker_pid(job.pid, 1)
            if victim is not None:
                break
        time.sleep(0.2)
    assert victim is not None, f"no checkpoint or no rank 1 (exit {job.poll()})"
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    code = wait_or_kill([job], HANG_GUARD)[0]
    print(f"the job ended {time.monotonic() - killed:.2f} s after rank 1 was killed")  # -s shows it
    output = job.stdout.read()
    job.stdout.close()
    assert code != 0
    assert "rank 1 was killed by SIGKILL" in output, output[-3000:]  # first, or after rank 0 lost it
    flow, payload = cnf.load_checkpoint(out / "checkpoint.pt")
    assert payload["step"] >= 100 and payload["world_size"] == 2


# -- devices -------------------------------------------------------------------------------------
def test_resolve_device_spellings_and_errors() -> None:
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device must be one of .*'gpu'"):
        distributed.resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:1' needs CUDA"):
            distributed.resolve_device("cuda:1")


def test_float64_on_mps_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="MPS.*float64"):
        distributed.check_device_dtype(torch.device("mps"), torch.float64)
    distributed.check_device_dtype(torch.device("mps"), torch.float32)  # fine
    distributed.check_device_dtype(torch.device("cpu"), torch.float64)


class MetaSpy(TorchDispatchMode):
    """Records each op with a 'meta' tensor among its inputs or outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = tree_leaves((args, kwargs, out))
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in leaves):
            self.ops.append(str(func))
        return out


def test_meta_spy_sees_a_tensor_that_ignores_the_device() -> None:
    data = torch.randn(5, 2)
    with torch.device("meta"), MetaSpy() as spy:
        data[torch.randint(0, 5, (3,))]  # an index made on the default device
    assert spy.ops


@pytest.mark.parametrize("objective", ["likelihood", "ot_flow_matching"])
def test_device_argument_is_honoured_everywhere(objective, tmp_path) -> None:
    """With torch's default device set to 'meta', any tensor made without following the flow's
    device lands on 'meta', and :class:`MetaSpy` sees every op that touches one: so a training run,
    validation, sampling and scoring passing here create every tensor on the device of the flow
    (data, base, probes, time grids, preprocessing, OT pairing)."""
    field = cnf.MLPField(2, hidden=(8,)).double()
    flow = cnf.TransformedFlow(
        cnf.CNF(field, divergence="hutchinson", solver=cnf.Solver(method="rk4", step_size=0.5)),
        Standardize.fit(torch.randn(64, 2) * 3 + 1),
    ).double()
    data = torch.randn(64, 2, dtype=torch.float64)
    with torch.device("meta"), MetaSpy() as spy:
        result = cnf.train(
            flow, data, data[:16], iters=2, batch_size=8, val_every=1, objective=objective, device="cpu",
            out=tmp_path, progress=False,
        )  # fmt: skip
    restored, _ = cnf.load_checkpoint(result.checkpoint, device="cpu")  # (modules are built on the default)
    restored.double()
    with torch.device("meta"), spy:
        samples = restored.sample(4, generator=torch.Generator().manual_seed(0))
        log_prob = restored.log_prob(samples)
    assert not spy.ops, f"tensors that did not follow the flow's device, made by {sorted(set(spy.ops))}"
    assert samples.device.type == "cpu" and samples.dtype == torch.float64
    assert torch.isfinite(log_prob).all() and result.val_nll is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_training_on_cuda_and_loading_the_checkpoint_on_cpu(tmp_path) -> None:
    flow = cnf.CNF(cnf.MLPField(2, hidden=(16,)), solver=cnf.Solver(method="rk4", step_size=0.25))
    data = torch.randn(256, 2)
    result = cnf.train(flow, data, data[:64], iters=3, batch_size=32, device="cuda", out=tmp_path, progress=False)
    assert next(flow.parameters()).device.type == "cuda"
    restored, _ = cnf.load_checkpoint(result.checkpoint, device="cpu")
    torch.testing.assert_close(restored.log_prob(data[:8]), flow.log_prob(data[:8].cuda()).cpu(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()), reason="no Apple MPS device"
)
def test_float64_flow_on_mps_is_refused() -> None:
    flow = cnf.CNF(cnf.MLPField(2, hidden=(8,)).double())
    with pytest.raises(ValueError, match="float64"):
        cnf.train(flow, torch.randn(16, 2, dtype=torch.float64), iters=1, device="mps", progress=False)


def test_launch_drops_its_own_option_for_the_ranks() -> None:
    argv = ["train", "--nproc", "2", "--data", "moons", "--nproc=3", "--iters", "5"]
    assert without_option(argv, "--nproc") == ["train", "--data", "moons", "--iters", "5"]


def test_base_sample_follows_the_flow_dtype() -> None:
    flow = cnf.CNF(cnf.MLPField(2, hidden=(8,))).double()
    assert base_sample(flow.base, 3).dtype == torch.float64


def test_threads_split_the_cores_between_processes() -> None:
    assert distributed.threads_per_process(cores=8, local_processes=2) == 4
    assert distributed.threads_per_process(cores=2, local_processes=4) == 1
    assert distributed.Cluster().seed(7) == 7  # one process draws what it always drew
    seeds = {distributed.Cluster(rank=r, world_size=2).seed(7) for r in range(2)}
    assert len(seeds) == 2
