"""The study tools produce complete, well-formed results (not a particular outcome).

Fast tests check the study logic with fakes; the slow one runs the real CLI as a subprocess:
``tools/scaling_study.py`` on a 2-point sweep (then resumed). The conflict study: test_conflict_study.py."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mole_ds.answers import normalise_answer
from mole_ds.studies.scaling import ScalingConfig, finite_numbers, parse_field, plan, run_sweep
from mole_ds.studies.stats import mean_ci

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# -- fast: the pieces ---------------------------------------------------------------------------------------
def test_mean_ci_matches_t_interval():
    m, h, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3)
    assert h == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)  # t_{0.975,2} * sd / sqrt(n)
    m1, h1, n1 = mean_ci([0.5])
    assert m1 == 0.5 and math.isnan(h1) and n1 == 1
    assert mean_ci([])[2] == 0


def test_normalise_answer():
    assert normalise_answer("  The Red.") == "red"
    assert normalise_answer("two!") == normalise_answer("Two")
    assert normalise_answer("a circle") == "circle"


def test_scaling_plan_and_field_errors():
    points, skipped = plan(ScalingConfig(world=2, experts=[1, 2, 4], ep=[1, 2, 4], fields={"top_k": [1, 2]}))
    assert all(p["experts"] % p["ep"] == 0 and p["ep"] <= 2 and p["top_k"] <= p["experts"] for p in points)
    assert {s["skipped"].split(" ")[0] for s in skipped} >= {"ep_size", "experts", "top_k"}
    assert parse_field("top_k=1,2") == ("top_k", [1, 2])
    with pytest.raises(ValueError, match="not a probe field"):
        parse_field("nonsense=1")
    with pytest.raises(ValueError, match="expected NAME"):
        parse_field("top_k")


def _fake_record(world: int, args: dict) -> dict:
    if args["experts"] == 4:
        return {**args, "world_size": world, "error": "boom"}
    return {"experts": args["experts"], "ep_size": args["ep"], "world_size": world, "zero_stage": 3, "top_k": 1,
            "lora_rank": 8, "step_s": 0.1, "tokens_per_s": 100.0, "peak_memory_bytes_per_rank": 2**20,
            "expert_param_bytes_per_rank": 1000 * args["experts"] // args["ep"], "base_param_bytes_per_rank": 10,
            "optimizer_state_bytes_per_rank": 5, "all_to_all_bytes_per_step_per_rank": 0.0,
            "load_max_over_mean": 1.0, "routing_entropy": 0.5, "routing_entropy_max": 0.7, "experts_never_used": 0}


def test_sweep_records_failures_and_resumes(tmp_path):
    cfg = ScalingConfig(world=2, experts=[1, 2, 4], ep=[1, 2], out=str(tmp_path / "s"))
    calls = []

    def runner(world, args):
        calls.append(args["experts"])
        return _fake_record(world, args)

    res = run_sweep(cfg, runner=runner, log=lambda *_: None)
    assert len(res["rows"]) == 5 and len(calls) == 5  # (1,1) (2,1) (2,2) (4,1) (4,2); (1,2) skipped
    assert sum("error" in r for r in res["rows"]) == 2  # the failing points are recorded, the sweep went on
    assert (tmp_path / "s.png").is_file() and (tmp_path / "s.csv").is_file()
    calls.clear()
    res2 = run_sweep(cfg, runner=runner, log=lambda *_: None)
    assert calls == [] and len(res2["rows"]) == 5  # resumed: nothing re-run
    cfg.retry_failed = True
    run_sweep(cfg, runner=runner, log=lambda *_: None)
    assert calls == [4, 4]  # only the failed points again


# -- slow: the real tools -------------------------------------------------------------------------------------
def _run(cmd: list[str], log: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:3])} failed ({res.returncode}); log {log}:\n{(res.stdout + res.stderr)[-3000:]}")
    return res


@pytest.mark.slow
@pytest.mark.dist  # real DeepSpeed probe launches (mole_ds.train.sweep.run_point)
def test_scaling_study_tiny_sweep_and_resume(tmp_path):
    out = tmp_path / "sc"
    cmd = [sys.executable, str(ROOT / "tools/scaling_study.py"), "--world", "1", "--experts", "1", "2", "--ep", "1",
           "--fixed", "steps=2", "--fixed", "warmup=1", "--fixed", "stage=0", "--out", str(out)]
    _run(cmd, tmp_path / "sc1.log")
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["point"]["experts"] for r in res["rows"]] == [1, 2]
    for r in res["rows"]:
        assert "error" not in r, r
        assert finite_numbers(r) and r["step_s"] > 0 and r["expert_param_bytes_per_rank"] > 0
    assert res["rows"][1]["expert_param_bytes_per_rank"] > res["rows"][0]["expert_param_bytes_per_rank"]
    with open(out.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == 2
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    again = _run(cmd, tmp_path / "sc2.log")
    assert "2 already in" in again.stdout and "0 to run" in again.stdout
    assert len(json.loads(out.with_suffix(".json").read_text())["rows"]) == 2
