#!/usr/bin/env python
"""Expert-parallel cost per rank: a few training steps of a tiny patched model on N CPU ranks.

    python tools/bench_ep.py [--world 4] [--experts 4 16 64] [--ep 1 2 4] [--stage 3] [--json out.json]

Prints, per (experts, ep_size): expert and base parameter bytes per rank, optimizer-state bytes per rank,
median step time, tokens/s and all-to-all bytes per step. Expert bytes per rank should fall as 1/ep_size.
"""
from __future__ import annotations

import argparse
import json
import sys

from mole_ds.train.sweep import run_point


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    rows = []
    hdr = (f"{'experts':>7} {'ep':>3} {'expert B/rank':>14} {'x ep1':>6} {'base B/rank':>12} {'optim B/rank':>13} "
           f"{'step s':>7} {'tok/s':>7} {'a2a B/step':>11}")
    print(f"world={a.world} ZeRO-{a.stage}\n{hdr}")
    for E in a.experts:
        base = None
        for ep in a.ep:
            if ep > a.world or a.world % ep or E % ep:
                continue
            r = run_point(a.world, {"experts": E, "ep": ep, "stage": a.stage, "steps": a.steps, "seq": a.seq})
            rows.append(r)
            if "error" in r:
                print(f"{E:>7} {ep:>3}  FAILED: {r['error']}", flush=True)
                continue
            base = base or r["expert_param_bytes_per_rank"]
            print(f"{E:>7} {ep:>3} {r['expert_param_bytes_per_rank']:>14,} "
                  f"{r['expert_param_bytes_per_rank'] / base:>6.2f} {r['base_param_bytes_per_rank']:>12,} "
                  f"{r['optimizer_state_bytes_per_rank']:>13,} {r['step_s']:>7.3f} {r['tokens_per_s']:>7.0f} "
                  f"{r['all_to_all_bytes_per_step_per_rank']:>11,.0f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"world": a.world, "stage": a.stage, "rows": rows}, f, indent=2)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
