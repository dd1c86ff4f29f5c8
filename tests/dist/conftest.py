"""Shared fixtures of the distributed tests: launched runs that several modules assert on, started once per
session (a DeepSpeed start costs seconds per rank; on a 2-core CI machine the launches are most of the suite)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import launch, make_demo_data, run, train_cmd


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """Demo shards and three launcher runs (full 6 steps; 3 steps then resume to 6), shared by the modules."""
    root = tmp_path_factory.mktemp("launcher")
    data = make_demo_data(root / "data", train_per_domain=24, eval_per_domain=8, max_samples=8)
    full, part = root / "full", root / "part"
    r_full = run(train_cmd(data, full, "--train.max_steps", "6"), root / "full.log")
    run(train_cmd(data, part, "--train.max_steps", "6", "--train.run_steps", "3"), root / "part1.log")
    r_resumed = run(train_cmd(data, part, "--train.max_steps", "6", "--checkpoint.resume", "auto"), root / "part2.log")
    return {"root": root, "data": data, "full": full, "part": part, "full_out": r_full.stdout,
            "resumed_out": r_resumed.stdout}


@pytest.fixture(scope="session")
def worker_run(tmp_path_factory):
    """``worker_run(nprocs, *args) -> out dir``: a tests/dist/worker.py launch, run once per session for each
    distinct (nprocs, args) whichever modules ask for it (test_expert_parallel, test_elastic and
    test_consolidate share their reference and checkpoint-writing runs). The log is ``tests.support.log_of(out)``.

    MOLE_TEST_REUSE=<dir> keeps the launches there and reuses finished ones across sessions (for iterating on
    the asserts)."""
    reuse = os.environ.get("MOLE_TEST_REUSE")
    root = Path(reuse) if reuse else tmp_path_factory.mktemp("worker")
    done: dict[tuple, Path] = {}

    def get(nprocs: int, *args: str) -> Path:
        key = (nprocs, *map(str, args))
        if key not in done:
            # A readable, unique name: w<n>_<args without dashes>, resume paths replaced by their run's name.
            parts = [f"w{nprocs}"]
            for a in key[1:]:
                p = Path(a)
                parts.append(f"from-{p.parents[1].name}-{p.name}" if p.is_absolute() else a.lstrip("-"))
            out = root / "_".join(parts).replace("/", "-")
            if not (reuse and (out / "final.safetensors").is_file()):
                launch(nprocs, out, *args)
            done[key] = out
        return done[key]

    return get
