#!/usr/bin/env python
"""The LLaVA-MoLE domain-conflict experiment in miniature, trained in this process (see docs/conflict_study.md).

    python tools/conflict_study.py --out runs/conflict_study              # the published study (~23 min, 2 CPU cores)
    python tools/conflict_study.py --out runs/cq --quick                   # table variant, 2 seeds: ~30 s
    python tools/conflict_study.py --out runs/cs --variants rule --seeds 0 1 2 --attn-lora true
    python tools/conflict_study.py --out runs/cs_pre --base smollm2 --base-layers 6 --variants rule --rule-symbols 8 \
        --steps-per-domain 30 --batch 16 --arms mix mix_matched oracle mole_sparse_sample_mi   # pretrained base
    python tools/conflict_study.py --out runs/sal --variants rule --salience         # the domain's visibility, no training

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


def salience_report(cfg: ConflictConfig) -> int:
    import json
    from pathlib import Path

    from mole_ds.studies.conflict import salience_of

    rows = salience_of(cfg)
    print(f"| base | variant | seed | layer | domain R2 | slot R2 | mean / spread | k-means I(domain; "
          f"cluster) bits (of {rows[0]['max_bits']:.2f}) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {cfg.base} | {r['variant']} | {r['seed']} | {r['layer']} | {r['domain_r2']:.3f} | "
              f"{' / '.join(f'{x:.3f}' for x in r['slot_r2'])} | {r['mean_to_spread']:.1f} | "
              f"{r['kmeans_mi_bits']:.2f} |")
    out = Path(cfg.out) / "salience.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": {"base": cfg.base, "base_layers": cfg.base_layers}, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/conflict_study")
    ap.add_argument("--quick", action="store_true", help="table variant, 2 seeds, small sizes (a few minutes)")
    ap.add_argument("--salience", action="store_true",
                    help="train nothing: per seed and layer of the frozen base, how much of the pooled prompt a "
                         "sample-level router sees is the domain (mole_ds.studies.salience); writes OUT/salience.json")
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
    if a.salience:
        return salience_report(cfg)
    res = run_study(cfg)
    print()
    print(res["paths"]["md"].read_text())
    for k, p in res["paths"].items():
        print(f"{k}: {p}")
    print(f"study wall time {res['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
