#!/usr/bin/env python
"""First contact with a GPU: MoLE parity on the device and one MoLE MLP timed against plain LoRA, in one command.

    python tools/gpu_check.py --out-json docs/results/gpu_check.json         # on the GPU machine (< 8 min)
    python tools/gpu_check.py --device cpu                                    # anywhere: small sizes, a smoke run

Made for a short window on a bare GPU machine: it needs only PyTorch (+ CUDA, Triton) and transformers, never
DeepSpeed, webdataset, boto3, datasets, Pillow or network, and it imports mole_ds from this tree (no install).
Phases, each timed, each failure recorded in the JSON; a failed phase does not stop the next one, and the exit
status is 1 when any phase failed:

1. ``megablocks_install`` (only with ``--megablocks-wheel-dir``): pip-installs the wheels / sdists found there
   with ``--no-deps --no-index --no-build-isolation`` into a temporary folder put on ``sys.path`` (the machine's
   own environment is left alone), under ``--megablocks-install-timeout-s``;
2. ``environment``: Python, torch, CUDA, Triton and transformers versions, the device and its capability, bf16
   support, TF32 settings, ``torch.nn.functional.grouped_mm`` present, nvcc on PATH, MegaBlocks importable;
3. ``imports``: the mole_ds pieces the check needs (config, the MoLE MLP, the dispatch backends);
4. ``parity``: the ``torch`` backend against the ``loop`` reference on the device, fp32 and bf16: forward output
   and the gradient of every router / LoRA-expert tensor and of the input (loss = output . g + balance + 0.1 z),
   for E 1..64, top_k 1 and 2, routing sparse / weighted / st / dense, at a small ragged shape plus one case at
   the timing shape. Error = ||fast - ref|| / ||ref|| per tensor; tolerance 1e-5 in fp32 and 3e-2 in bf16 (both
   sides round every product to bf16, in different orders); the expert gradients must not be all zero;
5. ``megablocks_parity``: the same cases for the ``megablocks`` backend (CUDA with MegaBlocks only, else skipped);
6. ``timing``: for each E, one MoLE MLP forward + backward against a plain-LoRA MLP (the same frozen LLaMA MLP,
   one LoRA of the same rank on gate/up/down) on the same tokens, timed alternately (``mole_ds.mole.bench``, as
   ``tools/bench_mole.py``): median ms of each, ratio, tokens/s and, on CUDA, the peak memory one step allocates
   above what was allocated before it. ``--budget-s`` (wall time since start) ends the sweep early; the E values
   left out are listed under ``skipped``.

Defaults on CUDA are LLaVA-1.5-7B's MLP: hidden 4096, intermediate 11008, rank 32, 8192 tokens, bf16, sparse
top-1 routing, E = 1, 2, 4, ..., 64, backends torch (+ megablocks when it imports). On CPU: hidden 256,
intermediate 688, 1024 tokens, fp32, E = 1, 2, 4, 8. Any size given on the command line wins.
Outputs: ``--out-json`` (default gpu_check.json, rewritten after every phase, so a killed run still leaves what
it measured, with ``in_progress`` naming the phase that was running) and a markdown table on stdout (also written
to ``--out-md`` when given). A watchdog (``--hard-timeout-s``, default 470) ends a run that hangs (a kernel that
never returns) with every thread's stack on stderr, so the window is not lost waiting.

MegaBlocks: 0.10.0 is published as an sdist only; its setup.py imports torch and builds CUDA extensions
(megablocks_ops; grouped_gemm builds CUTLASS kernels, and its setup.py asks torch for the GPU's capability even to
report its metadata) and pins torch==2.7.0. So nothing can be built, or even ``pip download``-ed, on a CPU machine,
and on the GPU machine it builds only if a CUDA toolkit matching torch's CUDA is there (the ``environment``
phase reports nvcc). The realistic path: carry the three sdists in the working tree (about 1 MiB together:
grouped_gemm-0.3.0.tar.gz 0.98 MB, megablocks ~50 kB, stanford_stk-0.7.1.tar.gz 17 kB; fetch the files from
https://pypi.org/simple/<name>/ directly, since pip would try to build them) and try a time-limited build there::

    python tools/gpu_check.py --megablocks-wheel-dir wheels/megablocks --out-json docs/results/gpu_check.json

which runs the equivalent of ``pip install --no-build-isolation --no-deps --no-index --target TMP
wheels/megablocks/*`` (setuptools must be there; prebuilt ``.whl`` files for that machine's torch / CUDA /
Python install the same way with no build). When it fails or runs past ``--megablocks-install-timeout-s``, the
phase is failed with pip's log, MegaBlocks is skipped and says why, and the torch backend (no extra packages) is
what gets measured. Without ``--megablocks-wheel-dir`` MegaBlocks is used only if it already imports.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import faulthandler
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a bare GPU machine has this tree, not an installed mole_ds

import torch  # noqa: E402

FP32_TOL, BF16_TOL = 1e-5, 3e-2
PARITY_CASES = [(1, 1, "sparse"), (2, 1, "weighted"), (8, 1, "sparse"), (8, 2, "weighted"), (8, 2, "st"),
                (8, 2, "dense"), (64, 1, "sparse"), (64, 2, "weighted")]
"""(E, top_k, routing) at the small parity shape; one more case (E=8 or less, top-2, weighted) at the timing shape."""
PARITY_SHAPE = {"batch": 2, "seq": 37, "hidden": 64, "intermediate": 160, "rank": 8}
"""Small and ragged (74 tokens: uneven and empty expert groups), every stride 16-byte aligned in bf16."""
CUDA_DEFAULTS = {"hidden": 4096, "intermediate": 11008, "tokens": 8192, "experts": [1, 2, 4, 8, 16, 32, 64],
                 "warmup": 5, "reps": 30}
CPU_DEFAULTS = {"hidden": 256, "intermediate": 688, "tokens": 1024, "experts": [1, 2, 4, 8], "warmup": 1, "reps": 3}


class Check:
    """Runs phases in order, records each one's status, seconds and results, and rewrites the JSON after each."""

    def __init__(self, out_json: Path, config: dict) -> None:
        self.out_json = out_json
        self.t0 = time.perf_counter()
        self.data = {"tool": "tools/gpu_check.py", "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "config": config, "ok": None, "phases": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, fn, *args) -> dict:
        """``fn`` returns a dict of results; its optional ``status`` key ('ok', 'failed', 'skipped') wins over
        'ok'. An exception fails the phase with its traceback; the check goes on either way."""
        print(f"[gpu_check] {name} ...", flush=True)
        self.progress(name, None)
        t = time.perf_counter()
        try:
            rec = dict(fn(*args) or {})
            rec.setdefault("status", "ok")
        except Exception as exc:  # a phase must never stop the others
            rec = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        rec["seconds"] = round(time.perf_counter() - t, 3)
        self.data["phases"][name] = rec
        self.data.pop("in_progress", None)
        self.write()
        print(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']:.1f} s)"
              + (f" - {rec['error']}" if rec.get("error") else "") + (f" - {rec['reason']}" if rec.get("reason") else ""),
              flush=True)
        return rec

    def progress(self, phase: str, partial) -> None:
        """Record (and write) the running phase and what it has so far: after a hang and ``--hard-timeout-s``
        the JSON says where it stopped."""
        self.data["in_progress"] = {"phase": phase, "partial": partial}
        self.write()

    def failed(self) -> list[str]:
        return [n for n, r in self.data["phases"].items() if r["status"] == "failed"]

    def write(self, final: bool = False) -> None:
        self.data["wall_s"] = round(self.elapsed(), 3)
        if final:
            self.data["ok"] = not self.failed()
            self.data["failed_phases"] = self.failed()
        self.out_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_json.with_name(self.out_json.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_json_default))
        os.replace(tmp, self.out_json)


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


