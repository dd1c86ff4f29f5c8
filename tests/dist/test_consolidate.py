"""Consolidation without ranks (mole_ds.consolidate, tools/consolidate.py) on checkpoints real DeepSpeed ranks wrote.

One 2-rank launch per layout (ZeRO-3 ep 2, ZeRO-3 ep 1, ZeRO-2 ep 2; tests/dist/worker.py, checkpoint at step 2
of 4 at a constant learning rate; the session's runs that test_elastic and test_expert_parallel make of the same
configurations): the file rebuilt from DeepSpeed's per-rank files alone is tensor for tensor the mole.safetensors the
ranks gathered and wrote into the tag, and the rebuilt Adam moments agree across layouts (same global batches).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mole_ds.checkpoint import CONSOLIDATED_NAME, consolidate, read_consolidated, read_full_state, resolve_tag
from mole_ds.checkpoint import MARKER as CHECKPOINT_MARKER
from tests.support import ROOT

pytestmark = pytest.mark.dist

LAYOUTS = {"z3_ep2": ("3", "2"), "z3_ep1": ("3", "1"), "z2_ep2": ("2", "2")}
TAG = "step00000002"


@pytest.fixture(scope="module")
def ckpts(worker_run):
    # 4 steps with a checkpoint at step 2, as test_elastic's and test_expert_parallel's runs of these layouts
    # (tests/dist/conftest.py's worker_run launches each once per session). The learning rate is constant
    # (worker.py: min_lr_ratio 1), so the checkpoint at step 2 does not depend on the run's length.
    return {name: worker_run(2, "--stage", stage, "--ep", ep, "--save-at", "2") / "checkpoints" / TAG
            for name, (stage, ep) in LAYOUTS.items()}


def _assert_identical(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert list(sa) == list(sb)
    assert any(".experts." in k for k in sa) and any(".router." in k for k in sa)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_consolidated_equals_what_training_wrote(ckpts, layout, tmp_path):
    tag = ckpts[layout]
    got = consolidate(tag, tmp_path)
    assert got == tmp_path / CONSOLIDATED_NAME
    _assert_identical(got, tag / CONSOLIDATED_NAME)
    _, cfg, extra = read_consolidated(got)
    assert cfg.ep_size == 1 and cfg.num_experts == 4 and extra["step"] == 2


def test_moments_and_weights_do_not_depend_on_the_layout(ckpts):
    states = {k: read_full_state(v) for k, v in ckpts.items()}
    ref = states["z3_ep1"]
    assert ref.step == 2 and ref.zero_stage == 3
    assert states["z2_ep2"].zero_stage == 2
    for name, st in states.items():
        assert st.step == 2, name
        assert set(st.weights) == set(ref.weights) == set(st.moments)
        for n, w in ref.weights.items():
            # Summation-order noise only (ranks reduce in another order; see tests/dist/test_expert_parallel.py):
            # seen 4e-5 on weights, 0.3% relative on exp_avg, 2e-11 on exp_avg_sq; a wrong slice is off by O(1).
            torch.testing.assert_close(st.weights[n], w, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(st.moments[n]["exp_avg"], ref.moments[n]["exp_avg"], rtol=2e-2, atol=1e-6)
            torch.testing.assert_close(st.moments[n]["exp_avg_sq"], ref.moments[n]["exp_avg_sq"], rtol=2e-2, atol=1e-9)
    # The moments are real (one optimizer step moved them), so the comparison can fail.
    assert max(float(m["exp_avg_sq"].abs().max()) for m in ref.moments.values()) > 0


def test_cli_on_output_dir_and_full(ckpts, tmp_path):
    run_dir = ckpts["z3_ep2"].parents[1]
    assert resolve_tag(run_dir) == ckpts["z3_ep2"]
    res = subprocess.run([sys.executable, str(ROOT / "tools/consolidate.py"), str(run_dir), "--out", str(tmp_path),
                          "--full", "--base", str(run_dir / "base_model")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    _assert_identical(tmp_path / CONSOLIDATED_NAME, ckpts["z3_ep2"] / CONSOLIDATED_NAME)
    from mole_ds.inference import load_for_inference

    m = load_for_inference(tmp_path / CONSOLIDATED_NAME, tmp_path / "base")
    ref = load_file(str(ckpts["z3_ep2"] / CONSOLIDATED_NAME))
    params = dict(m.model.named_parameters())
    for k, t in ref.items():
        assert torch.equal(params[k].detach(), t), k


def test_cli_refuses_what_is_not_a_checkpoint(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "tools/consolidate.py"), str(tmp_path), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and CHECKPOINT_MARKER in res.stderr


def test_deepspeed_zero_to_fp32_cannot_read_expert_parallel_checkpoints(ckpts):
    # Why the CLI exists (docs/export.md): DeepSpeed's converter assumes every partition spans the whole world.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with pytest.raises(ValueError, match="consumed .* numels out of"):
        get_fp32_state_dict_from_zero_checkpoint(str(ckpts["z3_ep2"].parent), tag=TAG)
    meta = json.loads((ckpts["z3_ep2"] / CHECKPOINT_MARKER).read_text())
    assert meta["ep_size"] == 2
