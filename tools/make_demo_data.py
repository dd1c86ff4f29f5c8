#!/usr/bin/env python
"""Make the demo dataset locally and shard it:

    python tools/make_demo_data.py --out demo_data [--train-per-domain 96] [--eval-per-domain 24]

Writes LLaVA-format JSON + PNG images under OUT/raw/{train,eval}/ and WebDataset shards (with manifest.json)
under OUT/shards/{train,eval}/ via tools/shard_data.py.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from mole_ds.demo import DOMAINS, generate_demo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_data")
    ap.add_argument("--train-per-domain", type=int, default=96)
    ap.add_argument("--eval-per-domain", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-samples", type=int, default=32, help="samples per shard")
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS))
    args = ap.parse_args(argv)

    out = Path(args.out)
    splits = generate_demo(out, args.train_per_domain, args.eval_per_domain, args.seed, tuple(args.domains))
    tool = Path(__file__).with_name("shard_data.py")
    for split, domains in splits.items():
        cmd = [sys.executable, str(tool), "--output", str(out / "shards" / split), "--max-samples",
               str(args.max_samples), "--shuffle-seed", str(args.seed), "--no-progress"]
        for name, path in domains.items():
            cmd += ["--domain", f"{name}={path}:{path.parent / name / 'images'}"]
        subprocess.run(cmd, check=True)
        print(f"{split}: {out / 'shards' / split / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
