"""Every benchmark's --quick mode runs and writes its JSON and markdown table.

Peer libraries (zuko, torchdyn, flow_matching, normflows) are optional: the peers and
discrete-versus-continuous benchmarks also run with all of them made unimportable.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import pytest

from benchmarks import (
    assignments,
    checkpoint_cost,
    conditional,
    discrete_vs_continuous,
    distributed,
    divergence_forms,
    images,
    likelihood_finetune,
    peers,
    real_data,
    scaling,
    threads,
    train_toy,
    vae,
    work_precision,
)

BENCHMARKS = {
    "assignments": assignments.main,
    "conditional": conditional.main,
    "train_toy": train_toy.main,
    "divergence_forms": divergence_forms.main,
    "images_digits-images": images.main,
    "likelihood_finetune": likelihood_finetune.main,
    "discrete_vs_continuous": discrete_vs_continuous.main,
    "distributed": distributed.main,
    "peers": peers.main,
    "real_data": real_data.main,
    "scaling": scaling.main,
    "threads": threads.main,
    "checkpoint_cost": checkpoint_cost.main,
    "vae": vae.main,
    "work_precision": work_precision.main,
}
PEER_MODULES = ("zuko", "torchdyn", "flow_matching", "normflows")


def _read(out: Path, name: str) -> dict:
    assert (out / f"{name}.md").read_text().count("|") > 4
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["machine"]["cpu_count"] and payload["rows"]
    return payload


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_quick_mode_writes_results(name: str, tmp_path: Path) -> None:
    BENCHMARKS[name](["--quick", "--out", str(tmp_path)])
    payload = _read(tmp_path, name)
    if name == "images_digits-images":
        rows = {r["method"]: r for r in payload["rows"]}
        assert {"cnf-ml-multiscale", "cnf-otfm", "cnf-fm-unet", "gaussian-logit"} <= set(rows)
        assert all(r["test_bpd"] > 0 and r["test_bpd_2se"] > 0 for r in rows.values())
    if name == "conditional":
        rows = payload["rows"]
        assert {r["task"] for r in rows} == {"rotated8gaussians", "mixture", "two_moons"}
        assert all(r["true_nll"] is not None and r["two_se"] > 0 for r in rows if "excess_nll" in r)
        assert any(r["model"] == "unconditional" for r in payload["sampling"])
        assert all(r["ratio"] > 0 for r in payload["sampling"] if r["model"] == "cnf-ml")
    if name == "vae":
        rows = payload["rows"]
        assert [r["posterior"] for r in rows] == ["gaussian", "planar", "iaf", "cnf"]
        scored = [r for r in rows if "iwae" in r]  # iaf is skipped where zuko does not import (CI)
        assert {r["posterior"] for r in scored} >= {"gaussian", "planar", "cnf"}
        assert all(r["iwae"] >= r["elbo"] - 1.0 and r["k"] == 5 and r["iwae_two_se"] > 0 for r in scored)
        assert rows[0]["iwae_vs_gaussian"] == 0.0 and payload["k"] == 5
    if name == "scaling":
        assert payload["crossover"] and any(r["hutchinson_std"] is not None for r in payload["rows"])
    if name == "divergence_forms":
        solves = _read(tmp_path, "divergence_solves")["rows"]
        assert [r["nfe"] > 0 and r["speedup"] > 0 for r in solves] == [True, True]
    if name == "distributed":  # both objectives, 1 and 2 processes, the 2-process rows compared
        pairs = {(r["objective"], r["config"]) for r in payload["rows"]}
        configs = ("1x2", "2x1", "2x1 per-rank")
        assert pairs == {(o, c) for o in ("likelihood", "ot_flow_matching") for c in configs}
        per_rank = [r for r in payload["rows"] if r["config"] == "2x1 per-rank"]
        one = {r["objective"]: r for r in payload["rows"] if r["processes"] == 1}
        assert all(r["samples"] == one[r["objective"]]["samples"] for r in per_rank)  # same samples seen
        assert all(r["speedup"] > 0 and r["diff_se"] > 0 for r in payload["rows"] if r["processes"] == 2)
        assert payload["assignment"][0]["global_ms"] > 0
        ceilings = payload["ceilings"]
        assert {(c["objective"], c["global_batch"]) for c in ceilings} == {("likelihood", 64), ("flow_matching", 64)}
        assert all(c["ceiling"] == pytest.approx(c["one_process_ms"] / c["one_rank_share_ms"]) for c in ceilings)
    if name == "assignments":
        row = payload["rows"][0]
        assert (row["data"], row["load"]) == ("8gaussians", "quiet") and row["speedup"] > 0
    if name == "real_data":
        models = {r["model"]: r for r in payload["rows"]}
        assert {"gaussian", "gmm", "kde", "cnf-default", "cnf-ml", "cnf-rnode"} <= set(models)
        assert all(r["bits_per_dim"] > 0 for r in models.values())  # digits: discrete
        assert models["cnf-default"]["best_step"] >= 1 and models["cnf-ml"]["score_nfe"] > 0
        assert (tmp_path / "real_data.png").stat().st_size > 0
    if name == "likelihood_finetune":
        rows = {(r["divergence"], r["solver"]): r for r in payload["rows"]}
        assert set(rows) == {(d, s) for d in ("hutchinson", "exact") for s in ("dopri5:1e-3", "rk4:0.5")}
        assert all(r["steps"] >= 1 and math.isfinite(r["test_nll_after"]) for r in rows.values())
    if name == "work_precision":
        assert (tmp_path / "work_precision.png").stat().st_size > 0
        assert {(s["dim"], s["threads"]) for s in payload["segments"]} == {(2, 1), (3, 1)}
        assert all(h["speedup"] > 0 for h in payload["headline"] if h["speedup"] is not None)
        forms = {r["form"] for r in payload["segments"][0]["per_evaluation"]}
        assert {"matrix products (floor)", "cnf forward mode", "autograd VJPs (torchdyn)"} <= forms
        for segment in payload["segments"]:
            cnf_rows = [r for r in segment["sweep"] if r["library"] == "cnf"]
            assert cnf_rows and all(r["status"] == "ok" and r["error"] < 1 for r in cnf_rows)
    if name == "discrete_vs_continuous":
        assert (tmp_path / "discrete_vs_continuous.png").stat().st_size > 0
        assert {"planar", "cnf-exact", "cnf-hutchinson"} <= {r["model"] for r in payload["rows"]}


def test_benchmarks_run_without_peer_libraries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in PEER_MODULES:
        for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    peers.main(["--quick", "--skip-training", "--out", str(tmp_path)])
    payload = _read(tmp_path, "peers")
    for module in PEER_MODULES:
        assert payload["peers"][module].startswith("not importable")
    libraries = {r["library"]: r for r in payload["rows"] if r["section"] == "scoring"}
    assert libraries["cnf"]["seconds"] > 0
    assert "skipped: zuko does not import" in libraries["zuko"]["note"]
    discrete_vs_continuous.main(["--quick", "--out", str(tmp_path)])
    vae_rows = vae.main(["--quick", "--posteriors", "gaussian", "iaf", "--out", str(tmp_path)])["rows"]
    assert vae_rows[1]["stopped_by"] == "skipped: zuko does not import" and "iwae" in vae_rows[0]
    payload = _read(tmp_path, "discrete_vs_continuous")
    assert any("zuko is not installed" in note for note in payload["notes"])
    assert "maf" not in {r["model"] for r in payload["rows"]}
    payload = work_precision.main(["--quick", "--out", str(tmp_path / "wp")])
    for segment in payload["segments"]:
        assert all(status != "ok" for status in segment["peers"].values())
        assert {r["library"] for r in segment["sweep"]} == {"cnf"}
    assert all(h["speedup"] is None for h in payload["headline"])


def test_work_precision_abandons_a_solve_past_its_time_cap() -> None:
    """A solve that runs past the cap raises (the sweep reports it and moves on) instead of
    holding the benchmark for tens of minutes."""
    from benchmarks.work_precision import SolveTimeout, time_cap

    with pytest.raises(SolveTimeout, match="stopped after 0.05 s"), time_cap(0.05):
        while True:
            pass
    with time_cap(5.0):  # a block that ends in time is untouched, and the timer is cleared
        total = sum(range(1000))
    assert total == 499500


def test_real_data_default_ends_with_the_likelihood_phase_where_the_recipe_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cnf.recipes

    monkeypatch.setattr(cnf.recipes, "SMALL_TABLE_ROWS", 100)  # quick mode keeps 300 training rows
    # half of quick mode's 0.2 s: a tenth could pass within one flow-matching step on a busy machine
    monkeypatch.setattr(cnf.recipes, "TABLE_LIKELIHOOD_FINETUNE", 0.5)
    real_data.main(["--quick", "--datasets", "breast_cancer", "--models", "cnf-default", "cnf-default-fm-only", "--out", str(tmp_path)])
    models = {r["model"]: r for r in _read(tmp_path, "real_data")["rows"]}
    assert models["cnf-default"]["likelihood_steps"] >= 1
    assert models["cnf-default-fm-only"]["likelihood_steps"] is None
    assert models["cnf-default"]["steps"] > models["cnf-default"]["likelihood_steps"]


def test_likelihood_finetune_solver_specs() -> None:
    assert likelihood_finetune.training_solver("rk4:0.25") == {"method": "rk4", "step_size": 0.25}
    assert likelihood_finetune.training_solver("dopri5:1e-4") == {"method": "dopri5", "rtol": 1e-4, "atol": 1e-4, "step_size": None}
    for bad in ("rk4", "euler:0.1", "dopri5:-1", "dopri5:tight"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(bad))):
            likelihood_finetune.training_solver(bad)
