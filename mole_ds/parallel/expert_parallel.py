"""Apply expert parallelism to a patched model: a separate step, after patching (the model stays plain)."""
from __future__ import annotations

import torch.nn as nn

from ..config import MoLEConfig
from ..patching import PatchReport, mole_layers, patch_model
from .dispatcher import ExpertParallelDispatcher
from .groups import EPContext

# DeepSpeed reads these attributes (pinned: deepspeed>=0.19.3,<0.20; tests/dist checks the behaviour):
# * allreduce=False + group_name: the engine broadcasts the tensor only inside its expert-data-parallel group
#   at start-up (otherwise rank 0's experts would overwrite every rank's) and ZeRO-1/2 reduce it there;
# * ds_zero_partition_process_group: ZeRO-3 partitions the tensor over the expert-data-parallel group only;
# * ds_zero_placement_family="autoep_expert" + ds_zero_partition_group_name: ZeRO-3 averages its gradient
#   over the whole data-parallel world (the same scale as every other gradient) and adds it to the global
#   gradient norm across the expert-parallel group.
EXPERT_FAMILY = "autoep_expert"


def tag_expert_param(p: nn.Parameter, ctx: EPContext) -> None:
    """Mark one expert tensor as owned by this rank's expert-parallel slice."""
    p.allreduce = False
    p.group_name = ctx.group_name
    p.ds_zero_partition_process_group = ctx.edp_group
    p.ds_zero_placement_family = EXPERT_FAMILY
    p.ds_zero_partition_group_name = ctx.group_name


def is_expert_param(p: nn.Parameter) -> bool:
    return getattr(p, "allreduce", True) is False


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
            tag_expert_param(p, ctx)


def all_to_all_bytes(model: nn.Module, reset: bool = True) -> dict[str, int]:
    """Bytes this rank sent to *other* ranks through the expert all-to-alls since the last reset, forward and
    backward separately: ``{"a2a_bytes_fwd": ..., "a2a_bytes_bwd": ...}`` (zeros without expert parallelism)."""
    fwd = bwd = 0
    for mlp in mole_layers(model):
        d = mlp.dispatcher
        if isinstance(d, ExpertParallelDispatcher):
            fwd += d.bytes_sent
            if reset:
                d.bytes_sent = 0
    return {"a2a_bytes_fwd": fwd, "a2a_bytes_bwd": bwd}
