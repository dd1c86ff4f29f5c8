"""A measured probe run: a few real training steps of a patched tiny model on synthetic batches.

Launched once per configuration by tools/bench_ep.py and tools/scaling_study.py::

    deepspeed --num_gpus N mole_ds/train/probe.py --out point.json --experts 16 --ep 2 --stage 3

Rank 0 writes one JSON record: step time (median of measured steps), tokens/s, per-rank peak memory,
expert / base parameter bytes and optimizer-state bytes per rank (max over ranks), all-to-all bytes per
step, and load balance (max/mean tokens per expert, routing entropy, experts never used).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch


def _opt_state_bytes(engine) -> int:
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    total = 0
    for st in getattr(opt, "state", {}).values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--routing", default="sparse")
    args = ap.parse_args(argv)

    import deepspeed
    import torch.distributed as dist

    from mole_ds.config import MoLEConfig
    from mole_ds.mole.collect import aux_loss, routing_counts
    from mole_ds.parallel import all_to_all_bytes
    from mole_ds.train.config import ModelSection, RunConfig, TrainSection
    from mole_ds.train.engine import expert_bytes, setup_training

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    from mole_ds.train.shm import release_own_shm_buffer

    release_own_shm_buffer()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = RunConfig(model=ModelSection(tiny_layers=args.layers, tiny_hidden=args.hidden),
                    mole=MoLEConfig(num_experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=2.0 * args.rank,
                                    dropout=0.0, routing=args.routing, ep_size=args.ep, backend=args.backend),
                    train=TrainSection(lr=1e-3, warmup_steps=0, max_steps=args.steps + args.warmup))
    zero = {"stage": args.stage}
    if args.stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0})
    ds = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
          "zero_optimization": zero, "bf16": {"enabled": False}, "steps_per_print": 10**9}
    setup = setup_training(cfg, ds)
    engine, model = setup.engine, setup.engine.module
    vocab = model.config.text_config.vocab_size
    dev = engine.device
    g = torch.Generator().manual_seed(rank)
    times, a2a = [], []
    counts = None
    for step in range(args.warmup + args.steps):
        ids = torch.randint(5, vocab, (args.micro_batch, args.seq), generator=g).to(dev)
        t0 = time.perf_counter()
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        engine.backward(out.loss + aux_loss(model))
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        sent = sum(all_to_all_bytes(model).values())
        c = routing_counts(model)
        if step >= args.warmup:
            times.append(dt)
            a2a.append(sent)
            counts = c if counts is None else counts + c
    ex_b, other_b = expert_bytes(model)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    local = torch.tensor([statistics.median(times), ex_b, other_b, _opt_state_bytes(engine), peak,
                          statistics.mean(a2a)], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    dist.all_reduce(counts)
    if rank == 0:
        per_rank = torch.stack(gathered)
        tot = counts.sum(0).double()
        p = tot / tot.sum().clamp_min(1)
        step_s = float(per_rank[:, 0].max())  # the slowest rank sets the pace
        rec = {
            "experts": args.experts, "ep_size": args.ep, "world_size": world, "zero_stage": args.stage,
            "top_k": args.top_k, "lora_rank": args.rank, "hidden": args.hidden, "layers": args.layers,
            "step_s": step_s, "tokens_per_s": world * args.micro_batch * args.seq / step_s,
            "expert_param_bytes_per_rank": int(per_rank[:, 1].max()),
            "base_param_bytes_per_rank": int(per_rank[:, 2].max()),
            "optimizer_state_bytes_per_rank": int(per_rank[:, 3].max()),
            "peak_memory_bytes_per_rank": int(per_rank[:, 4].max()),
            "all_to_all_bytes_per_step_per_rank": float(per_rank[:, 5].mean()),
            "load_max_over_mean": float(tot.max() / tot.mean()) if tot.sum() > 0 else 0.0,
            "routing_entropy": float(-(p[p > 0] * p[p > 0].log()).sum()),
            "routing_entropy_max": math.log(args.experts),
            "experts_never_used": int((tot == 0).sum()),
        }
        Path(args.out).write_text(json.dumps(rec, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
