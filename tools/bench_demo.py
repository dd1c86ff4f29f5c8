#!/usr/bin/env python
"""The main job's step time, this code against an earlier commit, launched alternately in one run.

    python tools/bench_demo.py [--old c73c5cb] [--precisions fp32 bf16] [--rounds 3] \
        [--json docs/results/demo_step_time.json]

For each round and precision, the demo (``make demo``'s command: 2 CPU ranks, ``ds_configs/zero3_ep.json``,
``launchers/configs/demo.yaml``, 150 steps with its evaluations and checkpoints) is launched once with the old
commit's code (a temporary git worktree, its own demo data and shipped ZeRO-3 config) and once with this tree,
alternating which goes first. Each code runs its own shipped DeepSpeed config with only ``bf16.enabled`` set
(fp32: false, bf16: true), so a precision compares like with like. The figure per (code, precision) is the
median over rounds of each launch's ``summary.json`` ``median_step_s``; the table gives new / old.
Extra arguments after ``--`` go to both codes' launchers (e.g. ``-- --train.max_steps 60``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(tree: Path, precision: str, out: Path) -> Path:
    ds = json.loads((tree / "ds_configs" / "zero3_ep.json").read_text())
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": precision == "bf16"}
    path = out / f"zero3_ep_{precision}.json"
    path.write_text(json.dumps(ds, indent=1))
    return path


def run_demo(tree: Path, precision: str, out: Path, extra: list[str], env: dict) -> dict:
    """One demo launch of the code in ``tree``; its summary (or an error with the log's tail)."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(tree, precision, out)
    from mole_ds.runtime import free_port

    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "launchers/train.py",
           "--deepspeed", str(cfg), "--config", "launchers/configs/demo.yaml",
           "--train.output_dir", str(out / "run"), *extra]
    res = subprocess.run(cmd, cwd=tree, env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    (out / "log.txt").write_text(res.stdout + res.stderr)
    summary = out / "run" / "summary.json"
    if res.returncode != 0 or not summary.is_file():
        return {"error": f"exit {res.returncode}: {(res.stdout + res.stderr)[-1500:]}"}
    s = json.loads(summary.read_text())
    return {"median_step_s": s["median_step_s"], "wall_s": s.get("wall_s"), "steps": s.get("steps")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="c73c5cb", help="the earlier commit (default: the code issue 10 measured)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from mole_ds.train.env import launch_env

    env = launch_env()
    new_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        tmp = Path(tmp)
        old_tree = tmp / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(old_tree), a.old], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {"old": old_tree, "new": ROOT}
            for name, tree in trees.items():  # each code's own demo data (its shard format)
                subprocess.run([sys.executable, "tools/make_demo_data.py", "--out", "demo_data"], cwd=tree,
                               env={**env, "PYTHONPATH": str(tree)}, check=True, capture_output=True)
            runs = []
            for r in range(a.rounds):
                for prec in a.precisions:
                    for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                        res = run_demo(trees[name], prec, tmp / f"{name}_{prec}_{r}", extra, env)
                        if "error" in res:
                            raise SystemExit(f"{name} ({prec}, round {r}) failed: {res['error']}")
                        res.update(code=name, precision=prec, round=r)
                        runs.append(res)
                        print(f"round {r} {prec:4s} {name}: median step {res['median_step_s']:.4f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, capture_output=True)

    rows = []
    for prec in a.precisions:
        med = {c: statistics.median(x["median_step_s"] for x in runs if x["code"] == c and x["precision"] == prec)
               for c in ("old", "new")}
        rows.append({"precision": prec, "old_step_s": med["old"], "new_step_s": med["new"],
                     "new_over_old": med["new"] / med["old"], "reduction_pct": 100 * (1 - med["new"] / med["old"])})
    print(f"\nmake demo median step time, {a.rounds} alternating rounds (old {a.old}, new {new_commit}"
          f"{' + uncommitted changes' if dirty else ''})")
    print(f"{'precision':>9} | {'old s':>7} | {'new s':>7} | {'new/old':>7} | {'lower by':>8}")
    for row in rows:
        print(f"{row['precision']:>9} | {row['old_step_s']:7.4f} | {row['new_step_s']:7.4f} | "
              f"{row['new_over_old']:7.3f} | {row['reduction_pct']:7.1f}%")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "what": "make demo (2 CPU ranks, gloo, ZeRO-3, ep_size 2, E=4) median step time, old code vs new, "
                    "each code with its own shipped zero3_ep.json and only bf16.enabled set",
            "old_commit": a.old, "new_commit": new_commit, "new_dirty": dirty, "rounds": a.rounds,
            "extra_args": extra, "cpu_count": os.cpu_count(), "rows": rows, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