# ---------------------------------------------------------------------------------------------------- phases

def install_megablocks(wheel_dir: Path, timeout_s: float) -> dict:
    """pip-install every wheel / sdist in ``wheel_dir`` (no deps, no index, no build isolation) into a temporary
    folder and put it first on sys.path."""
    files = sorted(p for p in wheel_dir.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip")))
    if not files:
        return {"status": "failed", "error": f"no .whl / .tar.gz / .zip files in {wheel_dir}"}
    target = tempfile.mkdtemp(prefix="gpu_check_megablocks_")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
           "--disable-pip-version-check", "--no-input", "--target", target, *map(str, files)]
    rec = {"files": [p.name for p in files], "target": target, "command": " ".join(cmd)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return rec | {"status": "failed", "error": f"pip install took more than {timeout_s:.0f} s", "log_tail": out[-3000:]}
    rec["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode != 0:
        return rec | {"status": "failed", "error": f"pip install exited {proc.returncode} (log_tail)"}
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    return rec


def environment(device: torch.device) -> dict:
    """What this machine is: versions, device, dtype support, optional packages (nothing here can fail the run
    except torch itself)."""
    rec = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "device": str(device), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(),
           "grouped_mm": hasattr(torch.nn.functional, "grouped_mm"), "nvcc": shutil.which("nvcc"),
           "cuda_home": os.environ.get("CUDA_HOME")}
    for mod in ("transformers", "triton", "numpy", "deepspeed"):  # versions without importing them
        try:
            rec[mod] = importlib.metadata.version(mod) if importlib.util.find_spec(mod) else None
        except Exception as exc:
            rec[mod] = f"unknown ({type(exc).__name__}: {exc})"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        rec |= {"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                "device_memory_gib": round(props.total_memory / 2**30, 1), "device_count": torch.cuda.device_count(),
                "bf16": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version(),
                "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "driver": _nvidia_smi("driver_version")}
    else:
        rec |= {"device_name": platform.processor() or platform.machine(), "bf16": True}
    try:
        import grouped_gemm.ops  # noqa: F401
        import megablocks.ops  # noqa: F401
        import megablocks
        rec["megablocks"] = getattr(megablocks, "__version__", "importable")
    except Exception as exc:
        rec["megablocks"] = None
        rec["megablocks_reason"] = f"{type(exc).__name__}: {exc}"
    return rec


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def import_mole() -> dict:
    """Import what the check needs from mole_ds; report which third-party packages that pulled in."""
    before = {m.partition(".")[0] for m in sys.modules}
    # Imported here, not at the top, so that a missing dependency is a failed phase in the JSON rather than a
    # crash before anything is written; the later phases use these module globals.
    global MoLEConfig, LocalDispatcher, get_backend, megablocks_available, aux_losses, bench
    from mole_ds.config import MoLEConfig
    from mole_ds.mole import bench
    from mole_ds.mole.collect import aux_losses
    from mole_ds.mole.dispatch import LocalDispatcher, get_backend, megablocks_available
    loaded = sorted({m.partition(".")[0] for m in sys.modules} - before - set(sys.builtin_module_names)
                    - set(getattr(sys, "stdlib_module_names", ())) - {"mole_ds"})
    ok, reason = megablocks_available()
    src = Path(sys.modules["mole_ds"].__file__).resolve().parent
    where = src.relative_to(ROOT).as_posix() if src.is_relative_to(ROOT) else str(src)  # the tree's own, or not
    return {"mole_ds_from": where, "third_party_loaded": loaded,
            "megablocks_available": ok, "megablocks_reason": reason}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32 (0 when both are zero; inf when either holds NaN or inf)."""
    a, b = a.detach().float(), b.detach().float()
    diff, ref = (a - b).norm().item(), b.norm().item()
    if not (math.isfinite(diff) and math.isfinite(ref)):
        return math.inf  # NaN / inf anywhere is a failure, never a silent pass
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def _loss_and_grads(mlp, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    y = mlp(x)
    parts = aux_losses(mlp)  # so the router gets gradient in every routing mode
    ((y * g).sum() + parts["balance"] + 0.1 * parts["z"]).backward()
    grads = {n: p.grad for n, p in mlp.named_parameters() if p.requires_grad}
    grads["input"] = x.grad
    return y.detach(), grads


def parity_case(backend: str, device: torch.device, dtype: torch.dtype, E: int, top_k: int, routing: str,
                tokens: int, hidden: int, intermediate: int, rank: int, batch: int = 1) -> dict:
    """One (backend vs loop) comparison; returns the errors and whether they are within tolerance."""
    rec = {"backend": backend, "dtype": str(dtype).removeprefix("torch."), "E": E, "top_k": top_k,
           "routing": routing, "tokens": tokens, "hidden": hidden, "intermediate": intermediate, "rank": rank}
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    try:
        torch.manual_seed(1000 * E + 10 * top_k + len(routing))
        cfg = MoLEConfig(num_experts=E, top_k=top_k, rank=rank, alpha=2.0 * rank, dropout=0.0, routing=routing,
                         backend="loop")
        ref = bench.mole_mlp(bench.llama_mlp(hidden, intermediate, device), cfg, expert_std=0.2)
        with torch.no_grad():
            ref.router.weight.normal_(0, 1.0)  # spread the tokens over the experts
        fast = copy.deepcopy(ref)
        fast.dispatcher = LocalDispatcher(get_backend(backend, device))
        ref.to(dtype)
        fast.to(dtype)
        x = torch.randn(batch, tokens // batch, hidden, device=device, dtype=dtype)
        g = torch.linspace(-1, 1, x.numel(), device=device, dtype=dtype).view_as(x)  # the output's upstream grad
        y_ref, g_ref = _loss_and_grads(ref, x, g)
        y_fast, g_fast = _loss_and_grads(fast, x, g)
        errs = {"output": _rel_err(y_fast, y_ref)}
        for name in g_ref:
            if g_fast.get(name) is None or g_ref[name] is None:
                errs[f"grad {name}"] = math.inf
            else:
                errs[f"grad {name}"] = _rel_err(g_fast[name], g_ref[name])
        live = all(g_ref[f"experts.{p}_{m}"].abs().sum().item() > 0 for p in ("gate", "up", "down") for m in "AB")
        worst = max(errs, key=errs.get)
        rec |= {"rel_err": {k: _finite(v) for k, v in errs.items()}, "worst": worst, "worst_err": _finite(errs[worst]),
                "tol": tol, "expert_grads_live": live, "ok": bool(errs[worst] <= tol and live)}
    except Exception as exc:
        rec |= {"ok": False, "tol": tol, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    return rec


def parity(backend: str, device: torch.device, dtypes: list[torch.dtype], timing_shape: dict) -> dict:
    cases = []
    s = PARITY_SHAPE
    for dtype in dtypes:
        for E, k, routing in PARITY_CASES:
            cases.append(parity_case(backend, device, dtype, E, k, routing, s["batch"] * s["seq"], s["hidden"],
                                     s["intermediate"], s["rank"], batch=s["batch"]))
        E = min(8, max(timing_shape["experts"]))
        cases.append(parity_case(backend, device, dtype, E, min(2, E), "weighted", min(timing_shape["tokens"], 2048),
                                 timing_shape["hidden"], timing_shape["intermediate"], timing_shape["rank"]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bad = [c for c in cases if not c["ok"]]
    summary = {}
    for c in cases:
        d = summary.setdefault(c["dtype"], {"cases": 0, "passed": 0, "raised": 0, "worst_err": 0.0, "tol": c["tol"]})
        d["cases"] += 1
        d["passed"] += int(c["ok"])
        d["raised"] += int("error" in c)
        d["worst_err"] = max(d["worst_err"], float(c.get("worst_err", 0.0)))  # "inf" parses
    for d in summary.values():
        d["worst_err"] = _finite(d["worst_err"])
    return {"status": "failed" if bad else "ok", "backend": backend, "summary": summary, "cases": cases,
            **({"error": f"{len(bad)} of {len(cases)} cases out of tolerance or raising"} if bad else {})}


def timing(device: torch.device, dtype: torch.dtype, shape: dict, backends: list[str], routing: str, top_k: int,
           warmup: int, reps: int, budget_s: float, check: Check) -> dict:
    """MoLE MLP vs plain LoRA per (E, backend) until the budget runs out."""
    T, D, F, r = shape["tokens"], shape["hidden"], shape["intermediate"], shape["rank"]
    sync = bench.device_sync(device)
    torch.manual_seed(0)
    base = bench.llama_mlp(D, F, device, dtype)
    x = torch.randn(1, T, D, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    plain_step = bench.fwd_bwd(bench.plain_lora_mlp(base, r), x, grad)
    rows, skipped, longest = [], [], 0.0
    for E in shape["experts"]:
        for b in backends:
            if check.elapsed() + 1.5 * longest > budget_s:
                skipped.append({"backend": b, "experts": E})
                continue
            t_row = time.perf_counter()
            row = {"backend": b, "experts": E, "top_k": min(top_k, E), "routing": routing}
            try:
                cfg = MoLEConfig(num_experts=E, top_k=min(top_k, E), rank=r, alpha=2.0 * r, dropout=0.0,
                                 routing=routing, backend=b)
                mole_step = bench.fwd_bwd(bench.mole_mlp(base, cfg), x, grad)
                t, t_plain = bench.time_pair(mole_step, plain_step, warmup, reps, sync)
                peak, peak_plain = bench.step_peak_bytes(mole_step, device), bench.step_peak_bytes(plain_step, device)
                row |= {"mole_ms": 1e3 * t, "plain_lora_ms": 1e3 * t_plain, "ratio": t / t_plain,
                        "mole_tokens_per_s": T / t, "plain_lora_tokens_per_s": T / t_plain,
                        "mole_peak_mib": None if peak is None else peak / 2**20,
                        "plain_lora_peak_mib": None if peak_plain is None else peak_plain / 2**20}
            except Exception as exc:
                row |= {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            mole_step = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row["row_s"] = round(time.perf_counter() - t_row, 3)
            longest = max(longest, row["row_s"])
            rows.append(row)
            check.progress("timing", rows)
            print(f"[gpu_check]   {b} E={E}: " + (row.get("error") or
                  f"{row['mole_ms']:.2f} ms vs {row['plain_lora_ms']:.2f} ms, ratio {row['ratio']:.3f}"), flush=True)
    bad = [w for w in rows if "error" in w]
    rec = {"dtype": str(dtype).removeprefix("torch."), "tokens": T, "hidden": D, "intermediate": F, "rank": r,
           "routing": routing, "top_k": top_k, "warmup": warmup, "reps": reps, "budget_s": budget_s,
           "rows": rows, "skipped": skipped}
    if skipped:
        rec["reason"] = f"--budget-s {budget_s:g} reached: {len(skipped)} (backend, E) rows not timed"
    if bad:
        rec |= {"status": "failed", "error": f"{len(bad)} of {len(rows)} rows raised"}
    return rec


# ---------------------------------------------------------------------------------------------------- report

def tables(data: dict) -> str:
    """The markdown summary: environment line, phases, parity, timing."""
    ph = data["phases"]
    env = ph.get("environment", {})
    lines = [f"### gpu_check on {env.get('device_name', '?')} ({env.get('device', '?')}): torch {env.get('torch')}, "
             f"CUDA {env.get('torch_cuda')}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
             f"megablocks {env.get('megablocks') or 'absent'}", "",
             "| phase | status | s | note |", "|---|---|---|---|"]
    for name, rec in ph.items():
        note = rec.get("error") or rec.get("reason") or ""
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']:.1f} | {note} |")
    for name in ("parity", "megablocks_parity"):
        rec = ph.get(name, {})
        if rec.get("summary"):
            lines += ["", f"{name} ({rec['backend']} vs loop; error = ||fast - ref|| / ||ref||, worst over output "
                      "and every gradient):", "", "| dtype | cases | passed | worst error | tolerance |", "|---|---|---|---|---|"]
            for dt, s in rec["summary"].items():
                w = s["worst_err"]
                w = f"{w:.2e}" if isinstance(w, float) else w
                raised = f" ({s['raised']} raised)" if s["raised"] else ""
                lines.append(f"| {dt} | {s['cases']} | {s['passed']}{raised} | {w} | {s['tol']:g} |")
    t = ph.get("timing", {})
    if t.get("rows"):
        lines += ["", f"timing: one MLP forward + backward, {t['tokens']} tokens, hidden {t['hidden']}, intermediate "
                  f"{t['intermediate']}, rank {t['rank']}, {t['dtype']}, {t['routing']} top-{t['top_k']}; median of "
                  f"{t['reps']} alternating reps; peak = memory one step allocates above what was allocated before it",
                  "", "| backend | E | MoLE ms | plain LoRA ms | MoLE / plain | MoLE tok/s | plain tok/s | MoLE peak MiB "
                  "| plain peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
        for w in t["rows"]:
            if "error" in w:
                lines.append(f"| {w['backend']} | {w['experts']} | error: {w['error'][:80]} | | | | | | |")
                continue
            mib = [("-" if v is None else f"{v:.0f}") for v in (w["mole_peak_mib"], w["plain_lora_peak_mib"])]
            lines.append(f"| {w['backend']} | {w['experts']} | {w['mole_ms']:.2f} | {w['plain_lora_ms']:.2f} | "
                         f"{w['ratio']:.3f} | {w['mole_tokens_per_s']:.0f} | {w['plain_lora_tokens_per_s']:.0f} | "
                         f"{mib[0]} | {mib[1]} |")
        if t.get("skipped"):
            lines.append(f"\nnot timed ({t['reason']}): "
                         + ", ".join(f"{s['backend']} E={s['experts']}" for s in t["skipped"]))
    lines += ["", f"total {data['wall_s']:.1f} s; " + ("all phases passed" if data["ok"] else
                                                       f"FAILED: {', '.join(data['failed_phases'])}")]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu")
    ap.add_argument("--hidden", type=int, default=None, help="default 4096 on CUDA, 256 on CPU")
    ap.add_argument("--intermediate", type=int, default=None, help="default 11008 on CUDA, 688 on CPU")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=None, help="default 8192 on CUDA, 1024 on CPU")
    ap.add_argument("--experts", type=int, nargs="+", default=None, help="default 1 2 4 .. 64 on CUDA, 1 2 4 8 on CPU")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="timing dtype; default bfloat16 on CUDA (float32 where bf16 is unsupported), float32 on CPU")
    ap.add_argument("--routing", default="sparse", choices=["sparse", "weighted", "st", "dense"])
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--backends", nargs="+", default=None, help="timed backends; default torch (+ megablocks when usable)")
    ap.add_argument("--warmup", type=int, default=None, help="default 5 on CUDA, 1 on CPU")
    ap.add_argument("--reps", type=int, default=None, help="default 30 on CUDA, 3 on CPU")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="no new timing row starts once this many seconds since start would be exceeded")
    ap.add_argument("--hard-timeout-s", type=float, default=470.0,
                    help="a watchdog: past this many seconds (a hung kernel), dump every thread's stack and exit 1; "
                         "the JSON keeps the finished phases and in_progress")
    ap.add_argument("--skip-parity", action="store_true", help="timing only")
    ap.add_argument("--megablocks-wheel-dir", type=Path, default=None,
                    help="pip-install the wheels / sdists here before probing megablocks (see above)")
    ap.add_argument("--megablocks-install-timeout-s", type=float, default=240.0)
    ap.add_argument("--out-json", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--out-md", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    d = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    shape = {"hidden": pick(args.hidden, "hidden"), "intermediate": pick(args.intermediate, "intermediate"),
             "rank": args.rank, "tokens": pick(args.tokens, "tokens"), "experts": pick(args.experts, "experts")}
    bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" and bf16_ok else torch.float32)
    parity_dtypes = [torch.float32] + ([torch.bfloat16] if bf16_ok else [])
    warmup, reps = pick(args.warmup, "warmup"), pick(args.reps, "reps")
    config = {"argv": sys.argv[1:] if argv is None else list(argv), "device": str(device), **shape,
              "dtype": str(dtype), "routing": args.routing, "top_k": args.top_k, "warmup": warmup, "reps": reps,
              "budget_s": args.budget_s, "parity_dtypes": [str(t) for t in parity_dtypes],
              "parity_tolerance": {"float32": FP32_TOL, "bfloat16": BF16_TOL}}
    check = Check(args.out_json, config)
    if args.hard_timeout_s > 0:
        faulthandler.dump_traceback_later(args.hard_timeout_s, exit=True)

    if args.megablocks_wheel_dir is not None:
        check.run("megablocks_install", install_megablocks, args.megablocks_wheel_dir, args.megablocks_install_timeout_s)
    check.run("environment", environment, device)
    imported = check.run("imports", import_mole)["status"] == "ok"
    need = lambda fn: fn if imported else (lambda *a: {"status": "failed", "error": "mole_ds did not import"})  # noqa: E731
    mb_ok = imported and check.data["phases"]["imports"]["megablocks_available"]
    if args.skip_parity:
        check.run("parity", lambda: {"status": "skipped", "reason": "--skip-parity"})
    else:
        check.run("parity", need(parity), "torch", device, parity_dtypes, shape)
    if args.skip_parity or not mb_ok:
        why = "--skip-parity" if args.skip_parity else (
            check.data["phases"]["imports"].get("megablocks_reason", "mole_ds did not import"))
        check.run("megablocks_parity", lambda: {"status": "skipped", "reason": f"megablocks not checked: {why}"})
    else:
        check.run("megablocks_parity", parity, "megablocks", device, parity_dtypes, shape)
    backends = args.backends or (["torch"] + (["megablocks"] if mb_ok else []))
    check.run("timing", need(timing), device, dtype, shape, backends, args.routing, args.top_k, warmup, reps,
              args.budget_s, check)

    faulthandler.cancel_dump_traceback_later()
    check.write(final=True)
    md = tables(check.data)
    print(md, flush=True)
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(md + "\n")
    print(f"[gpu_check] wrote {args.out_json}", flush=True)
    return 0 if check.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
