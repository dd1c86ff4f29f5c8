#!/usr/bin/env python
"""Forward+backward time of one MoLE MLP per backend and expert count, as a ratio to a plain-LoRA MLP.

    python tools/bench_mole.py                       # the issue's shape: 8192 tokens, 512 -> 1376, rank 32
    python tools/bench_mole.py --experts 1 4 --json out.json

Each row is the median of --reps timed iterations after --warmup; the ratio divides by the plain-LoRA MLP
(frozen base + one LoRA of the same rank on gate/up/down) timed in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from mole_ds import MoLEConfig
from mole_ds.mole.bench import device_sync, fwd_bwd, llama_mlp, mole_mlp, plain_lora_mlp, time_pair
from mole_ds.mole.dispatch import megablocks_available


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--experts", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    ap.add_argument("--backends", nargs="+", default=None, help="default: torch loop (+ megablocks on CUDA)")
    ap.add_argument("--routing", default="sparse", choices=["sparse", "weighted", "st", "dense"])
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    args = ap.parse_args(argv)

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = device_sync(dev)
    backends = args.backends or (["torch", "loop"] + (["megablocks"] if megablocks_available()[0] else []))
    torch.manual_seed(0)
    base = llama_mlp(args.hidden, args.intermediate, dev, dtype)
    x = torch.randn(1, args.tokens, args.hidden, device=dev, dtype=dtype)
    grad = torch.randn_like(x)
    plain_step = fwd_bwd(plain_lora_mlp(base, args.rank), x, grad)

    rows = []
    print(f"device={dev} dtype={args.dtype} tokens={args.tokens} hidden={args.hidden} "
          f"intermediate={args.intermediate} rank={args.rank} routing={args.routing} top_k={args.top_k} "
          f"threads={torch.get_num_threads()}")
    print("each MoLE row is timed alternately with the plain-LoRA MLP; ratio = MoLE / plain LoRA")
    print(f"{'backend':<10} {'experts':>7} {'mole ms':>10} {'plain ms':>10} {'ratio':>7}")
    for E in args.experts:
        for b in backends:
            cfg = MoLEConfig(num_experts=E, top_k=min(args.top_k, E), rank=args.rank, alpha=2.0 * args.rank,
                             dropout=0.0, routing=args.routing, backend=b)
            t, t_plain = time_pair(fwd_bwd(mole_mlp(base, cfg), x, grad), plain_step, args.warmup, args.reps, sync)
            rows.append({"backend": b, "experts": E, "mole_ms": 1e3 * t, "plain_lora_ms": 1e3 * t_plain,
                         "ratio": t / t_plain})
            print(f"{b:<10} {E:>7} {1e3 * t:>10.1f} {1e3 * t_plain:>10.1f} {t / t_plain:>7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": str(dev), "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
