"""One DeepSpeed rank of a distributed test run (launched by tests/dist/test_expert_parallel.py).

Trains the embedded tiny LLaVA-MoLE for a few steps on fixed synthetic batches. The global batch is the same
whatever the world size (each rank takes its slice), so a world-1 run is the reference for every layout.
Writes to --out: losses.json (rank 0), final.safetensors (gathered trainable state, rank 0), rank{r}.json
(what this rank holds), logits_rank{r}.pt (probe logits), and checkpoints when asked.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from mole_ds import MoLEConfig, mole_layers, routing_counts
from mole_ds.parallel import comm_stats
from mole_ds.parallel.deepspeed_compat import ZeroCommMeter
from mole_ds.export import gather_trainable_state, save_consolidated
from mole_ds.checkpoint import find_resume
from mole_ds.train.checkpoint import load_checkpoint, save_training_checkpoint
from mole_ds.train.shm import release_own_shm_buffer
from mole_ds.train.config import ModelSection, RunConfig, TrainSection
from mole_ds.train.engine import setup_training
from mole_ds.train.step import exact_match_step, forward, train_step
from mole_ds.train.zero3 import VisionSync

GLOBAL_BATCH = 4
TEXT_TOKENS = 12


def make_batch(step: int, vocab: int, image_token: int, n_img: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(5, vocab, (GLOBAL_BATCH, 1 + n_img + TEXT_TOKENS), generator=g)
    ids[:, 0] = 1
    ids[:, 1:1 + n_img] = image_token
    labels = ids.clone()
    labels[:, :1 + n_img] = -100  # every sample has the same number of supervised tokens
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)}


def make_em_batch(rank: int, vocab: int, image_token: int, n_img: int) -> dict:
    """Two held-out samples for exact match: text-only on rank 0, with images on the other ranks."""
    g = torch.Generator().manual_seed(2000 + rank)
    n = 0 if rank == 0 else n_img
    ids = torch.randint(5, vocab, (2, 1 + n + TEXT_TOKENS), generator=g)
    ids[ids == image_token] = 5
    ids[:, 0] = 1
    ids[:, 1:1 + n] = image_token
    labels = ids.clone()
    labels[:, :1 + n + TEXT_TOKENS // 2] = -100
    pixels = torch.randn(2, 3, 32, 32, generator=g) if n else torch.empty(0, 3, 32, 32)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--routing", default="weighted")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--routing-level", default="token", help="mole.routing_level: token | sample")
    ap.add_argument("--mi-coef", type=float, default=0.0, help="mole.mi_coef")
    ap.add_argument("--router-center", action="store_true", help="mole.router_center")
    ap.add_argument("--force-expert", type=int, default=-1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--save-at", type=int, default=0)
    ap.add_argument("--resume", default="none")
    ap.add_argument("--export", action="store_true")
    ap.add_argument("--grad-ckpt", action="store_true", help="train.gradient_checkpointing")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout of experts and attention")
    ap.add_argument("--persist", action="store_true",
                    help="ZeRO-3 with DeepSpeed's default persistence thresholds (the shipped configs): every tensor "
                         "of the tiny model is kept whole and re-gathered after each optimizer step")
    args = ap.parse_args()

    # A collective that waits longer than this is a hang: fail the run rather than the test's timeout.
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=180))
    release_own_shm_buffer()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mb = GLOBAL_BATCH // world
    cfg = RunConfig(
        model=ModelSection(tiny_layers=2, tiny_hidden=32),
        mole=MoLEConfig(num_experts=args.experts, top_k=args.top_k, rank=4, alpha=8.0, dropout=args.dropout,
                        routing=args.routing, routing_level=args.routing_level, mi_coef=args.mi_coef,
                        router_center=args.router_center,
                        ep_size=args.ep, balance_coef=0.01, z_loss_coef=0.001),
        train=TrainSection(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, max_steps=args.steps, seed=0,
                           gradient_checkpointing=args.grad_ckpt))
    zero = {"stage": args.stage}
    if args.stage == 3 and not args.persist:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0})
    ds = {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": zero, "bf16": {"enabled": False}, "steps_per_print": 10**9}

    def force(model):
        if args.force_expert < 0:
            return
        for layer in model.model.language_model.layers:
            with torch.no_grad():
                layer.mlp.router.weight.zero_()
                layer.mlp.router.bias.fill_(-20.0)
                layer.mlp.router.bias[args.force_expert] = 20.0

    setup = setup_training(cfg, ds, base_dir=out / "base_model", prepare_model=force)
    engine, model = setup.engine, setup.engine.module
    ep_group = setup.ep.ep_group if setup.ep is not None else None
    vocab = model.config.text_config.vocab_size
    n_img = (32 // 8) ** 2
    image_token = model.config.image_token_id

    start = 0
    tag = find_resume(args.resume, out / "checkpoints") if args.resume != "none" else None
    if tag is not None:
        client = load_checkpoint(engine, tag, args.ep, world, args.experts)
        start = int(client["step"])

    losses = []
    comm = {}
    zero_calls = {}
    for step in range(start, args.steps):
        batch = make_batch(step, vocab, image_token, n_img)
        mine = {k: v[rank * mb:(rank + 1) * mb] for k, v in batch.items()}
        comm_stats(model, reset=True)
        # The last step's ZeRO collectives, counted by DeepSpeed's own comms logger.
        meter = ZeroCommMeter() if step == args.steps - 1 else contextlib.nullcontext()
        with meter:
            rec = train_step(engine, [mine])  # the one training step the loop and the probe use
        if step == args.steps - 1:
            zero_calls = dict(meter.calls_by_op)
        # The expert all-to-all traffic of this step's forward + backward, and the routing that caused it.
        st = comm_stats(model, reset=True)
        comm = {**vars(st), "counts": routing_counts(model).tolist(), "layers": len(mole_layers(model)),
                "hidden": int(model.config.text_config.hidden_size)}
        task, aux = rec.global_means()
        losses.append(task + aux)
        if args.save_at and step + 1 == args.save_at:
            save_training_checkpoint(engine, out / "checkpoints", step + 1, {"step": step + 1},
                                     {"ep_size": args.ep, "world_size": world, "num_experts": args.experts},
                                     setup.mole, ep_group)

    # What this rank holds.
    held = {"experts": {}, "base": {}}
    for name, p in model.named_parameters():
        local = getattr(p, "ds_tensor", None)
        n_local = int(local.numel()) if local is not None else int(p.numel())
        n_full = int(getattr(p, "ds_numel", p.numel()))
        if ".experts." in name:
            held["experts"][name] = {"local_numel": n_local, "full_numel": n_full,
                                     "experts_held": int(p.ds_shape[0] if hasattr(p, "ds_shape") else p.shape[0])}
        elif not p.requires_grad:
            held["base"][name] = {"local_numel": n_local, "full_numel": n_full}
    (out / f"rank{rank}.json").write_text(json.dumps(held))
    comm["zero_calls_last_step"] = zero_calls
    comm["persistent_params"] = len(getattr(engine.optimizer, "persistent_parameters", []) or [])
    (out / f"comm_rank{rank}.json").write_text(json.dumps(comm))

    c = routing_counts(model).clone()  # last step's tokens per (layer, expert) on this rank
    dist.all_reduce(c)
    counts = c.tolist()
    state = gather_trainable_state(model, ep_group, args.ep)
    if args.export:
        save_consolidated(model, out / "export.safetensors", setup.mole, ep_group, extra={"base_model": str(out / "base_model")})
        engine.eval()
        with torch.no_grad():
            probe = make_batch(999, vocab, image_token, n_img)
            mine = {k: v[rank * mb:(rank + 1) * mb] for k, v in probe.items() if k != "labels"}
            # What the first MoLE layer saw and returned on this rank (the test recomputes it by hand).
            io = {}
            hook = mole_layers(model)[0].register_forward_hook(
                lambda m, a, y: io.update(x=a[0].detach().cpu(), y=y.detach().cpu()))
            # train_step's own forward: with no labels it clears the last step's prompt mask (sample routing
            # then pools the whole probe input, as the export's plain forward does).
            logits = forward(engine, mine).logits
            hook.remove()
        torch.save(logits.detach().cpu(), out / f"logits_rank{rank}.pt")
        torch.save(io, out / f"mlp0_io_rank{rank}.pt")
        # Exact match at evaluation, every rank decoding in step, rank 0's batch text-only: under ZeRO-3 its
        # parameter fetches must stay in step with the ranks that encode images (else a deadlock).
        sync = VisionSync(model) if args.stage == 3 else None
        em = make_em_batch(rank, vocab, image_token, n_img)
        correct = exact_match_step(model, setup.processor, em, 4, sync)
        (out / f"em_rank{rank}.json").write_text(json.dumps({"correct": correct, "images": int(em["pixel_values"].shape[0])}))
    if world > 1:  # the link figures mole.ep_size auto decides from (a collective: every rank)
        from mole_ds.parallel import cost_model

        link = cost_model.calibrate()
        (out / f"link_rank{rank}.json").write_text(json.dumps({"alpha_s": link.alpha_s, "beta_Bps": link.beta_Bps}))
    if rank == 0:
        from safetensors.torch import save_file

        save_file(state, str(out / "final.safetensors"))
        (out / "losses.json").write_text(json.dumps({"start": start, "losses": losses, "counts": counts}))
    dist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
