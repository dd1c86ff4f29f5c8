"""tools/gpu_check.py on CPU, so that its first run on a GPU machine measures instead of debugging.

The main test runs the tool the way a bare GPU machine would: in a fresh interpreter where mole_ds is not
installed (only this tree) and DeepSpeed, webdataset, boto3, datasets, Pillow, accelerate, MegaBlocks, ... are
not importable (hidden from every import finder), from another working directory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "gpu_check.py"

# Installed here for the project or its tests, absent on a GPU machine that has only torch/CUDA/Triton/transformers.
HIDDEN = ("deepspeed", "datasets", "webdataset", "boto3", "botocore", "s3transfer", "s3fs", "PIL", "matplotlib",
          "tensorboard", "peft", "moto", "accelerate", "psutil", "torchvision", "megablocks", "grouped_gemm", "stk",
          "lmms_eval")

# Runs in the child: hide HIDDEN and the editable install of mole_ds, check that both worked, run the tool.
BARE_MACHINE = r"""
import importlib.util, os, runpy, sys
hidden, root, tool = set(sys.argv[1].split(",")), sys.argv[2], sys.argv[3]

class Hide:
    # Wraps a meta-path finder: a hidden top-level package is simply not found, as when it is not installed
    # (import raises ModuleNotFoundError, importlib.util.find_spec returns None).
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden or not hasattr(self.inner, "find_spec"):
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, name):  # find_distributions (importlib.metadata), invalidate_caches, ...
        return getattr(self.inner, name)

sys.meta_path[:] = [Hide(f) for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != root]
assert not hidden & {m.partition(".")[0] for m in sys.modules}, "a hidden package was imported at start-up"
for name in sorted(hidden) + ["mole_ds"]:
    assert importlib.util.find_spec(name) is None, f"{name} is still importable"
