"""Build the model, apply MoLE + expert parallelism, and hand everything to DeepSpeed's engine."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..parallel import (EPContext, apply_activation_checkpointing, create_expert_groups, is_expert_param,
                        patch_model_expert_parallel)
from ..parallel.deepspeed_compat import (check_deepspeed_version, coalesce_persistent_gathers, full_numel,
                                         is_persistent, local_numel, moe_marker, split_moe_param_groups)
from ..config import MoLEConfig
from ..mole.experts import is_expert_name
from ..patching import PatchReport
from ..runtime import bound_cpu_kernel_caches, rank, world_size
from .config import RunConfig
from .model_loading import build_model, cast_unpartitioned, ds_stage, model_dtype, resolve_precision

def unfreeze_base(model: torch.nn.Module) -> PatchReport:
    """Full training of the LLM and projector (no MoLE); the vision tower stays frozen."""
    from ..patching import find_language_model, find_projector

    for p in model.parameters():
        p.requires_grad_(False)
    parts = [find_language_model(model), find_projector(model), getattr(model, "lm_head", None)]
    for part in parts:
        if part is not None:
            for p in part.parameters():
                p.requires_grad_(True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return PatchReport(type(model).__name__, len(find_language_model(model).layers), 0, trainable_params=n_train,
                       total_params=sum(p.numel() for p in model.parameters()), trainable_by_kind={"base": n_train})


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


@dataclass
class TrainSetup:
    engine: Any
    optimizer: Any
    scheduler: Any
    processor: Any
    report: PatchReport
    ep: EPContext | None
    ds_config: dict
    mole: MoLEConfig
    """The MoLE config this run uses: the run config's, with ``ep_size: auto`` resolved to a number."""
    precision: str
    """The precision resolved from the DeepSpeed config ('bf16' or 'fp32'; ``bf16.enabled: auto`` decided)."""


def param_groups(model: torch.nn.Module, stage: int, ep_size: int, weight_decay: float, lr: float,
                 projector_lr: float = 0.0, router_lr: float = 0.0) -> list[dict]:
    """Trainable params in optimizer groups, each with its peak ``lr``: LoRA experts in a group of their own
    ('experts', so that their optimizer state can be measured apart), the rest split by weight decay; the
    projector and the routers get groups of their own only when they get their own rate (``projector_lr`` /
    ``router_lr`` > 0), so runs without them keep the optimizer layout of earlier checkpoints. ZeRO-1/2 with
    expert parallelism turns the expert group into DeepSpeed 'moe' groups (reduced over the expert-data-parallel
    group)."""
    own = {"projector": projector_lr, "router": router_lr}
    buckets: dict[str, list] = {}

    def kind(name: str) -> str:
        if is_expert_name(name):
            return "experts"
        if own["router"] > 0 and ".router." in name:
            return "router"
        if own["projector"] > 0 and "multi_modal_projector." in name:
            return "projector"
        return ""

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        k = kind(name)
        if k != "experts":
            k = "_".join(filter(None, (k, "no_decay" if (p.ndim < 2 or name.endswith(".bias")) else "decay")))
        buckets.setdefault(k, []).append(p)
    order = ["decay", "no_decay", "experts", "projector_decay", "projector_no_decay", "router_decay",
             "router_no_decay"]
    groups = []
    for name in order:
        if buckets.get(name):
            base = name.split("_")[0]
            groups.append({"params": buckets[name], "name": name,
                           "weight_decay": 0.0 if name.endswith("no_decay") else weight_decay,
                           "lr": own.get(base) or lr})
    if stage in (1, 2) and ep_size > 1:
        groups = [g for g in split_moe_param_groups(groups) if g["params"]]
    return groups


def strip_ds_config(ds: dict) -> tuple[dict, dict]:
    """(DeepSpeed's part, our 'mole' part): DeepSpeed never sees keys it does not know."""
    ds = copy.deepcopy(ds)
    ours = ds.pop("mole_ds", {}) or {}
    return ds, ours


