"""The product end to end: `deepspeed launchers/train.py` on 2 CPU ranks (ZeRO-3, ep_size 2) over demo shards,
resume, clean shutdown on SIGTERM, and export."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.support import ENV, PY, ROOT, run, train_cmd, train_losses

pytestmark = pytest.mark.dist


def test_run_writes_everything_a_person_reads(demo):
    out = demo["full"]
    for name in ("metrics.jsonl", "routing.json", "routing.png", "summary.json", "base_model/config.json"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["zero_stage"] == 3 and summary["ep_size"] == 2
    assert set(summary["eval"]) >= {"loss/general", "loss/document", "loss/chart", "loss/all", "exact_match/general",
                                    "exact_match/document", "exact_match/chart", "exact_match/all"}
    assert all(0.0 <= v <= 1.0 for k, v in summary["eval"].items() if k.startswith("exact_match/"))
    assert summary["data_stats"]["samples_read"] > 0 and summary["warnings"] == []
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    assert [e["step"] for e in evals] == [3, 6]  # every 3 steps (the last doubles as the final evaluation)
    assert evals[0].keys() == evals[1].keys()
    # Expert all-to-all bytes are per training step: the record after an evaluation (step 4) carries no
    # evaluation traffic (the whole held-out set, many times a training batch).
    trains = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"}
    fwd = {k: r["a2a_bytes_fwd"] for k, r in trains.items()}
    assert sorted(fwd) == [1, 2, 3, 4, 5, 6] and all(v > 0 for v in fwd.values()), fwd
    others = sorted(v for k, v in fwd.items() if k != 4)
    assert fwd[4] <= 3 * others[len(others) // 2], fwd
    routing = json.loads((out / "routing.json").read_text())
    assert routing["domains"] == ["chart", "document", "general"] and len(routing["layers"]) == 2
    assert "=== mole_ds run summary ===" in demo["full_out"]
    tag = out / "checkpoints" / "step00000006"
    assert (tag / "mole_meta.json").is_file() and (tag / "mole.safetensors").is_file()


def test_resume_auto_continues_exactly(demo):
    assert "resumed from" in demo["resumed_out"] and "at step 3" in demo["resumed_out"]
    full, part = train_losses(demo["full"]), train_losses(demo["part"])
    for step in (4, 5, 6):  # same batches (data position restored) and same weights/optimizer/scheduler
        assert part[step] == pytest.approx(full[step], abs=1e-5), step
    a = load_file(str(demo["full"] / "checkpoints/step00000006/mole.safetensors"))
    b = load_file(str(demo["part"] / "checkpoints/step00000006/mole.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_export_load_and_peft_adapters(demo, tmp_path):
    out = tmp_path / "export"
    subprocess.run([str(PY), str(ROOT / "tools/export.py"), str(demo["full"]), "--out", str(out), "--peft"],
                   env=ENV, check=True, capture_output=True, cwd=ROOT)
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    import mole_ds

    base_dir = demo["full"] / "base_model"
    # Both sides in fp32, whatever precision the run trained in (bf16 "auto" on a CPU with native bf16): the
    # test is about the math of the two routes, not bf16 rounding of different op orders.
    mole = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()
    mole_ds.load_mole(out / "mole.safetensors", mole)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    for k in range(4):
        for layer in mole.model.language_model.layers:
            with torch.no_grad():
                layer.mlp.router.weight.zero_()
                layer.mlp.router.bias.fill_(-30.0)
                layer.mlp.router.bias[k] = 30.0
        peft = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32),
                                         out / "peft" / f"expert_{k}").eval()
        with torch.no_grad():
            torch.testing.assert_close(mole(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_sigterm_saves_a_final_checkpoint_and_resumes(demo):
    out = demo["root"] / "interrupted"
    log = open(demo["root"] / "interrupted.log", "w")
    proc = subprocess.Popen(train_cmd(demo["data"], out, "--train.max_steps", "100000", "--checkpoint.every", "0"),
                            env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, f"training exited early, see {log.name}"
        time.sleep(1)
    # As a terminal's Ctrl-C or a job scheduler does: signal the whole process group (the deepspeed runner
    # alone does not forward signals on a single node). Ranks stop at the next step with a checkpoint.
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    deadline = time.time() + 300  # the runner exits at once; the ranks finish their step and save first
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("ranks did not exit within 300 s of SIGTERM")
    log.close()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and 2 <= summary["steps"] < 100000
    tag = out / "checkpoints" / f"step{summary['steps']:08d}"
    assert (tag / "mole_meta.json").is_file() and (tag / "mole.safetensors").is_file()
    res = run(train_cmd(demo["data"], out, "--train.max_steps", str(summary["steps"] + 1), "--checkpoint.resume", "auto"),
              demo["root"] / "after_interrupt.log")
    assert f"at step {summary['steps']}" in res.stdout
