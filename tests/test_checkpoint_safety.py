"""Checkpoints that never run code, refuse damage, and survive kill -9; run folders that cannot be hurt."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cnf
from cnf import outputs
from cnf.checkpoint import (
    CheckpointError,
    convert_trusted_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from cnf.data import sample_toy
from cnf.outputs import RunLock, atomic_write_bytes, strict_json
from cnf.training import TrainingError, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parent.parent


def tiny_flow(seed: int = 0) -> cnf.CNF:
    torch.manual_seed(seed)
    field = cnf.MLPField(2, hidden=(8,)).double()
    return cnf.CNF(field, solver=cnf.Solver(method="rk4", step_size=0.25))


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return sample_toy("moons", 512, seed=0).double()


class RunsCode:
    """Unpickling this calls ``open(path, "w")``: it would create a file on load."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "created_by_unpickling"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "cnf-checkpoint", "version": 2, "config": None, "x": RunsCode(str(marker))}, evil)
    with pytest.raises(CheckpointError, match=r"evil.pt' refused: .*other than tensors.*convert-checkpoint"):
        read_checkpoint(evil)
    assert not marker.exists()
    from cnf.cli import main

    assert main(["evaluate", "--checkpoint", str(evil), "--data", "moons", "--n", "10"]) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()


def test_checkpoint_is_plain_and_weights_only_loadable(tmp_path: Path, data: torch.Tensor) -> None:
    train(tiny_flow(), data, iters=3, batch_size=32, out=tmp_path, progress=False)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert payload["version"] == 2 and len(payload["checksum"]["hex"]) == 64
    assert "history" not in payload  # the log lives in train_log.jsonl
    assert isinstance(payload["rng"]["torch"], torch.Tensor) and isinstance(payload["rng"]["python"], list)
    with pytest.raises(TypeError, match=r"checkpoint entry payload\['note'\] is a \w*Path"):
        save_checkpoint(tmp_path / "x.pt", tiny_flow(), note=tmp_path)


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_flipped_byte_is_refused(tmp_path: Path) -> None:
    flow = tiny_flow()
    path = tmp_path / "c.pt"
    save_checkpoint(path, flow)
    raw = path.read_bytes()
    tensor = max(flow.state_dict().values(), key=lambda v: v.numel())
    offset = raw.find(tensor.numpy().tobytes())
    assert offset > 0
    _flip(path, offset + 3)  # inside the tensor data
    with pytest.raises(CheckpointError, match=r"c.pt' is damaged: its bytes do not match the SHA-256"):
        read_checkpoint(path)
    for position in range(0, len(raw), 7):  # any byte at all
        path.write_bytes(raw)
        _flip(path, position)
        with pytest.raises(CheckpointError, match="c.pt"):
            read_checkpoint(path)


def test_versions_and_old_checkpoints(tmp_path: Path) -> None:
    flow = tiny_flow()
    newer = tmp_path / "newer.pt"
    torch.save({"format": "cnf-checkpoint", "version": 99, "state_dict": {}}, newer)
    with pytest.raises(CheckpointError, match="version 99, newer than this cnf reads"):
        read_checkpoint(newer)
    plain_v1 = tmp_path / "v1.pt"  # cnf 0.1 without numpy state: weights_only reads it
    torch.save({"format": "cnf-checkpoint", "version": 1, "config": flow.config(), "state_dict": flow.state_dict()}, plain_v1)
    restored, _ = load_checkpoint(plain_v1)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), flow.state_dict().values()))
    unchecked_v2 = tmp_path / "v2.pt"
    torch.save({"format": "cnf-checkpoint", "version": 2, "config": None, "state_dict": {}}, unchecked_v2)
    with pytest.raises(CheckpointError, match="v2.pt.* has no file checksum"):
        read_checkpoint(unchecked_v2)
    old = tmp_path / "old.pt"  # cnf 0.1 with the numpy RNG pickled
    torch.save(
        {
            "format": "cnf-checkpoint",
            "version": 1,
            "config": flow.config(),
            "state_dict": flow.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": __import__("random").getstate()},
            "history": [{"step": 1}],
        },
        old,
    )
    with pytest.raises(CheckpointError, match=r"refused.*cnf convert-checkpoint .*old.pt NEW.pt"):
        read_checkpoint(old)
    from cnf.cli import main

    assert main(["convert-checkpoint", str(old), str(tmp_path / "new.pt")]) == 2  # needs --trust
    assert main(["convert-checkpoint", str(old), str(tmp_path / "new.pt"), "--trust"]) == 0
    converted = read_checkpoint(tmp_path / "new.pt")
    assert converted["version"] == 2 and "history" not in converted
    assert convert_trusted_checkpoint(old, tmp_path / "new2.pt").is_file()