def resolve_auto_ep_size(cfg: RunConfig, ds: dict, model) -> int:
    """``mole.ep_size: auto``: measure the all-to-all on this process group, predict every placement's expert
    traffic with the cost model, print the table on rank 0 and return the cheapest (the same on every rank)."""
    from ..parallel import cost_model as cm

    world = world_size()
    if world == 1:
        return 1
    link = cm.calibrate()
    w = cm.workload_from(cm.model_dims(model), cfg.mole, ds, world, seq_len=cfg.data.max_length)
    from ..parallel.memory_model import ep_sizes_that_fit

    # Placements whose predicted peak exceeds this GPU's memory are skipped; None (no GPU budget, e.g. on CPU)
    # leaves the choice to the cost model alone.
    fits = ep_sizes_that_fit(model.config, cfg.mole, ds, world, cfg.data.max_length,
                             checkpointing=cfg.train.gradient_checkpointing)
    chosen, costs = cm.choose_ep_size(w, link, allowed=fits)
    if rank() == 0:
        print("[mole_ds] mole.ep_size auto (tokens per rank from data.max_length):\n"
              + cm.format_table(w, costs, chosen, link), flush=True)
    return chosen


def setup_training(cfg: RunConfig, ds: dict, total_steps: int | None = None,
                   base_dir: str | Path | None = None, prepare_model=None) -> TrainSetup:
    """Model, ``mole.ep_size: auto`` resolved (returned in ``TrainSetup.mole``; ``cfg`` is not changed), groups,
    MoLE patch (this rank's experts only), optimizer, schedule, ``deepspeed.initialize``."""
    import deepspeed

    bound_cpu_kernel_caches()  # before the first matmul of this process (mole_ds.runtime)
    check_deepspeed_version()
    ds, precision = resolve_precision(ds)
    if rank() == 0:
        print(f"[mole_ds] precision: {precision}", flush=True)
    model, processor = build_model(cfg.model, ds, seed=cfg.train.seed)
    mole = cfg.mole
    if mole.ep_size == "auto":
        mole = dataclasses.replace(mole, ep_size=1 if cfg.model.train_base else resolve_auto_ep_size(cfg, ds, model))
    ep = create_expert_groups(mole.ep_size) if mole.ep_size > 1 else None
    if base_dir is not None and cfg.model.path is None and rank() == 0:
        # The embedded base is built from a seed; keep it beside the run so exports can be loaded onto it.
        model.save_pretrained(base_dir)
        processor.save_pretrained(base_dir)
    torch.manual_seed(cfg.train.seed)  # expert init depends on (seed, layer, expert) only, not on ep_size
    if cfg.model.train_base:
        report = unfreeze_base(model)
    else:
        report = patch_model_expert_parallel(model, mole, ep)
    stage = ds_stage(ds)
    if ep is not None and stage in (1, 2):
        model.add_module("deepspeed_moe_marker", moe_marker(mole.num_experts, mole.ep_size))
    cast_unpartitioned(model, model_dtype(cfg.model, ds))  # the new MoLE tensors; partitioned ones already are
    if prepare_model is not None:  # e.g. tests forcing a routing, before DeepSpeed partitions anything
        prepare_model(model)
    if cfg.train.gradient_checkpointing:
        apply_activation_checkpointing(model)
    t = cfg.train
    groups = param_groups(model, stage, mole.ep_size, t.weight_decay, t.lr, t.projector_lr, t.router_lr)
    if rank() == 0:
        rates = sorted({(g["name"].split("_")[0] if g["name"] not in ("decay", "no_decay") else "base", g["lr"])
                        for g in groups})
        print("[mole_ds] learning rates (peak; warmup then cosine): "
              + ", ".join(f"{k} {v:g}" for k, v in rates)
              + f"; activation checkpointing {'on' if t.gradient_checkpointing else 'off'}", flush=True)
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8)
    steps = total_steps or cfg.train.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.train.warmup_steps, steps, cfg.train.min_lr_ratio))
    ds = dict(ds)
    ds.setdefault("zero_allow_untested_optimizer", True)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                 config=ds)
    if stage == 3:
        coalesce_persistent_gathers(engine.optimizer)
    return TrainSetup(engine, opt, sched, processor, report, ep, ds, mole=mole, precision=precision)


def expert_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(expert bytes, other bytes) of parameters held on this rank between steps. ZeRO-3: the local partition,
    plus the full copy that ZeRO-3 keeps of a persistent (small) tensor."""
    ex = other = 0
    for name, p in model.named_parameters():
        n = local_numel(p) * p.element_size()
        if is_persistent(p):  # ZeRO-3 keeps a full copy of a small tensor beside its partition
            n += full_numel(p) * p.element_size()
        if is_expert_param(p) or is_expert_name(name):
            ex += n
        else:
            other += n
    return ex, other


__all__ = ["TrainSetup", "build_model", "setup_training", "check_deepspeed_version", "strip_ds_config",
           "expert_bytes", "param_groups", "warmup_cosine"]
