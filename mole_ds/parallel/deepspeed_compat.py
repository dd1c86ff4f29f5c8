"""Every DeepSpeed internal that mole_ds relies on, in one place.

DeepSpeed has no public API for a custom expert layer under ZeRO-3, so expert parallelism uses (pinned:
``deepspeed>=0.19.3,<0.20``; ``tests/unit/test_deepspeed_compat.py`` checks each against the installed
version, ``tests/dist`` checks the behaviour):

* the private expert-group registry ``deepspeed.utils.groups`` (``_create_expert_and_data_parallel`` and its
  getters): expert-parallel groups of consecutive ranks, expert-data-parallel groups of strided ranks;
* per-parameter tags read by the engine and ZeRO:
  - ``allreduce=False`` + ``group_name``: the engine broadcasts the tensor only inside its expert-data-parallel
    group at start-up (otherwise rank 0's experts would overwrite every rank's) and ZeRO-1/2 reduce it there;
  - ``ds_zero_partition_process_group``: ZeRO-3 partitions the tensor over the expert-data-parallel group;
  - ``ds_zero_placement_family="autoep_expert"`` + ``ds_zero_partition_group_name``: ZeRO-3 averages its
    gradient over the whole data-parallel world (the scale of every other gradient) and adds it to the
    global gradient norm across the expert-parallel group (AutoEP's expert family);
* the ZeRO-1/2 MoE marker: the engine reduces expert gradients over the expert-data-parallel group only when
  it believes the model has ``deepspeed.moe.layer.MoE`` layers (an isinstance check), and the optimizer needs
  expert tensors in their own ``moe`` parameter groups;
* the ZeRO-3 optimizer's persistent-parameter gather (``persistent_parameters``, ``_post_step``,
  ``checkpoint_event_epilogue``): see :func:`coalesce_persistent_gathers`;
* ZeRO-3 parameter attributes (``ds_id``, ``ds_tensor``, ``ds_numel``, ``ds_persist``): :func:`is_partitioned`,
  :func:`gathered`, :func:`local_numel`, :func:`full_numel`, :func:`is_persistent`.

Four modules outside this one also depend on DeepSpeed internals, each because its whole job is a DeepSpeed
format, and each is covered by its own tests against the pinned range:

* ``mole_ds/checkpoint/deepspeed_files.py`` reads DeepSpeed's per-rank checkpoint files (their keys and
  layout, and the DeepSpeed classes they pickle, allowed by name for ``weights_only`` loading);
* ``mole_ds/train/elastic.py`` writes re-sliced weights and Adam state into the ZeRO optimizers' partitions
  (ZeRO-3 ``_get_fp32_opt_state_partition`` / ``_get_param_partition_*``; ZeRO-1/2 ``_hp_mapping`` fragments);
* ``mole_ds/train/model_loading.py`` loads a checkpoint straight into ``param.ds_tensor`` partitions inside
  ``deepspeed.zero.Init``;
* ``mole_ds/train/ds_schema.py`` validates a DeepSpeed config against DeepSpeed's own config models.
"""
from __future__ import annotations

import torch
import torch.nn as nn

TESTED_RANGE = ((0, 19, 3), (0, 20, 0))
EXPERT_FAMILY = "autoep_expert"
TAGS = ("allreduce", "group_name", "ds_zero_partition_process_group", "ds_zero_placement_family",
        "ds_zero_partition_group_name")


def parse_version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())


def check_deepspeed_version(version: str | None = None) -> None:
    """Refuse a DeepSpeed outside the tested range, naming both."""
    import deepspeed

    v = version or deepspeed.__version__
    lo, hi = TESTED_RANGE
    if not (lo <= parse_version(v) < hi):
        raise RuntimeError(f"deepspeed {v} is outside the tested range >={'.'.join(map(str, lo))},"
                           f"<{'.'.join(map(str, hi))}: expert parallelism uses its internal ZeRO attributes "
                           "(mole_ds/parallel/deepspeed_compat.py)")


