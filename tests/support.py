"""The one home of what several test modules share: paths, the launch environment, ports, running and launching
commands (DeepSpeed ranks of tests/dist/worker.py, ``launchers/train.py`` runs), reading what a run wrote, and
the small model builders more than one module uses.

Test modules import these from here, never from another test module. Imports of torch, transformers and
mole_ds models happen inside the functions that need them, so importing this module is cheap (a collection of
the fast tier does not pay for DeepSpeed).

Launches (``launch``, ``run``) fail the calling test with the command's error lines and the tail of its log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mole_ds.runtime import free_port
from mole_ds.train.env import launch_env

ROOT = Path(__file__).resolve().parents[1]
PY = Path(sys.executable)
DEEPSPEED = PY.with_name("deepspeed")
TORCHRUN = PY.with_name("torchrun")
WORKER = ROOT / "tests" / "dist" / "worker.py"
DS_CONFIG = ROOT / "ds_configs" / "zero3_ep.json"
DEMO_CONFIG = ROOT / "launchers" / "configs" / "demo.yaml"
SAMPLE_ROUTING = ("--routing", "sparse", "--routing-level", "sample", "--mi-coef", "0.1", "--router-center")
"""tests/dist/worker.py arguments of the sample-routing runs (sample level, the MI objective, the centered router
gradient) that test_expert_parallel and test_elastic share (the same arguments: the same launches)."""


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every process a test starts: mole_ds's launch defaults (mole_ds.train.env.launch_env:
    offline Hugging Face, unbuffered output, a per-interpreter extension cache, ...), with one intra-op thread
    and DeepSpeed's CPU accelerator always (the tests compare runs to 1e-5 and run ranks on CPU/gloo, whatever
    the calling shell set), plus ``extra``."""
    return {**launch_env(), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **extra}


ENV = child_env()


def _failure(what: str, res: subprocess.CompletedProcess, log: Path) -> str:
    text = (res.stdout or "") + (res.stderr or "")
    errors = [ln for ln in text.splitlines() if "Error" in ln and "File " not in ln]
    return (f"{what} failed ({res.returncode}), log {log}:\n" + "\n".join(errors[:20])
            + "\n--- tail ---\n" + text[-3000:])


