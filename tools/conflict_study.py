#!/usr/bin/env python
"""The LLaVA-MoLE domain-conflict experiment in miniature, on real DeepSpeed runs (see docs/conflict_study.md).

    python tools/conflict_study.py --out runs/conflict_study            # the default study (~1 h, 2 CPU cores)
    python tools/conflict_study.py --out /tmp/cq --quick                 # 1 seed, tiny sizes, a few minutes
    python tools/conflict_study.py --out runs/cs --seeds 0 1 2 3 4 --rank-sweep 4 16

Steps (each skipped when its output exists, so a rerun resumes): draw + shard the conflict data, pretrain the
tiny base in full on captions, run plain LoRA per domain / on the mix / on the mix with 2x steps and MoLE on
the mix for every seed, score exact match and answer loss per held-out domain, write results.{json,csv},
table.md, em_bars.png and routing_mole/routing.png under --out.  Exit status 1 if any run failed.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from mole_ds.studies.conflict import ConflictConfig, run_study


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/conflict_study")
    ap.add_argument("--quick", action="store_true", help="1 seed, tiny sizes (pipeline check; numbers meaningless)")
    defaults = ConflictConfig()
    for f in fields(ConflictConfig):
        if f.name == "out":
            continue
        v = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, list):
            ap.add_argument(flag, nargs="*", type=int if f.name != "domains" else str, default=None)
        else:
            ap.add_argument(flag, type=type(v), default=None)
    a = ap.parse_args(argv)
    cfg = ConflictConfig.quick(a.out) if a.quick else ConflictConfig(out=a.out)
    for f in fields(ConflictConfig):
        v = getattr(a, f.name, None)
        if f.name != "out" and v is not None:
            setattr(cfg, f.name, v)
    res = run_study(cfg)
    print()
    print((res["paths"]["md"]).read_text())
    for k, p in res["paths"].items():
        print(f"{k}: {p}")
    print(f"study wall time {res['wall_s']:.0f}s")
    return 1 if res["agg"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
