"""Launch probe runs (mole_ds/train/probe.py) one configuration at a time; shared by bench_ep and the
scaling study. A failing point is recorded with its error and the sweep goes on."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from ..runtime import free_port

PROBE = Path(__file__).with_name("probe.py")


def run_point(world: int, args: dict, timeout: int = 900, env: dict | None = None) -> dict:
    """One probe launch on ``world`` ranks; returns its record, or {'error': ...} naming what failed.
    ``env`` replaces the default environment (this process's, with mole_ds.train.env.launch_env's defaults)."""
    from .env import launch_env
    from .shm import release_port_buffers

    deepspeed = Path(sys.executable).with_name("deepspeed")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "point.json"
        port = free_port()
        cmd = [str(deepspeed), "--num_gpus", str(world), "--master_port", str(port), str(PROBE),
               "--out", str(out)]
        for k, v in args.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        if env is None:
            env = launch_env()
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**args, "world_size": world, "error": f"timed out after {timeout}s"}
        finally:
            release_port_buffers(port)
        if res.returncode != 0 or not out.is_file():
            tail = [ln for ln in (res.stdout + res.stderr).splitlines() if "Error" in ln or "error" in ln]
            return {**args, "world_size": world, "error": (tail[-1] if tail else f"exit code {res.returncode}")[:500]}
        return json.loads(out.read_text())