def group_name(ep_size: int) -> str:
    """DeepSpeed's registry key for the groups of one expert-parallel degree."""
    return f"ep_size_{ep_size}"


def expert_groups(ep_size: int) -> tuple[str, object, object, int]:
    """(name, expert-parallel group, expert-data-parallel group, rank in the expert-parallel group), created in
    DeepSpeed's registry on first use (so its engine finds them by name)."""
    from deepspeed.utils import groups

    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return (name, groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name),
            groups._get_expert_parallel_rank(name))


def tag_expert_param(p: nn.Parameter, name: str, edp_group) -> None:
    """Mark one expert tensor as owned by this rank's expert-parallel slice (see the module docstring)."""
    p.allreduce = False
    p.group_name = name
    p.ds_zero_partition_process_group = edp_group
    p.ds_zero_placement_family = EXPERT_FAMILY
    p.ds_zero_partition_group_name = name


def is_expert_param(p: nn.Parameter) -> bool:
    """True for a tensor tagged by :func:`tag_expert_param` (sharded across the expert-parallel group)."""
    return getattr(p, "allreduce", True) is False


def moe_marker(num_experts: int, ep_size: int) -> nn.Module:
    """A parameter-less ``deepspeed.moe.layer.MoE`` that never runs: with it ZeRO-1/2 reduce tagged expert
    gradients over the expert-data-parallel group. (ZeRO-3 needs no marker: it reads the per-tensor tags.)"""
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.expert_group_name = group_name(ep_size)
            self.num_local_experts = 0  # DeepSpeed then writes/reads no MoE expert files of its own

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # our groups already exist

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a marker for DeepSpeed's engine and is never called")

    return DeepSpeedMoEMarker()


def split_moe_param_groups(groups: list[dict]) -> list[dict]:
    """ZeRO-1/2 with expert parallelism: expert tensors in their own 'moe' optimizer groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups)


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 partitioned parameter (it carries ``ds_id``; its ``data`` is empty until gathered)."""
    return hasattr(p, "ds_id")


def gathered(*params: torch.Tensor, modifier_rank: int | None = None):
    """Context in which every ZeRO-3 partitioned tensor of ``params`` holds its full value (a collective over
    its partition group; ``modifier_rank``: the rank whose writes are kept); a no-op for the others."""
    import contextlib

    parts = [p for p in params if is_partitioned(p)]
    if not parts:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank)


def local_numel(p: torch.Tensor) -> int:
    """Elements of ``p`` held by this rank (ZeRO-3: its partition)."""
    t = getattr(p, "ds_tensor", None)
    return int(t.numel()) if t is not None else int(p.numel())


