"""Apply expert parallelism to a patched model: a separate step, after patching (the model stays plain)."""
from __future__ import annotations

import torch.nn as nn

from ..config import MoLEConfig
from ..patching import PatchReport, mole_layers, patch_model
from .all_to_all import CommStats
from .deepspeed_compat import is_expert_param, tag_expert_param
from .dispatcher import ExpertParallelDispatcher
from .groups import EPContext


def patch_model_expert_parallel(model: nn.Module, config: MoLEConfig, ctx: EPContext | None) -> PatchReport:
    """``patch_model`` building only this rank's experts, then :func:`apply_expert_parallel`.

    With ``ctx`` None or ep_size 1 the experts are replicated (plain data parallelism)."""
    if ctx is None or ctx.ep_size == 1:
        return patch_model(model, config)
    if config.ep_size != ctx.ep_size:
        raise ValueError(f"mole.ep_size ({config.ep_size}) differs from the process groups' ep_size ({ctx.ep_size})")
    offset, n_local = ctx.expert_slice(config.num_experts)
    report = patch_model(model, config, expert_offset=offset, num_local_experts=n_local)
    apply_expert_parallel(model, ctx)
    return report


def apply_expert_parallel(model: nn.Module, ctx: EPContext) -> None:
    """Swap every MoLE layer's dispatcher for the expert-parallel one and tag its expert tensors."""
    for mlp in mole_layers(model):
        cfg = mlp.config
        offset, n_local = ctx.expert_slice(cfg.num_experts)
        if (mlp.experts.expert_offset, mlp.experts.num_experts) != (offset, n_local):
            raise ValueError(f"MoLE layer {mlp.layer_idx} holds experts [{mlp.experts.expert_offset}, "
                             f"{mlp.experts.expert_offset + mlp.experts.num_experts}) but ep rank {ctx.ep_rank} of "
                             f"{ctx.ep_size} owns [{offset}, {offset + n_local})")
        mlp.dispatcher = ExpertParallelDispatcher(mlp.dispatcher.backend, ctx.ep_group, ctx.ep_size, ctx.ep_rank,
                                                  cfg.num_experts)
        for p in mlp.experts.parameters():
            tag_expert_param(p, ctx.group_name, ctx.edp_group)


def comm_stats(model: nn.Module, reset: bool = True) -> CommStats:
    """The expert all-to-all traffic of every MoLE layer since the last reset, summed (zeros without EP)."""
    total = CommStats()
    for mlp in mole_layers(model):
        s = getattr(mlp.dispatcher, "stats", None)
        if s is None:
            continue
        for f in CommStats.COUNTERS:
            setattr(total, f, getattr(total, f) + getattr(s, f))
        if reset:
            s.reset()
    return total


def all_to_all_bytes(model: nn.Module, reset: bool = True) -> dict[str, int]:
    """Bytes this rank sent to *other* ranks through the expert all-to-alls since the last reset, forward,
    backward and activation-checkpointing recompute separately: ``{"a2a_bytes_fwd": ..., "a2a_bytes_bwd": ...,
    "a2a_bytes_recompute": ...}`` (zeros without expert parallelism; the last is 0 without checkpointing)."""
    s = comm_stats(model, reset)
    return {"a2a_bytes_fwd": s.fwd_bytes, "a2a_bytes_bwd": s.bwd_bytes, "a2a_bytes_recompute": s.recompute_bytes}


__all__ = ["patch_model_expert_parallel", "apply_expert_parallel", "comm_stats", "all_to_all_bytes",
           "is_expert_param", "tag_expert_param"]
