"""Launch one ``launchers/train.py`` run as a DeepSpeed subprocess and read back what it wrote.

A study is many short runs; each is a real launch (``deepspeed --num_gpus N launchers/train.py ...``), so
the numbers include everything a user's run does: engine setup, data streaming, evaluation and checkpoints.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..train.sweep import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launchers" / "train.py"


def study_env() -> dict[str, str]:
    """The environment of a study's launches: mole_ds.train.env.launch_env's defaults (one thread per rank,
    offline, a per-interpreter DeepSpeed op cache, the CPU accelerator unless CUDA is present)."""
    from ..train.env import launch_env

    return launch_env()


def release_shm(port: int) -> int:
    """Remove the /dev/shm all-reduce buffers a finished CPU launch on ``port`` left (see mole_ds.train.shm)."""
    from ..train.shm import release_port_buffers

    return release_port_buffers(port)


def ds_config(micro_batch: int, stage: int = 0, grad_clip: float = 1.0) -> dict:
    """A DeepSpeed config for one-rank study runs (fp32; stage 0 has the least overhead on CPU)."""
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": grad_clip, "bf16": {"enabled": False}, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}


@dataclass
class RunResult:
    """What a finished (or failed) launch left behind."""

    out_dir: Path
    ok: bool
    wall_s: float
    error: str | None = None
    eval: dict = field(default_factory=dict)
    """The last eval line of metrics.jsonl: ``loss/<domain>`` and ``loss/all``."""
    train_losses: list[float] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    """summary.json (MoLE runs only; the launcher writes none for ``model.train_base``)."""

    def checkpoint(self) -> Path | None:
        """The newest ``checkpoints/stepN`` directory."""
        tags = sorted((self.out_dir / "checkpoints").glob("step*"), key=lambda p: int(p.name[4:] or 0))
        return tags[-1] if tags else None


def read_run(out_dir: Path) -> tuple[dict, list[float], dict]:
    """(last eval record, train losses, summary) of a run directory."""
    last_eval, losses = {}, []
    mpath = out_dir / "metrics.jsonl"
    if mpath.is_file():
        for line in mpath.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "eval" and any(k.startswith("loss/") for k in rec):
                last_eval = {k: v for k, v in rec.items() if k.startswith("loss/")}
            elif rec.get("kind") == "train":
                losses.append(rec["loss"])
    spath = out_dir / "summary.json"
    summary = json.loads(spath.read_text()) if spath.is_file() else {}
    return last_eval, losses, summary


def launch_train(out_dir: str | Path, overrides: dict, ds: dict, world: int = 1, timeout: int = 3600) -> RunResult:
    """Run ``deepspeed --num_gpus world launchers/train.py --deepspeed <ds> --section.key value ...``.

    ``overrides`` maps "section.key" to a value (lists are joined with commas). The DeepSpeed config and the
    full log (``train.log``) are written into ``out_dir``. A failed launch returns ok=False with the last error
    line; it never raises."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds_path = out_dir / "ds_config.json"
    ds_path.write_text(json.dumps(ds, indent=1))
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(world), "--master_port",
           str(port), str(LAUNCHER), "--deepspeed", str(ds_path), "--train.output_dir", str(out_dir)]
    for k, v in overrides.items():
        cmd += [f"--{k}", ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    (out_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, env=study_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        log, code = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as exc:
        log, code = f"{exc.stdout or ''}{exc.stderr or ''}\ntimed out after {timeout}s", -1
    wall = time.perf_counter() - t0
    release_shm(port)
    (out_dir / "train.log").write_text(log if isinstance(log, str) else str(log))
    last_eval, losses, summary = read_run(out_dir)
    if code != 0:
        errs = [ln for ln in log.splitlines() if ("Error" in ln or "error:" in ln) and "File " not in ln]
        return RunResult(out_dir, False, wall, (errs[-1] if errs else f"exit code {code}")[:500], last_eval, losses,
                         summary)
    return RunResult(out_dir, True, wall, None, last_eval, losses, summary)