def test_writes_never_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "summary.json").symlink_to(outside)
    atomic_write_bytes(folder / "summary.json", b"{}")
    assert outside.read_text() == "precious" and not (folder / "summary.json").is_symlink()
    (folder / "log.jsonl").symlink_to(outside)
    with pytest.raises(OSError, match="through a symbolic link"):
        outputs.append_line(folder / "log.jsonl", "{}")
    assert outside.read_text() == "precious"


def test_cli_run_with_planted_symlinks_leaves_their_targets_untouched(tmp_path: Path) -> None:
    from cnf.cli import main

    out = tmp_path / "run"
    out.mkdir()
    targets = {}
    for name in ("train_log.jsonl", "summary.json", "checkpoint.pt", "best.pt"):
        target = tmp_path / f"target-{name}"
        target.write_text("do not touch")
        (out / name).symlink_to(target)
        targets[name] = target
    args = ["train", "--iters", "2", "--hidden", "8", "--n-train", "200", "--rtol", "1e-3", "--atol", "1e-3"]
    assert main([*args, "--out", str(out)]) == 2  # an existing run is never replaced silently
    assert main([*args, "--out", str(out), "--overwrite"]) == 0
    assert all(t.read_text() == "do not touch" for t in targets.values())
    assert not any((out / name).is_symlink() for name in targets)
    read_checkpoint(out / "checkpoint.pt")


def test_second_writer_is_refused_clearly(tmp_path: Path, data: torch.Tensor) -> None:
    with RunLock(tmp_path), pytest.raises(RuntimeError, match=rf"pid {os.getpid()}\) is writing to"):
        train(tiny_flow(), data, iters=2, out=tmp_path, progress=False)
    train(tiny_flow(), data, iters=2, out=tmp_path, progress=False)  # free again after release


WRITER = """
import sys, torch, cnf
from cnf.checkpoint import save_checkpoint
value, path, times = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
flow = cnf.CNF(cnf.MLPField(2, hidden=(64, 64)))
for p in flow.parameters():
    torch.nn.init.constant_(p, value)
for i in range(times):
    save_checkpoint(path, flow, step=i, writer=value)
"""


def test_concurrent_writers_never_leave_a_mixed_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "shared.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(v), str(path), "25"], env=env) for v in (1.0, 2.0)
    ]
    reads = 0
    try:
        while any(w.poll() is None for w in writers):
            if path.exists():
                payload = read_checkpoint(path)  # never a damaged or mixed file
                values = {float(v.flatten()[0]) for v in payload["state_dict"].values()}
                assert all(torch.all(v == payload["writer"]) for v in payload["state_dict"].values()), values
                reads += 1
    finally:
        for w in writers:
            w.wait(timeout=120)
    assert all(w.returncode == 0 for w in writers)
    assert reads > 0 and read_checkpoint(path)["step"] == 24
    assert not list(tmp_path.glob(".*.tmp"))


CHILD = """
import os, signal, sys, torch, cnf
import cnf.checkpoint, cnf.outputs, cnf.training
mode, out, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
original = cnf.checkpoint.atomic_write_bytes
original_save = cnf.training.save_checkpoint
current = {"step": None}

def save(path, flow, **extra):
    current["step"] = extra.get("step")
    return original_save(path, flow, **extra)

def write(path, data):
    step = current["step"]
    if mode == "during" and step == kill_step and path.name == "checkpoint.pt":
        tmp = cnf.outputs.temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(path, data)
    if mode == "after" and step == kill_step and path.name == "checkpoint.pt":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

cnf.checkpoint.atomic_write_bytes = write
cnf.training.save_checkpoint = save
torch.manual_seed(0)
data = cnf.data.sample_toy("moons", 512, seed=0).double()
flow = cnf.CNF(cnf.MLPField(2, hidden=(8,)).double(), solver=cnf.Solver(method="rk4", step_size=0.25))
cnf.train(flow, data, iters=30, batch_size=32, checkpoint_every=10, out=out, progress=False, threads=1)
"""


@pytest.mark.parametrize(("mode", "expected_step"), [("after", 20), ("during", 10)])
def test_kill_9_then_resume_matches_an_uninterrupted_run(
    mode: str, expected_step: int, tmp_path: Path, data: torch.Tensor, monkeypatch
) -> None:
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(out), "20"], env=env, timeout=120, capture_output=True
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    payload = read_checkpoint(out / "checkpoint.pt")  # the last complete checkpoint
    assert payload["step"] == expected_step
    reference = tiny_flow()
    train(reference, data, iters=30, batch_size=32, checkpoint_every=10, progress=False, threads=1)
    resumed = tiny_flow(seed=5)
    result = train(resumed, data, out=out, resume=out / "checkpoint.pt", progress=False, threads=1)
    assert result.step == 30
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    log = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sorted(set(log)) == list(range(1, 31))
    assert not list(out.glob(".*.tmp"))  # the half-written temporary was cleaned up


