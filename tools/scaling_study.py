#!/usr/bin/env python
"""Many experts: step time, memory and expert / optimizer bytes per rank vs num_experts, per ep_size.

    python tools/scaling_study.py --world 4 --experts 1 2 4 8 16 32 64 128 --ep 1 2 4 --out docs/results/scaling
    python tools/scaling_study.py --world 2 --experts 4 16 --ep 1 2 --field top_k=1,2 --fixed stage=2

Every point is a real DeepSpeed launch of mole_ds/train/probe.py (``mole_ds.train.sweep.run_point``) on
--world ranks (CPU processes here, GPUs on a cluster). A failing point is recorded with its error and the sweep
goes on; rerunning the same command resumes from OUT.json (points already present are skipped; add
--retry-failed to rerun failed ones). Writes OUT.json, OUT.csv and OUT.png and prints a table.
Exit status 1 if any point failed.
"""
from __future__ import annotations

import argparse
import sys

from mole_ds.studies.scaling import PROBE_FIELDS, ScalingConfig, format_table, parse_field, run_sweep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ScalingConfig()
    ap.add_argument("--world", type=int, default=d.world, help="ranks per launch")
    ap.add_argument("--experts", type=int, nargs="+", default=d.experts)
    ap.add_argument("--ep", type=int, nargs="+", default=d.ep)
    ap.add_argument("--field", action="append", default=[], metavar="NAME=V1,V2",
                    help=f"sweep another probe field too (repeatable); names: {', '.join(PROBE_FIELDS)}")
    ap.add_argument("--fixed", action="append", default=[], metavar="NAME=V",
                    help=f"hold a probe field at a value (defaults {d.fixed})")
    ap.add_argument("--out", default=d.out, help="results prefix (OUT.json, OUT.csv, OUT.png)")
    ap.add_argument("--timeout", type=int, default=d.timeout, help="seconds per point")
    ap.add_argument("--retry-failed", action="store_true")
    a = ap.parse_args(argv)
    try:
        fields = dict(parse_field(s) for s in a.field)
        fixed = dict(d.fixed)
        fixed_names = []
        for s in a.fixed:
            name, vals = parse_field(s)
            if len(vals) != 1:
                raise ValueError(f"--fixed {s!r}: one value expected")
            fixed[name] = vals[0]
            fixed_names.append(name)
        clash = sorted(set(fields) & set(fixed_names))
        if clash:
            raise ValueError(f"{', '.join(clash)} both swept (--field) and fixed (--fixed)")
        for n in fields:
            fixed.pop(n, None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = ScalingConfig(world=a.world, experts=a.experts, ep=a.ep, fields=fields, fixed=fixed, out=a.out,
                        timeout=a.timeout, retry_failed=a.retry_failed)
    res = run_sweep(cfg)
    print()
    print(format_table(cfg, res["rows"]))
    print(f"\nresults: {cfg.out}.json {cfg.out}.csv {cfg.out}.png")
    return 1 if any("error" in r for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
