"""The planner's fit verdict against a measured run: 2 real DeepSpeed CPU ranks (ZeRO-3, bf16 or fp32) train a
small embedded LLaVA (4 layers x 256, 8 x 256 tokens per rank) with and without activation checkpointing
(tools/bench_plan.py --quick); the predicted peak per rank (the cpu-gloo-here preset: tensors + the stack's
measured runtime) must be within 20% of the measured peak resident set, and the verdict for a budget of the
measured peak must agree with the measurement. glibc is told to return freed memory (``--malloc-returns``), so
the resident set follows the live tensors."""
from __future__ import annotations

import json

import pytest

from tests.support import PY, ROOT, run

pytestmark = pytest.mark.dist


def test_planner_peak_against_measured_run(tmp_path):
    out = tmp_path / "plan.json"
    run([PY, str(ROOT / "tools/bench_plan.py"), "--quick", "--tiny-layers", "4", "--tiny-hidden", "256",
         "--max-length", "256", "--micro-batch", "8", "--steps", "2", "--malloc-returns", "--use-preset-runtime",
         "--out-json", str(out)], tmp_path / "bench_plan.log", timeout=300)
    results = json.loads(out.read_text())["results"]
    assert {r["ckpt"] for r in results} == {False, True}
    for r in results:
        ratio = r["pred_peak_total"] / r["meas_peak_total"]
        assert 0.8 <= ratio <= 1.2, (r["ckpt"], r["pred_peak_total"], r["meas_peak_total"])
    off, on = sorted(results, key=lambda r: r["ckpt"])
    # Checkpointing lowers both the predicted and the measured activation memory.
    assert on["pred_transient"] < off["pred_transient"]
