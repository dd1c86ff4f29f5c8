#!/usr/bin/env python
"""The LLaVA-MoLE domain-conflict experiment in miniature, trained in this process (see docs/conflict_study.md).

    python tools/conflict_study.py --out runs/conflict_study              # the published study (~23 min, 2 CPU cores)
    python tools/conflict_study.py --out runs/cq --quick                   # table variant, 2 seeds: ~1 minute
    python tools/conflict_study.py --out runs/cs --variants rule --seeds 0 1 2 --attn-lora true
    python tools/conflict_study.py --out runs/cs_pre --base smollm2 --base-layers 6 --variants rule --rule-symbols 8 \
        --steps-per-domain 30 --batch 16 --arms mix mix_matched oracle mole_sparse_sample_mi   # pretrained base

Every arm (one LoRA per domain, LoRA on the mix, rank-matched LoRA, MoLE with each learned routing mode,
oracle domain routing, a fixed input-hash split) runs on every seed's task; results.{json,csv}, table.md,
em_bars.png and routing_<variant>.png go under --out, and the markdown table is printed at the end.
A run whose record exists under --out is not run again (resume); --out refuses a study with other settings.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from mole_ds.studies.conflict import ConflictConfig, run_study


def _bool(s: str) -> bool:
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/conflict_study")
    ap.add_argument("--quick", action="store_true", help="table variant, 2 seeds, small sizes (a few minutes)")
    defaults = ConflictConfig()
    for f in fields(ConflictConfig):
        if f.name == "out":
            continue
        v = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, list):
            ap.add_argument(flag, nargs="+", type=int if f.name == "seeds" else str, default=None)
        else:
            ap.add_argument(flag, type=_bool if isinstance(v, bool) else type(v), default=None)
    a = ap.parse_args(argv)
    base = ConflictConfig.quick(a.out) if a.quick else ConflictConfig(out=a.out)
    given = {f.name: getattr(a, f.name) for f in fields(ConflictConfig)
             if f.name != "out" and getattr(a, f.name, None) is not None}
    try:
        cfg = ConflictConfig(**{**{f.name: getattr(base, f.name) for f in fields(ConflictConfig)}, **given})
    except ValueError as e:
        ap.error(str(e))
    res = run_study(cfg)
    print()
    print(res["paths"]["md"].read_text())
    for k, p in res["paths"].items():
        print(f"{k}: {p}")
    print(f"study wall time {res['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