def is_persistent(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 persistent tensor (small: kept whole on every rank beside its partition)."""
    return is_partitioned(p) and bool(getattr(p, "ds_persist", False))


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole tensor (ZeRO-3 partitioned tensors report it in ds_numel)."""
    return int(getattr(p, "ds_numel", p.numel()))


def optimizer_state_bytes(engine, is_expert) -> tuple[int, int]:
    """(expert, other) bytes of optimizer state held on this rank: Adam moments plus ZeRO's fp32 partition of
    the weights. ``is_expert(param)`` classifies parameters; ZeRO keeps one flat fp32 partition per
    (sub)group, so expert tensors must be in groups of their own (``param_groups`` does that)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        pairs = zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat)
    elif hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        pairs = zip(opt.bit16_groups, opt.single_partition_of_fp32_groups)
    else:  # no ZeRO: the torch optimizer holds the parameters themselves
        pairs = ((g["params"], None) for g in base.param_groups)
    expert = other = 0
    for params, flat in pairs:
        kinds = {bool(is_expert(p)) for p in params}
        if len(kinds) > 1:
            raise ValueError("an optimizer group mixes expert and other tensors; cannot split its state")
        keys = [flat] if flat is not None else list(params)
        n = 0
        for k in keys:
            if flat is not None:
                n += k.numel() * k.element_size()  # the fp32 weight partition
            for v in base.state.get(k, {}).values():
                if torch.is_tensor(v) and v.dim() > 0:
                    n += v.numel() * v.element_size()
        if kinds == {True}:
            expert += n
        else:
            other += n
    return expert, other


def gather_persistent(params: list) -> None:
    """All-gather the released ones of ZeRO-3 persistent ``params``: one flat collective per (partition group,
    dtype), not one per tensor. The lists are the same, in the same order, on every rank."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    todo = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if any(getattr(p, "ds_secondary_tensor", None) is not None for p in todo):
        # ZeRO++ hierarchical partitions (zero_hpz_partition_size > 1): the coalesced gather would read the
        # secondary copies, which still hold the values from before this step; DeepSpeed's own call reads
        # the primary ones and then invalidates the copies. Leave it to DeepSpeed.
        return
    if todo:
        todo[0].all_gather_coalesced(todo).wait()


def coalesce_persistent_gathers(zero3_optimizer) -> bool:
    """Make ZeRO-3's re-gather of persistent parameters one collective per group instead of one per tensor.

    ZeRO-3 keeps small tensors (``stage3_param_persistence_threshold``: every norm, bias, router and, in a
    small model, everything) whole on every rank. But every optimizer step releases all parameters and then
    re-gathers the persistent ones with ``all_gather(persistent_parameters)``, which issues one collective per
    tensor: on 2 gloo ranks of the demo model that was about a quarter of the step, and on NCCL it is a
    launch per norm per layer. Gathering them first, coalesced, leaves DeepSpeed's own call nothing to do (it
    skips tensors that are already whole). Returns False (nothing changed) for an optimizer without these
    internals."""
    if not (hasattr(zero3_optimizer, "persistent_parameters") and hasattr(zero3_optimizer, "_post_step")):
        return False

    def wrap(fn):
        def gathered_first(*args, **kwargs):
            gather_persistent(zero3_optimizer.persistent_parameters)
            return fn(*args, **kwargs)
        return gathered_first

    zero3_optimizer._post_step = wrap(zero3_optimizer._post_step)
    if hasattr(zero3_optimizer, "checkpoint_event_epilogue"):
        zero3_optimizer.checkpoint_event_epilogue = wrap(zero3_optimizer.checkpoint_event_epilogue)
    return True


class ZeroCommMeter:
    """Bytes of every collective DeepSpeed issues through ``deepspeed.comm`` (ZeRO's gathers, reduce-scatters,
    all-reduces) while active, per operation, from DeepSpeed's own comms logger.

    Sizes are the logger's message sizes (the full tensor of the call: for an all-gather the gathered output),
    not the bytes on the wire, which are (n-1)/n of that for n ranks. The logger synchronises every op, so
    measure in a step that is not timed::

        with ZeroCommMeter() as meter:
            ...one training step...
        meter.bytes_by_op   # {"all_gather_into_tensor": ..., "reduce_scatter_tensor": ...}
    """

    def __init__(self) -> None:
        self.bytes_by_op: dict[str, int] = {}
        self.calls_by_op: dict[str, int] = {}

    def __enter__(self) -> "ZeroCommMeter":
        from deepspeed.comm import comm

        self._logger = comm.comms_logger
        self._saved = (self._logger.enabled, self._logger.prof_all, self._logger.verbose)
        self._logger.reset_data() if hasattr(self._logger, "reset_data") else self._logger.comms_dict.clear()
        self._logger.enabled, self._logger.prof_all, self._logger.verbose = True, True, False
        return self

    def __exit__(self, *exc) -> None:
        for name, sizes in self._logger.comms_dict.items():
            op = name.split("|")[0].strip()
            for size, rec in sizes.items():
                self.bytes_by_op[op] = self.bytes_by_op.get(op, 0) + int(size) * int(rec[0])
                self.calls_by_op[op] = self.calls_by_op.get(op, 0) + int(rec[0])
        self._logger.comms_dict.clear()
        self._logger.enabled, self._logger.prof_all, self._logger.verbose = self._saved

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_op.values())