def run(cmd: list[str], log: Path, *, env: dict[str, str] | None = None, timeout: float = 900,
        expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repository root with ``env`` (default ENV), capture its output into ``log``; fail the
    test if it exits nonzero (unless ``expect_ok`` is False)."""
    res = subprocess.run(cmd, env=ENV if env is None else env, capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT)
    Path(log).write_text(res.stdout + res.stderr)
    if expect_ok and res.returncode != 0:
        pytest.fail(_failure(" ".join(map(str, cmd[:4])), res, log))
    return res


def log_of(out: Path) -> Path:
    """Where ``launch`` writes the log of a run into ``out``: ``<out>.log`` beside it."""
    return out.parent / f"{out.name}.log"


def run_ranks(nprocs: int, script: list[str], log: Path, *, expect_ok: bool = True,
              timeout: float = 900) -> subprocess.CompletedProcess:
    """``nprocs`` local ranks of ``python -u *script`` started directly, with the environment the deepspeed
    launcher gives its ranks (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK/SIZE, MASTER_ADDR/PORT on a
    free port) and its ``--local_rank=<r>`` argument; all output into ``log``. As the launcher does, the first
    rank to fail ends the others. Returns a CompletedProcess (status: the first failure's, else 0; stdout: the
    log); fails the test on a nonzero status unless ``expect_ok`` is False.

    For the tests' own rank scripts (tests/dist/worker.py, load_worker.py), whose subject is the ranks: the
    ``deepspeed`` runner and its per-node launcher are two more interpreters that import DeepSpeed before any
    rank starts (about 4.5 s of a 13 s two-rank run here). The launcher itself is tested with the product
    (``train_cmd`` runs, tests/dist/test_launcher.py, test_faults.py, test_multinode.py)."""
    import time

    port = str(free_port())
    base = {"WORLD_SIZE": str(nprocs), "LOCAL_SIZE": str(nprocs), "CROSS_RANK": "0", "CROSS_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    procs = []
    with open(log, "w") as f:
        for r in range(nprocs):
            procs.append(subprocess.Popen([str(PY), "-u", *map(str, script), f"--local_rank={r}"],
                                          env={**ENV, **base, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=ROOT,
                                          stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
        deadline, rc = time.monotonic() + timeout, 0
        try:
            while any(p.poll() is None for p in procs):
                failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    rc = failed[0] if failed else -9
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
                    break
                time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        rc = rc or next((p.returncode for p in procs if p.returncode), 0)
    text = Path(log).read_text()
    res = subprocess.CompletedProcess(script, rc, text, "")
    if expect_ok and rc != 0:
        pytest.fail(_failure(f"{nprocs} ranks of {' '.join(map(str, script[:1]))}", res, log))
    return res


def launch(nprocs: int, out: Path, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``nprocs`` DeepSpeed ranks of tests/dist/worker.py writing to ``out`` (``run_ranks``; log: ``log_of(out)``)."""
    return run_ranks(nprocs, [WORKER, "--out", out, *args], log_of(out), expect_ok=expect_ok)


def make_demo_data(out: Path, train_per_domain: int, eval_per_domain: int, max_samples: int) -> Path:
    """tools/make_demo_data.py into ``out`` (shards/train and shards/eval manifests); returns ``out``."""
    subprocess.run([str(PY), str(ROOT / "tools/make_demo_data.py"), "--out", str(out), "--train-per-domain",
                    str(train_per_domain), "--eval-per-domain", str(eval_per_domain), "--max-samples",
                    str(max_samples)], env=ENV, check=True, capture_output=True, cwd=ROOT)
    return out


def train_cmd(data: Path, out: Path, *overrides: str) -> list[str]:
    """``deepspeed launchers/train.py`` on 2 CPU ranks (ZeRO-3, ep 2, the demo config) over the demo shards in
    ``data``, checkpoint and evaluation every 3 steps, then ``overrides``."""
    return [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()),
            str(ROOT / "launchers/train.py"), "--deepspeed", str(DS_CONFIG), "--config", str(DEMO_CONFIG),
            "--data.train", str(data / "shards/train/manifest.json"), "--data.eval", str(data / "shards/eval/manifest.json"),
            "--data.num_workers", "1", "--train.output_dir", str(out), "--train.warmup_steps", "2",
            "--train.log_every", "1", "--train.eval_every", "3", "--checkpoint.every", "3",
            "--train.eval_exact_match_tokens", "8", *overrides]


# --- what a run wrote -------------------------------------------------------------------------------------------

def records(out: Path, kind: str) -> dict[int, dict]:
    """The ``kind`` records ("train", "eval", "samples", ...) of a launcher run's metrics.jsonl, by step."""
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r["kind"] == kind}


def train_losses(out: Path) -> dict[int, float]:
    """{step: loss} of a launcher run's training records."""
    return {s: r["loss"] for s, r in records(out, "train").items()}


def worker_losses(d: Path) -> dict:
    """losses.json of a tests/dist/worker.py run: {"start", "losses", "counts"}."""
    return json.loads((d / "losses.json").read_text())


# --- small models and inputs ------------------------------------------------------------------------------------