class SignalAt(torch.nn.Module):
    """An MLP field that sends SIGINT to this process at its n-th evaluation."""

    def __init__(self, field: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.inner, self.at, self.calls = field, at, 0
        self.dim = field.dim

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(t, x)


def signalling_flow(at: int) -> cnf.CNF:
    torch.manual_seed(0)
    field = SignalAt(cnf.MLPField(2, hidden=(8,)).double(), at=at)
    return cnf.CNF(field, solver=cnf.Solver(method="rk4", step_size=0.25))


def test_sigint_checkpoints_and_resume_continues(tmp_path: Path, data: torch.Tensor) -> None:
    handler = signal.getsignal(signal.SIGINT)
    flow = signalling_flow(at=16 * 7 + 3)  # 16 evaluations per solve: inside step 8's solve
    with pytest.raises(TrainingInterrupted, match=r"interrupted by SIGINT after step 7; checkpoint saved .*resume"):
        train(flow, data, iters=12, batch_size=32, checkpoint_every=100, out=tmp_path, progress=False)
    assert signal.getsignal(signal.SIGINT) is handler
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 7
    flow.field.at = -1
    result = train(flow, data, out=tmp_path, resume=tmp_path / "checkpoint.pt", progress=False)
    assert result.step == 12 and len(result.history) == 12
    reference = signalling_flow(at=-1)
    train(reference, data, iters=12, batch_size=32, progress=False)
    for a, b in zip(reference.parameters(), flow.parameters()):
        assert torch.equal(a, b)


class SlowField(torch.nn.Module):
    """A linear field whose evaluations turn slow after ``fast`` more calls, as a field blown up by
    a huge learning rate makes an adaptive solve crawl through thousands of tiny steps."""

    dim = 2

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2).double()
        self.fast, self.slow_calls = None, 0

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            self.fast -= 1
            if self.fast < 0:
                self.slow_calls += 1
                time.sleep(0.25)
        return self.linear(x) * 0.1


def test_time_limit_stops_a_stiff_solve(tmp_path: Path, data: torch.Tensor) -> None:
    field = SlowField()
    flow = cnf.CNF(field, solver=cnf.Solver(method="rk4", step_size=0.25))
    first = train(flow, data, iters=20, batch_size=16, out=tmp_path, progress=False)
    field.fast = 3 * 16  # three more quick steps (16 evaluations each), then the solve crawls
    with pytest.raises(TrainingError, match=r"step 24: the time limit ran out inside one step .*stiff.*checkpoint is"):
        train(flow, data, out=tmp_path, resume=tmp_path / "checkpoint.pt", iters=40, time_limit=first.seconds + 2)
    assert 0 < field.slow_calls < 16  # the solve was cut short
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 23  # the last good state


def test_full_disk_and_bad_out_folders_fail_clearly(tmp_path: Path, data: torch.Tensor, monkeypatch) -> None:
    from cnf.cli import main

    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file' is a file, not a folder"):
        train(tiny_flow(), data, iters=1, out=file_out)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        if not os.access(readonly, os.W_OK):  # root can write anywhere
            with pytest.raises(PermissionError, match="readonly' is not writable"):
                train(tiny_flow(), data, iters=1, out=readonly)
    finally:
        readonly.chmod(0o755)
    train(tiny_flow(), data, iters=2, out=tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_write_all", full)
    with pytest.raises(OSError, match="no space left on the device while writing .*train_log.jsonl"):
        train(tiny_flow(), data, out=tmp_path / "run", resume=tmp_path / "run" / "checkpoint.pt", iters=4)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    args = ["train", "--iters", "1", "--hidden", "8", "--n-train", "100"]
    assert main([*args, "--out", str(tmp_path / "other")]) == 2
    monkeypatch.undo()
    assert main([*args, "--out", str(file_out)]) == 2
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_strict_json() -> None:
    assert strict_json({"nll": float("inf"), "x": [1.0, float("nan")]}) == '{"nll": null, "x": [1.0, null]}'


def test_sigterm_to_cnf_train_leaves_a_resumable_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cnf.cli", "train", "--out", str(out), "--time-limit", "100"]
    command += ["--hidden", "8", "--n-train", "300", "--rtol", "1e-3", "--atol", "1e-3", "--iters", "100000"]
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 100
    while not (log.is_file() and log.read_text().count("\n") >= 5) and time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err.decode()
    assert "interrupted by SIGTERM" in err.decode() and "cnf train --resume" in err.decode()
    step = read_checkpoint(out / "checkpoint.pt")["step"]
    assert step >= 5
    from cnf.cli import main

    assert main(["train", "--resume", str(out), "--iters", str(step + 2)]) == 0
    assert read_checkpoint(out / "checkpoint.pt")["step"] == step + 2
