"""The reader of DeepSpeed's per-rank checkpoint files: every trainable tensor (and its Adam moments) of a
checkpoint tag rebuilt in full, in one process, with no process group.

DeepSpeed's ``zero_to_fp32.py`` assumes every flat fp32 partition is split over the whole data-parallel world.
Expert tensors are not: ZeRO-3 partitions them over the expert-data-parallel group (``world / ep_size`` ranks)
and ZeRO-1/2 keep them in their own optimizer groups partitioned over that group, and each expert-parallel rank
holds different experts under the same tensor name. ``zero_to_fp32.py`` therefore stops with "consumed N
numels out of M" on our expert-parallel checkpoints. This module knows the layout:

* ranks ``r`` with the same ``r % ep_size`` form one expert-data-parallel group (DeepSpeed's groups: expert
  parallel = consecutive ranks, expert data parallel = strided ranks), partition index ``r // ep_size``;
* ZeRO-3: every tensor is partitioned on its own, ``ceil(numel / g)`` elements per rank of its group of size
  ``g`` (the world for shared tensors, ``world / ep_size`` for expert tensors), laid end to end in the rank's
  flat fp32 groups in the order of ``param_shapes``;
* ZeRO-1/2: each optimizer group is one flat vector (with the alignment paddings DeepSpeed records) split into
  equal partitions over its group (``partition_count``), the last one saved without its padding;
* an expert tensor's full value is the concatenation over expert-parallel ranks along dim 0 (ep rank ``e``
  owns experts ``[e * n, (e + 1) * n)``).

Every file is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..mole.experts import is_expert_name
from .layout import MARKER, read_marker

MOMENTS = ("exp_avg", "exp_avg_sq")
"""The Adam state tensors a checkpoint carries per trainable tensor."""

@dataclass
class FullState:
    """Every trainable tensor of a checkpoint, whole: fp32 weights and the Adam moments (when present)."""

    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {exp_avg, exp_avg_sq}
    step: int | None = None  # the optimizer's step count
    zero_stage: int = 0
    world_size: int = 1
    ep_size: int = 1
    order: list[str] = field(default_factory=list)  # names in the model's parameter order



def _deepspeed_globals() -> list:
    """The DeepSpeed classes its optimizer files pickle (a loss scaler, the ZeRO stage enum, ZeRO-1/2's fragment addresses): allowed by name
    for ``weights_only`` loading, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_ds_file(path: str | Path) -> dict:
    """One DeepSpeed checkpoint file, loaded with ``weights_only=True`` (DeepSpeed's own pickled classes allowed
    by name, nothing else)."""
    with torch.serialization.safe_globals(_deepspeed_globals()):
        return torch.load(str(path), map_location="cpu", weights_only=True)



def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    if not m:
        raise ValueError(f"{path}: not a DeepSpeed ZeRO per-rank file name")
    return int(m.group(1))


def _files(tag: Path, kind: str) -> dict[int, Path]:
    out = {_rank_of(p): p for p in tag.glob(f"*zero_pp_rank_*_mp_rank_*_{kind}.pt")}
    return dict(sorted(out.items()))



def model_state_files(tag: str | Path) -> list[Path]:
    """The model_states files of a tag, rank order: one per rank (ZeRO-3) or DeepSpeed's single one (ZeRO 0-2)."""
    tag = Path(tag)
    return sorted(tag.glob("zero_pp_rank_*_model_states.pt"), key=_rank_of) or sorted(tag.glob("mp_rank_*_model_states.pt"))


def rank0_model_file(tag: str | Path) -> Path:
    """Rank 0's model_states file (the engine's counters, scheduler and the client state live there)."""
    files = sorted(Path(tag).glob("zero_pp_rank_0_mp_rank_*_model_states.pt")) or sorted(Path(tag).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag}: no DeepSpeed model_states file of rank 0")
    return files[0]


def has_optimizer_partitions(tag: str | Path) -> bool:
    """Whether a tag holds ZeRO optimizer partitions (ZeRO-1/2/3; a stage-0 checkpoint has none)."""
    return bool(_files(Path(tag), "optim_states"))


def client_states(tag: str | Path) -> list[dict]:
    """The client state saved in every model_states file of a tag (rank order)."""
    return [load_ds_file(f) for f in model_state_files(tag)]


def _groups_of(rank: int, world: int, ep: int, expert: bool) -> list[int]:
    """The ranks a tensor of ``rank`` is partitioned over, in partition order."""
    if not expert or ep == 1:
        return list(range(world))
    return [r for r in range(world) if r % ep == rank % ep]


def read_full_state(tag: str | Path, moments: bool = True) -> FullState:
    """Rebuild every trainable tensor of a checkpoint tag (see the module docstring)."""
    tag = Path(tag)
    meta = read_marker(tag)
    ep = int(meta.get("ep_size", 1))
    model_files, optim_files = _files(tag, "model_states"), _files(tag, "optim_states")
    if not optim_files:
        return _read_unpartitioned(tag, meta, moments)
    world = len(optim_files)
    if not model_files:  # ZeRO-1/2: one model file (rank 0's); every ep rank's local shapes are the same
        single = sorted(tag.glob("mp_rank_*_model_states.pt"))
        if not single:
            raise FileNotFoundError(f"{tag}: optimizer partitions but no DeepSpeed model_states file")
        model_files = {r: single[0] for r in range(world)}
    if sorted(optim_files) != list(range(world)) or sorted(model_files) != list(range(world)):
        raise ValueError(f"{tag}: per-rank files for ranks {sorted(optim_files)} (optimizer) and "
                         f"{sorted(model_files)} (model); expected 0..{world - 1} for both")
    if meta.get("world_size") not in (None, world):
        raise ValueError(f"{tag}: {world} ranks' files but {MARKER} says world_size {meta['world_size']}")
    if world % ep:
        raise ValueError(f"{tag}: world size {world} is not a multiple of ep_size {ep}")
    loaded = {p: load_ds_file(p)["param_shapes"] for p in set(model_files.values())}
    shapes = {r: loaded[p] for r, p in model_files.items()}
    optim = {r: load_ds_file(p)["optimizer_state_dict"] for r, p in optim_files.items()}
    stage = int(optim[0]["zero_stage"])
    if stage == 3:
        pieces, step = _zero3_pieces(shapes, optim, world, ep, moments)
    elif stage in (1, 2):
        pieces, step = _zero12_pieces(shapes, optim, world, ep, moments)
    else:
        raise ValueError(f"{tag}: unsupported ZeRO stage {stage}")
    full = _assemble(pieces, ep)
    order = [n for g in shapes[0] for n in g]
    return FullState(weights=full.pop("fp32"), moments=_by_name(full), step=step, zero_stage=stage,
                     world_size=world, ep_size=ep, order=order)


def _by_name(full: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensors in full.items():
        for n, t in tensors.items():
            out.setdefault(n, {})[key] = t
    return out


def _assemble(pieces: dict[str, dict[int, dict[str, torch.Tensor]]], ep: int) -> dict[str, dict[str, torch.Tensor]]:
    """pieces[key][ep_rank][name] -> full tensors (experts concatenated over ep ranks in order)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, per_ep in pieces.items():
        names = per_ep[0].keys()
        res = {}
        for n in names:
            if is_expert_name(n) and ep > 1:
                missing = [e for e in range(ep) if n not in per_ep.get(e, {})]
                if missing:
                    raise ValueError(f"expert tensor {n} is missing on expert-parallel ranks {missing}")
                res[n] = torch.cat([per_ep[e][n] for e in range(ep)], 0).detach().contiguous()
            else:
                res[n] = per_ep[0][n].detach().contiguous()
        out[key] = res
    return out


def _zero3_pieces(shapes, optim, world, ep, moments):
    keys = ["fp32"] + (list(MOMENTS) if moments else [])
    pieces: dict[str, dict[int, dict[str, torch.Tensor]]] = {k: {} for k in keys}
    step = None
    # One flat vector per rank and key: the sub-groups end to end (the order of param_shapes).
    flats: dict[str, dict[int, torch.Tensor]] = {k: {} for k in keys}
    for r in range(world):
        sd = optim[r]
        flats["fp32"][r] = torch.cat([t.reshape(-1).float() for t in sd["fp32_flat_groups"]])
        if moments:
            st = sd["optimizer_state_dict"]["state"]
            for k in MOMENTS:
                flats[k][r] = torch.cat([st[i][k].reshape(-1).float() for i in sorted(st)])
            if st:
                step = int(torch.as_tensor(st[sorted(st)[0]].get("step", 0)).item())
    for e in range(ep):
        owner = e  # the lowest rank of the expert-data-parallel group of ep rank e
        named = [(n, torch.Size(s)) for g in shapes[owner] for n, s in g.items()]
        offsets = {r: 0 for r in range(world)}
        for k in keys:
            pieces[k][e] = {}
        for n, shape in named:
            grp = _groups_of(owner, world, ep, is_expert_name(n))
            numel = math.prod(shape)
            part = math.ceil(numel / len(grp))
            for k in keys:
                pieces[k][e][n] = torch.cat([flats[k][r][offsets[r]:offsets[r] + part] for r in grp])[:numel].view(shape)
            for r in grp:
                offsets[r] += part
        for r in _groups_of(owner, world, ep, True):
            if offsets[r] != flats["fp32"][r].numel():
                raise ValueError(f"ZeRO-3 rank {r}: consumed {offsets[r]} of {flats['fp32'][r].numel()} flat fp32 "
                                 "elements; the layout is not the one this reader knows")
    return pieces, step


def _zero12_pieces(shapes, optim, world, ep, moments):
    keys = ["fp32"] + (list(MOMENTS) if moments else [])
    pieces: dict[str, dict[int, dict[str, torch.Tensor]]] = {k: {e: {} for e in range(ep)} for k in keys}
    step = None
    n_groups = len(shapes[0])
    for e in range(ep):
        owner = e
        for gi in range(n_groups):
            group_shapes = shapes[owner][gi]
            expert = any(is_expert_name(n) for n in group_shapes)
            if expert and not all(is_expert_name(n) for n in group_shapes):
                raise ValueError(f"ZeRO optimizer group {gi} mixes expert and shared tensors")
            if not expert and e > 0:
                continue  # shared groups are identical on every ep rank: read once
            grp = _groups_of(owner, world, ep, expert)
            count = optim[owner]["partition_count"]
            count = count[gi] if isinstance(count, (list, tuple)) else count
            if count != len(grp):
                raise ValueError(f"ZeRO optimizer group {gi}: partition_count {count}, expected {len(grp)} ranks")
            paddings = (optim[owner].get("param_alignment_paddings") or [None] * n_groups)[gi]
            vecs = {"fp32": torch.cat([optim[r]["single_partition_of_fp32_groups"][gi].reshape(-1).float()
                                       for r in grp])}
            if moments:
                base = [optim[r]["base_optimizer_state"] for r in grp]
                if isinstance(base[0], dict):  # not elastic: the torch optimizer's own state_dict
                    base = [[b["state"][i] for i in sorted(b["state"])] for b in base]
                for k in MOMENTS:
                    vecs[k] = torch.cat([b[gi][k].reshape(-1).float() for b in base])
                if step is None:
                    step = optim[owner].get("base_optimizer_state_step")
                    if step is None and isinstance(base[0][gi].get("step"), (int, torch.Tensor)):
                        step = base[0][gi]["step"]
                    step = None if step is None else int(torch.as_tensor(step).item())
            off = 0
            for pi, (n, shape) in enumerate(group_shapes.items()):
                shape = torch.Size(shape)
                numel = math.prod(shape)
                for k in keys:
                    if off + numel > vecs[k].numel():
                        raise ValueError(f"ZeRO group {gi}: {n} needs elements {off}..{off + numel}, the partitions "
                                         f"hold {vecs[k].numel()}")
                    pieces[k][e][n] = vecs[k][off:off + numel].view(shape).clone()
                off += numel + (paddings[pi] if paddings is not None else 0)
    if ep > 1:  # shared tensors were read once: make them visible to every ep rank's view
        for k in keys:
            for e in range(1, ep):
                for n, t in pieces[k][0].items():
                    if not is_expert_name(n):
                        pieces[k][e].setdefault(n, t)
    return pieces, step


def _read_unpartitioned(tag: Path, meta: dict, moments: bool) -> FullState:
    """No ZeRO (stage 0): the module state is in mp_rank_00_model_states.pt; expert parallelism is not
    possible without ZeRO in mole_ds, so one file holds everything."""
    files = sorted(tag.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag}: no DeepSpeed model or optimizer state files")
    sd = load_ds_file(files[0])
    module = sd["module"]
    trainable = meta.get("trainable")
    weights = {n: t.float() for n, t in module.items() if trainable is None or n in trainable}
    if int(meta.get("ep_size", 1)) > 1:
        raise ValueError(f"{tag}: an unpartitioned checkpoint with ep_size {meta['ep_size']} is not supported")
    return FullState(weights=weights, zero_stage=0, world_size=int(meta.get("world_size", 1)),
                     ep_size=1, order=list(weights))


