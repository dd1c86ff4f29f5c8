"""Shard LLaVA-format domains into WebDataset tars (local folder or s3://), or verify written shards.

  python tools/shard_data.py --domain general=data/general.json:data/images \
      --domain medical=data/med.parquet --output s3://bucket/mole/v1 --max-samples 5000 --workers 4
  python tools/shard_data.py --verify s3://bucket/mole/v1/manifest.json

See docs/data.md.  Exit status: 0 ok, 1 problems found (--verify) or bad input under --strict, 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mole_ds.data import DomainSource, ShardConfig, shard_dataset, verify
from mole_ds.data.sharding import ShardingError


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", action="append", default=[], metavar="NAME=DATA[:IMAGE_ROOT]",
                    help="an input domain (repeatable): LLaVA .json, .jsonl, .parquet or a save_to_disk folder")
    ap.add_argument("--output", help="local folder or s3://bucket/prefix")
    ap.add_argument("--max-samples", type=int, default=10_000, help="samples per shard at most")
    ap.add_argument("--max-bytes", type=_size, default=1 << 30, help="bytes per shard at most (e.g. 512M)")
    ap.add_argument("--shuffle-seed", type=int, default=None, help="shuffle each domain with this seed")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes")
    ap.add_argument("--strict", action="store_true", help="any bad input record is an error")
    ap.add_argument("--verify", metavar="URL_OR_MANIFEST", help="verify shards instead of writing them")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if a.verify:
        rep = verify(a.verify, workers=max(1, a.workers), progress=not a.no_progress)
        print(f"verified {rep.shards} shard(s), {rep.samples} good sample(s)")
        for d, n in sorted(rep.domain_counts.items()):
            print(f"  {d:<20} {n:>10}")
        for p in rep.problems:
            print(f"PROBLEM {p}")
        print("OK" if rep.ok else f"FAILED: {len(rep.problems)} problem(s)")
        return 0 if rep.ok else 1

    if not a.domain or not a.output:
        ap.error("--domain (at least one) and --output are required unless --verify is given")
    try:
        cfg = ShardConfig([DomainSource.parse(s) for s in a.domain], a.output, a.max_samples, a.max_bytes,
                          a.shuffle_seed, a.workers, a.strict, progress=not a.no_progress)
        m = shard_dataset(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ShardingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(m['shards'])} shard(s) to {a.output}")
    print(f"  {'domain':<20} {'samples':>10} {'shards':>7} {'skipped':>8}  reasons")
    for d, info in m["domains"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(info["skipped"].items()))
        print(f"  {d:<20} {info['samples']:>10} {info['shards']:>7} {sum(info['skipped'].values()):>8}  {reasons}")
    dups = [w for w in m.get("warnings", []) if w["kind"] == "cross_domain_duplicate_id"]
    if dups:
        shown = "; ".join(f"{w['id']!r} in {' and '.join(w['domains'])}" for w in dups[:5])
        print(f"WARNING: {len(dups)} sample id(s) used in more than one domain (kept in each; listed in the "
              f"manifest's warnings), e.g. {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
