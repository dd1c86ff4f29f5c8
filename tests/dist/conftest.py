"""Shared fixtures of the distributed tests."""
from __future__ import annotations

import subprocess

import pytest

from tests.dist.test_launcher import ENV, PY, ROOT, run, train_cmd


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Demo shards and three launcher runs (full 6 steps; 3 steps then resume to 6), shared by the modules."""
    root = tmp_path_factory.mktemp("launcher")
    data = root / "data"
    subprocess.run([str(PY), str(ROOT / "tools/make_demo_data.py"), "--out", str(data), "--train-per-domain", "24",
                    "--eval-per-domain", "8", "--max-samples", "8"], env=ENV, check=True, capture_output=True, cwd=ROOT)
    full, part = root / "full", root / "part"
    r_full = run(train_cmd(data, full, "--train.max_steps", "6"), root / "full.log")
    run(train_cmd(data, part, "--train.max_steps", "6", "--train.run_steps", "3"), root / "part1.log")
    r_resumed = run(train_cmd(data, part, "--train.max_steps", "6", "--checkpoint.resume", "auto"), root / "part2.log")
    return {"root": root, "data": data, "full": full, "part": part, "full_out": r_full.stdout,
            "resumed_out": r_resumed.stdout}
