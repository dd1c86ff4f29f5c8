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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--ep", default="1", help="expert-parallel degree, or 'auto' (the cost model decides)")
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
    ap.add_argument("--persistence", type=int, default=-1,
                    help="ZeRO-3 stage3_param_persistence_threshold (-1: DeepSpeed's default)")
    args = ap.parse_args(argv)

    import deepspeed
    import torch.distributed as dist

    from mole_ds.config import MoLEConfig
    from mole_ds.mole.collect import routing_counts
    from mole_ds.mole.experts import is_expert_name
    from mole_ds.parallel import comm_stats
    from mole_ds.parallel import cost_model as cm
    from mole_ds.parallel.deepspeed_compat import ZeroCommMeter, optimizer_state_bytes
    from mole_ds.train.config import ModelSection, RunConfig, TrainSection
    from mole_ds.train.engine import expert_bytes, setup_training
    from mole_ds.train.step import train_step

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    from mole_ds.train.shm import release_own_shm_buffer

    release_own_shm_buffer()
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = args.ep if args.ep == "auto" else int(args.ep)
    cfg = RunConfig(model=ModelSection(tiny_layers=args.layers, tiny_hidden=args.hidden),
                    mole=MoLEConfig(num_experts=args.experts, top_k=args.top_k, rank=args.rank, alpha=2.0 * args.rank,
                                    dropout=0.0, routing=args.routing, ep_size=ep, backend=args.backend),
                    train=TrainSection(lr=1e-3, warmup_steps=0, max_steps=args.steps + args.warmup))
    cfg.data.max_length = args.seq
    zero = {"stage": args.stage}
    if args.stage == 3 and args.persistence >= 0:
        zero["stage3_param_persistence_threshold"] = args.persistence
    ds = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
          "zero_optimization": zero, "bf16": {"enabled": False}, "steps_per_print": 10**9}
    link = cm.calibrate()  # before training, on a quiet group: what the cost model predicts from
    setup = setup_training(cfg, ds)
    mole = setup.mole  # ep_size "auto" resolved
    engine, model = setup.engine, setup.engine.module
    vocab = model.config.text_config.vocab_size
    g = torch.Generator().manual_seed(rank)
    times, fwd_b, bwd_b, rows = [], [], [], []
    counts = None

    def step():
        ids = torch.randint(5, vocab, (args.micro_batch, args.seq), generator=g)
        train_step(engine, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}])
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for i in range(args.warmup + args.steps):
        comm_stats(model)
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        st = comm_stats(model)
        c = routing_counts(model)
        if i >= args.warmup:
            times.append(dt)
            fwd_b.append(st.fwd_bytes)
            bwd_b.append(st.bwd_bytes)
            rows.append(st.fwd_rows)
            counts = c if counts is None else counts + c
    with ZeroCommMeter() as meter:  # one more, untimed step: the logger synchronises every collective
        step()
    ex_names = {id(p) for n, p in model.named_parameters() if is_expert_name(n)}
    ex_opt, other_opt = optimizer_state_bytes(engine, lambda p: id(p) in ex_names)
    ex_b, other_b = expert_bytes(model)
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    local = torch.tensor([statistics.median(times), ex_b, other_b, ex_opt + other_opt, peak,
                          statistics.mean(fwd_b), statistics.mean(bwd_b), statistics.mean(rows), ex_opt,
                          meter.total_bytes], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    dist.all_reduce(counts)
    if rank == 0:
        per_rank = torch.stack(gathered)
        tot = counts.sum(0).double()
        p = tot / tot.sum().clamp_min(1)
        step_s = float(per_rank[:, 0].max())  # the slowest rank sets the pace
        layers = args.layers
        a2a_rows = float(per_rank[:, 7].mean())
        w = cm.workload_from(cm.model_dims(model), mole, ds, world, seq_len=args.seq)
        rec = {
            "experts": args.experts, "num_experts": args.experts, "ep_size": mole.ep_size,
            "ep_requested": args.ep, "world_size": world, "zero_stage": args.stage,
            "top_k": args.top_k, "lora_rank": args.rank, "hidden": args.hidden, "hidden_size": args.hidden,
            "layers": layers, "tokens_per_rank": args.micro_batch * args.seq,
            "step_s": step_s, "step_s_median": step_s, "step_times_rank0": times,
            "tokens_per_s": world * args.micro_batch * args.seq / step_s,
            "expert_param_bytes_per_rank": int(per_rank[:, 1].max()),
            "base_param_bytes_per_rank": int(per_rank[:, 2].max()),
            "optimizer_state_bytes_per_rank": int(per_rank[:, 3].max()),
            "expert_optim_bytes_per_rank": int(per_rank[:, 8].max()),
            "peak_memory_bytes_per_rank": int(per_rank[:, 4].max()),
            "a2a_bytes_fwd": float(per_rank[:, 5].mean()), "a2a_bytes_bwd": float(per_rank[:, 6].mean()),
            "all_to_all_bytes_per_step_per_rank": float((per_rank[:, 5] + per_rank[:, 6]).mean()),
            # Every remote (token, expert) row crosses twice in forward (out, then its output back), once
            # per layer: bytes / (rows / 2) is the forward cost of one remote row in one layer.
            "a2a_fwd_bytes_per_remote_row_layer": (float(per_rank[:, 5].mean()) / (a2a_rows / 2)
                                                   if a2a_rows else 0.0),
            "zero_comm_msg_bytes_per_step": float(per_rank[:, 9].mean()),
            "zero_comm_by_op_rank0": meter.bytes_by_op,
            "link_alpha_s": link.alpha_s, "link_beta_Bps": link.beta_Bps,
            "predicted_comm_s": {str(c.ep_size): c.comm_s for c in cm.choose_ep_size(w, link)[1]},
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