sys.argv = [tool] + sys.argv[4:]
runpy.run_path(tool, run_name="__main__")
"""


def _load_tool():
    spec = importlib.util.spec_from_file_location("_tool_gpu_check", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_run_without_deepspeed_or_an_installed_package(tmp_path):
    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--hidden", "32", "--intermediate", "64", "--rank", "4", "--tokens", "64",
            "--experts", "1", "2", "4", "--warmup", "0", "--reps", "2", "--out-json", str(out),
            "--out-md", str(tmp_path / "gpu_check.md")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", BARE_MACHINE, ",".join(HIDDEN), str(ROOT.resolve()), str(TOOL), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    data = json.loads(out.read_text())
    ph = data["phases"]
    assert data["ok"] and data["failed_phases"] == []
    assert list(ph) == ["environment", "imports", "parity", "megablocks_parity", "timing"]
    assert ph["environment"]["deepspeed"] is None  # the tool's own process could not see DeepSpeed
    assert ph["imports"]["mole_ds_from"] == "mole_ds"  # the tree's own (recorded relative to it), not an install
    assert not set(HIDDEN) & set(ph["imports"]["third_party_loaded"])

    par = ph["parity"]
    assert par["status"] == "ok" and par["backend"] == "torch"
    assert {c["dtype"] for c in par["cases"]} == {"float32", "bfloat16"}
    assert {c["routing"] for c in par["cases"]} >= {"sparse", "weighted"}
    assert {c["top_k"] for c in par["cases"]} == {1, 2}
    assert all(c["ok"] and c["expert_grads_live"] for c in par["cases"])
    fp32 = [c for c in par["cases"] if c["dtype"] == "float32"]
    assert max(c["worst_err"] for c in fp32) <= 1e-5
    assert {"grad router.weight", "grad experts.down_B", "grad input"} <= set(fp32[0]["rel_err"])
    assert ph["megablocks_parity"]["status"] == "skipped" and "CUDA" in ph["megablocks_parity"]["reason"]

    t = ph["timing"]
    assert t["status"] == "ok" and t["dtype"] == "float32" and t["skipped"] == []
    assert [(r["backend"], r["experts"]) for r in t["rows"]] == [("torch", 1), ("torch", 2), ("torch", 4)]
    for r in t["rows"]:
        assert r["ratio"] > 0 and r["mole_ms"] > 0 and r["plain_lora_ms"] > 0 and r["mole_tokens_per_s"] > 0
        assert r["mole_peak_mib"] is None  # CPU: no peak-memory counter

    table = (tmp_path / "gpu_check.md").read_text()
    assert table in proc.stdout
    assert "| backend | E | MoLE ms | plain LoRA ms | MoLE / plain |" in table
    assert "| torch | 4 |" in table
    assert "| float32 | 9 | 9 |" in table and "| bfloat16 | 9 | 9 |" in table
    assert "all phases passed" in table


def test_budget_and_a_failing_phase_are_recorded(tmp_path, capsys):
    tool = _load_tool()
    small = ["--device", "cpu", "--hidden", "32", "--intermediate", "64", "--rank", "4", "--tokens", "32",
             "--warmup", "0", "--reps", "1", "--skip-parity", "--hard-timeout-s", "0"]  # no watchdog in pytest's process

    # A budget already spent: no timing row starts, each is listed as skipped, and that is not a failure.
    assert tool.main(small + ["--experts", "1", "2", "--budget-s", "0", "--out-json", str(tmp_path / "a.json")]) == 0
    t = json.loads((tmp_path / "a.json").read_text())["phases"]["timing"]
    assert t["status"] == "ok" and t["rows"] == []
    assert t["skipped"] == [{"backend": "torch", "experts": 1}, {"backend": "torch", "experts": 2}]
    assert "--budget-s 0" in t["reason"]
    assert "not timed" in capsys.readouterr().out

    # A row that raises fails the phase (exit 1) but not the other rows.
    assert tool.main(small + ["--experts", "1", "--backends", "torch", "nope", "--out-json", str(tmp_path / "b.json")]) == 1
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["ok"] is False and data["failed_phases"] == ["timing"]
    rows = data["phases"]["timing"]["rows"]
    assert rows[0]["ratio"] > 0 and "nope" in rows[1]["error"]
    assert "FAILED: timing" in capsys.readouterr().out


def test_parity_catches_a_wrong_backend(monkeypatch):
    """Not a vacuous pass: a backend whose LoRA products are 10% off fails in fp32 and in bf16."""
    tool = _load_tool()
    tool.import_mole()
    from mole_ds.mole.dispatch import TorchGroupedBackend

    class TenPercentOff(TorchGroupedBackend):
        def grouped_lora(self, x_RD, counts_E, A_ErI, B_EOr):
            return 1.1 * super().grouped_lora(x_RD, counts_E, A_ErI, B_EOr)

    monkeypatch.setattr(tool, "get_backend", lambda name, device=None: TenPercentOff())
    for dtype in (tool.torch.float32, tool.torch.bfloat16):
        case = tool.parity_case("torch", tool.torch.device("cpu"), dtype, 4, 2, "weighted", 40, 32, 64, 8)
        assert not case["ok"] and case["worst_err"] > tool.BF16_TOL, case
        assert case["rel_err"]["output"] > 1e-3


def test_missing_megablocks_wheels_fail_their_phase_only(tmp_path):
    tool = _load_tool()
    (tmp_path / "wheels").mkdir()
    rc = tool.main(["--device", "cpu", "--skip-parity", "--budget-s", "0", "--hard-timeout-s", "0",
                    "--megablocks-wheel-dir", str(tmp_path / "wheels"), "--out-json", str(tmp_path / "c.json")])
    data = json.loads((tmp_path / "c.json").read_text())
    assert rc == 1 and data["failed_phases"] == ["megablocks_install"]
    assert "no .whl" in data["phases"]["megablocks_install"]["error"]
    assert data["phases"]["environment"]["status"] == "ok" and data["phases"]["imports"]["status"] == "ok"


def test_defaults_cpu_small_cuda_llava_7b():
    tool = _load_tool()
    c, g = tool.CPU_DEFAULTS, tool.CUDA_DEFAULTS
    assert (c["hidden"], c["intermediate"], c["tokens"], c["experts"]) == (256, 688, 1024, [1, 2, 4, 8])
    assert (g["hidden"], g["intermediate"], g["tokens"], g["experts"]) == (4096, 11008, 8192, [1, 2, 4, 8, 16, 32, 64])
