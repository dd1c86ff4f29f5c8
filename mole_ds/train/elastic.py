"""Elastic resume: a checkpoint written at (world W1, ep_size P1) loaded into an engine at (W2, P2).

The layout-independent form is :func:`mole_ds.checkpoint.read_full_state`: every trainable tensor in full
(fp32 master weights) with its Adam ``exp_avg`` / ``exp_avg_sq`` and the optimizer step, rebuilt in one process
from DeepSpeed's per-rank files. Each rank of the new run then takes its own slice of it: for an expert tensor
the experts its ep rank owns (``[e * n, (e + 1) * n)`` along dim 0), and of that the elements its ZeRO partition
holds (ZeRO-3: ``ceil(numel / g)`` per rank of the tensor's partition group; ZeRO-1/2: the fragment DeepSpeed's
``_hp_mapping`` addresses), written into the fp32 master partition, the Adam state and the live module tensor.
The learning-rate scheduler, the engine's step counters and the client state come from rank 0's model file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import MOMENTS, load_ds_file, rank0_model_file, read_full_state
from ..parallel.deepspeed_compat import is_expert_param


def _local_value(p: torch.nn.Parameter, full: torch.Tensor, ep_size: int, ep_rank: int) -> torch.Tensor:
    shape = tuple(getattr(p, "ds_shape", p.shape))
    if is_expert_param(p) and ep_size > 1:
        n = shape[0]
        full = full[ep_rank * n:(ep_rank + 1) * n]
    if tuple(full.shape) != shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit this run's {shape}")
    return full


def _set_zero3(opt, p, value: torch.Tensor, key: str | None) -> None:
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    g = opt._get_param_partition_world_size(p)
    my = opt._get_param_partition_rank(p)
    flat = value.reshape(-1).float()
    padded = torch.zeros(part.numel() * g, dtype=flat.dtype)
    padded[:flat.numel()] = flat
    mine = padded[my * part.numel():(my + 1) * part.numel()]
    part.data.copy_(mine.to(part.dtype))
    if key is None:  # the module's own partition of the weight
        p.ds_tensor.data.copy_(mine[:p.ds_tensor.numel()].to(p.ds_tensor.dtype).view_as(p.ds_tensor))


def _ensure_adam_state(opt) -> None:
    """ZeRO-3 creates the Adam state lazily (first step): create it now, zeros, the way torch's Adam would, so
    the saved moments have somewhere to go."""
    base = getattr(opt, "optimizer", opt)
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", None)
    pairs = [(t, g) for g in base.param_groups for t in g["params"]]
    if flats is not None:
        pairs = [(t, base.param_groups[min(i, len(base.param_groups) - 1)]) for i, t in enumerate(flats)]
    for t, g in pairs:
        st = base.state[t]
        if "exp_avg" not in st:
            if g.get("amsgrad"):
                raise ValueError("elastic resume does not carry amsgrad's max_exp_avg_sq; use the original layout")
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)


def _set_step(opt, step: int) -> None:
    base = getattr(opt, "optimizer", opt)
    for st in base.state.values():
        if "step" in st:
            s = st["step"]
            st["step"] = torch.full_like(s, step) if torch.is_tensor(s) else step
    for g in base.param_groups:
        if "step" in g:
            g["step"] = step


def load_resharded(engine, tag: str | Path, ep_size: int, ep_rank: int) -> dict:
    """Write the checkpoint's weights and Adam state into ``engine`` (any ZeRO stage, world size, ep_size);
    restore its scheduler and step counters; return the client state saved with it (rank 0's)."""
    tag = Path(tag)
    fs = read_full_state(tag)
    if fs.step is None or not fs.moments:
        raise ValueError(f"{tag}: no Adam state found in the checkpoint; cannot resume it on another layout")
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    missing = []
    _ensure_adam_state(opt)
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: point each tensor's fragment at it
        opt._lazy_init_hp_params_optimizer_state()
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            if name not in fs.weights:
                missing.append(name)
                continue
            w = _local_value(p, fs.weights[name], ep_size, ep_rank)
            mom = {k: _local_value(p, fs.moments[name][k], ep_size, ep_rank) for k in MOMENTS}
            if stage == 3:
                _set_zero3(opt, p, w, None)
                for k in MOMENTS:
                    _set_zero3(opt, p, mom[k], k)
            elif stage in (1, 2):
                if getattr(p, "_hp_mapping", None) is not None:
                    p.set_full_hp_param(w.float())
                    for k in MOMENTS:
                        p.set_full_hp_param(mom[k].float(), k)
                p.data.copy_(w.to(p.dtype))
            else:
                p.data.copy_(w.to(p.dtype))
                st = getattr(opt, "optimizer", opt).state.setdefault(p, {})
                for k in MOMENTS:
                    st[k] = mom[k].to(p.dtype).clone()
                st.setdefault("step", torch.tensor(float(fs.step)))
    if missing:
        raise ValueError(f"{tag}: no saved state for trainable tensors {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}: not a checkpoint of this model")
    _set_step(opt, fs.step)
    sd = load_ds_file(rank0_model_file(tag))
    sched = engine.lr_scheduler
    if sched is not None and sd.get("lr_scheduler") is not None:
        # The position only: the optimizer's group count depends on the layout (ZeRO-1/2 expert groups), so
        # this run keeps its own base learning rates and recomputes every group's rate at the saved step.
        own = sched.state_dict()
        for k in ("last_epoch", "_step_count"):
            if k in sd["lr_scheduler"]:
                own[k] = sd["lr_scheduler"][k]
        sched.load_state_dict(own)
        if hasattr(sched, "get_lr") and hasattr(sched, "optimizer"):
            lrs = sched.get_lr()
            for g, lr in zip(sched.optimizer.param_groups, lrs):
                g["lr"] = lr
            sched._last_lr = list(lrs)
    for attr in ("global_steps", "global_samples", "skipped_steps"):
        if attr in sd:
            setattr(engine, attr, sd[attr])
    reserved = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "sparse_tensor_module_names",
                "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
                "ds_version", "zero_stage", "checkpoint_parallel_dimensions", "num_experts", "ds_autoep_layers"}
    return {k: v for k, v in sd.items() if k not in reserved}

