"""One DeepSpeed rank that loads a checkpoint directory partitioned under ZeRO-3 (tests/dist/test_model_path.py).

Writes to --out: gathered.safetensors (rank 0: every parameter gathered back whole, by name) and
rank{r}.json (elements of each parameter this rank holds, and whether any parameter was left whole).
--model, --dtype and --out may be repeated: one launch loads each (model, dtype) in turn into its own --out.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from mole_ds.train.model_loading import load_partitioned


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--dtype", action="append", choices=("bf16", "fp32"))
    ap.add_argument("--out", action="append", required=True)
    args = ap.parse_args()
    dtypes = args.dtype or ["bf16"] * len(args.model)
    if not len(args.model) == len(dtypes) == len(args.out):
        ap.error("give --model, --dtype and --out the same number of times")

    deepspeed.init_distributed(dist_backend="gloo")
    for model_dir, dtype, out in zip(args.model, dtypes, args.out):
        load_one(model_dir, dtype, Path(out))


def load_one(model_dir: str, dtype: str, out: Path) -> None:
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    bf16 = dtype == "bf16"
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16}}
    model = load_partitioned(model_dir, ds, torch.bfloat16 if bf16 else torch.float32)

    held, whole = {}, []
    gathered = {}
    for name, p in model.named_parameters():
        if not hasattr(p, "ds_tensor"):
            whole.append(name)
            held[name] = p.numel()
            continue
        held[name] = int(p.ds_tensor.numel())
        with deepspeed.zero.GatheredParameters([p]):
            gathered[name] = p.data.detach().clone().contiguous()
    buffers = {f"buffer:{n}": b.detach().clone().contiguous() for n, b in model.named_buffers()}
    (out / f"rank{rank}.json").write_text(json.dumps({"held": held, "whole": whole,
                                                      "dtype": str(next(model.parameters()).dtype)}))
    if rank == 0:
        from safetensors.torch import save_file

        save_file({**gathered, **buffers}, str(out / "gathered.safetensors"))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
