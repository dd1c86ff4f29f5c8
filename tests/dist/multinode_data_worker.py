"""One rank that reads one epoch of training data with the run's loader and records which samples it saw
(tests/dist/test_multinode.py): ids_rank{r}.json in --out, with the rank and world the loader resolved."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch.distributed as dist

from mole_ds.data import DataConfig, build_loader
from mole_ds.models.processor import build_tiny_processor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    loader = build_loader(DataConfig(urls=args.manifest, batch_size=2, max_length=128, num_workers=0, shuffle_buffer=1000),
                          build_tiny_processor(image_size=32, patch_size=8))
    ids = [i for batch in loader for i in batch["ids"]]
    rec = {"rank": dist.get_rank(), "world": dist.get_world_size(), "loader_rank": loader.rank,
           "node_rank": int(os.environ.get("GROUP_RANK", -1)), "ids": ids}
    Path(args.out, f"ids_rank{dist.get_rank()}.json").write_text(json.dumps(rec))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