def llava_inputs(model, B: int = 2, text: int = 12, seed: int = 0) -> dict:
    """A batch for a tiny LLaVA: B samples of the image tokens then ``text`` random tokens, the last 3 tokens of
    sample 1 padded, random pixels."""
    import torch

    from mole_ds.models.tiny import image_seq_length

    g = torch.Generator().manual_seed(seed)
    n_img = image_seq_length(model.config)
    img_id = model.config.image_token_id
    ids = torch.randint(1, 100, (B, n_img + text), generator=g)
    ids[:, 1:1 + n_img] = img_id
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    size = model.config.vision_config.image_size
    pixels = torch.randn(B, 3, size, size, generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def _lora(x, A, B):
    return (x @ A.T) @ B.T


def reference(mlp, x_TD, domain_T=None):
    """A MoLE MLP's output by hand: y_t = sum_j c_j MLP_{e_j}(x_t; w_j), one token and one row at a time, from the
    raw tensors."""
    import torch
    import torch.nn.functional as F

    cfg, ex, s = mlp.config, mlp.experts, mlp.scaling
    Wg, Wu, Wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    out = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t:t + 1]
        p = F.softmax(F.linear(x.float(), mlp.router.weight.float(), mlp.router.bias.float()), -1)[0]
        E = p.numel()
        if cfg.routing == "oracle":
            rows = [(int(domain_T[t]) % E, 1.0, 1.0)]
        elif cfg.routing == "dense":
            rows = [(e, 1.0, p[e]) for e in range(E)]
        else:
            top = torch.topk(p, cfg.top_k).indices.tolist()
            w = {"sparse": lambda e: 1.0, "st": lambda e: 1.0, "weighted": lambda e: p[e]}[cfg.routing]
            rows = [(e, w(e), 1.0 / cfg.top_k) for e in top]
        y = torch.zeros_like(x)
        for e, w, c in rows:
            g = x @ Wg.T + s * w * _lora(x, ex.gate_A[e], ex.gate_B[e])
            u = x @ Wu.T + s * w * _lora(x, ex.up_A[e], ex.up_B[e])
            h = F.silu(g) * u
            y = y + c * (h @ Wd.T + s * w * _lora(h, ex.down_A[e], ex.down_B[e]))
        out.append(y)
    return torch.cat(out, 0)


def make_tiny_export(root: Path, *, num_experts: int = 3, routing: str = "sparse", hidden: int = 64,
                     num_layers: int = 2, config_experts: int | None = None, seed: int = 0,
                     extra: dict | None = None) -> tuple[Path, Path]:
    """(base dir, mole.safetensors): a tiny LLaVA saved with its embedded processor, patched with MoLE, every
    trainable tensor made non-zero, and exported. ``config_experts`` writes another expert count into the
    export's config (an inconsistent file)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from mole_ds import MoLEConfig, patch_model, save_consolidated
    from mole_ds.models.processor import build_tiny_processor
    from mole_ds.models.tiny import tiny_llava_config

    proc = build_tiny_processor(image_size=32, patch_size=8)
    tok = proc.tokenizer
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(
        vocab_size=len(tok), image_token_id=proc.image_token_id, pad_token_id=tok.pad_token_id,
        hidden_size=hidden, intermediate_size=2 * hidden, num_layers=num_layers,
        initializer_range=hidden ** -0.5)).eval()
    base = root / "base"
    model.save_pretrained(base)
    proc.save_pretrained(base)
    cfg = MoLEConfig(num_experts=num_experts, rank=4, alpha=8.0, dropout=0.0, routing=routing)
    patch_model(model, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    if config_experts is not None:
        cfg = MoLEConfig(**{**cfg.to_dict(), "num_experts": config_experts})
    path = save_consolidated(model, root / "export" / "mole.safetensors", cfg,
                             extra={"base_model": str(base), "domains": ["general", "text"], "step": 3,
                                    **(extra or {})})
    return base, path


__all__ = ["DEEPSPEED", "DEMO_CONFIG", "DS_CONFIG", "ENV", "PY", "ROOT", "TORCHRUN", "WORKER", "child_env", "free_port",
           "launch", "llava_inputs", "log_of", "make_demo_data", "make_tiny_export", "records", "reference", "run",
           "run_ranks", "train_cmd", "train_losses", "worker_losses"]
