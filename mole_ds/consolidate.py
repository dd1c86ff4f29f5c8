"""Consolidation without ranks: read DeepSpeed's own per-rank checkpoint files and rebuild every trainable
tensor (and its Adam moments) in full, in one process, with no process group.

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

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .export import CHECKPOINT_MARKER, CONSOLIDATED_NAME, FORMAT

MOMENTS = ("exp_avg", "exp_avg_sq")


def is_expert_name(name: str) -> bool:
    """Expert tensors by name (``...mlp.experts.<tensor>``): the name-level twin of
    ``mole_ds.parallel.deepspeed_compat.is_expert_param`` for files that hold no live parameters."""
    return ".experts." in name


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


def _load(path: Path) -> dict:
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


def _marker(tag: Path) -> dict:
    p = tag / CHECKPOINT_MARKER
    if not p.is_file():
        raise FileNotFoundError(f"{tag} is not a complete mole_ds checkpoint (no {CHECKPOINT_MARKER})")
    return json.loads(p.read_text())


def resolve_tag(src: str | Path) -> Path:
    """A checkpoint tag directory as given, or the newest verified tag of a training output_dir (or of its
    ``checkpoints/`` folder)."""
    src = Path(src)
    if (src / CHECKPOINT_MARKER).is_file():
        return src
    from .train.checkpoint import find_resume  # verification lives with the writer

    for root in (src / "checkpoints", src):
        if root.is_dir():
            tag = find_resume("auto", root)
            if tag is not None:
                return tag
    raise FileNotFoundError(f"{src}: no verified mole_ds checkpoint tag (a directory with {CHECKPOINT_MARKER}) "
                            "in it or in its checkpoints/ folder")


def _groups_of(rank: int, world: int, ep: int, expert: bool) -> list[int]:
    """The ranks a tensor of ``rank`` is partitioned over, in partition order."""
    if not expert or ep == 1:
        return list(range(world))
    return [r for r in range(world) if r % ep == rank % ep]


def read_full_state(tag: str | Path, moments: bool = True) -> FullState:
    """Rebuild every trainable tensor of a checkpoint tag (see the module docstring)."""
    tag = Path(tag)
    meta = _marker(tag)
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
        raise ValueError(f"{tag}: {world} ranks' files but {CHECKPOINT_MARKER} says world_size {meta['world_size']}")
    if world % ep:
        raise ValueError(f"{tag}: world size {world} is not a multiple of ep_size {ep}")
    loaded = {p: _load(p)["param_shapes"] for p in set(model_files.values())}
    shapes = {r: loaded[p] for r, p in model_files.items()}
    optim = {r: _load(p)["optimizer_state_dict"] for r, p in optim_files.items()}
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
    sd = _load(files[0])
    module = sd["module"]
    trainable = meta.get("trainable")
    weights = {n: t.float() for n, t in module.items() if trainable is None or n in trainable}
    if int(meta.get("ep_size", 1)) > 1:
        raise ValueError(f"{tag}: an unpartitioned checkpoint with ep_size {meta['ep_size']} is not supported")
    return FullState(weights=weights, zero_stage=0, world_size=int(meta.get("world_size", 1)),
                     ep_size=1, order=list(weights))


def consolidated_metadata(tag: Path) -> dict[str, str]:
    """The metadata training writes into the tag's mole.safetensors, rebuilt from the marker."""
    meta = _marker(tag)
    cfg = meta.get("mole")
    if cfg is None and (tag / CONSOLIDATED_NAME).is_file():  # checkpoints whose marker has no config
        from safetensors import safe_open

        with safe_open(str(tag / CONSOLIDATED_NAME), framework="pt") as f:
            cfg = json.loads((f.metadata() or {})["mole_config"])
    if cfg is None:
        raise ValueError(f"{tag}: the marker records no MoLE config ('mole') and there is no {CONSOLIDATED_NAME}")
    extra = {"step": meta.get("step"), **(meta.get("export_extra") or {})}
    return {"format": FORMAT, "mole_config": json.dumps({**cfg, "ep_size": 1}), "extra": json.dumps(extra)}


def consolidate(src: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``out`` (a file, or a directory that receives mole.safetensors) from a checkpoint tag or output_dir:
    every trainable tensor in full, as training's own consolidated file. ``dtype``: the tensors' dtype (default:
    the dtype recorded in the marker, else float32)."""
    from safetensors.torch import save_file

    tag = resolve_tag(src)
    state = read_full_state(tag, moments=False)
    meta = _marker(tag)
    if dtype is None:
        dtype = getattr(torch, meta.get("param_dtype", "float32"))
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / CONSOLIDATED_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: state.weights[n].to(dtype).contiguous() for n in state.order if n in state.weights}
    save_file(tensors, str(out), metadata=consolidated_metadata(tag))
    return out


def write_full_model(consolidated: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """The full model for inference: ``out/base/`` (the base model as ``save_pretrained`` writes it, with its
    processor) and ``out/mole.safetensors`` (load both with ``mole_ds.inference.load_for_inference``)."""
    import shutil

    from .export import read_consolidated
    from .inference import load_base

    _, _, extra = read_consolidated(consolidated)
    base = base or extra.get("base_model")
    if not base:
        raise ValueError(f"{consolidated}: no base model recorded; pass base")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor, _ = load_base(base)
    model.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")
    target = out / CONSOLIDATED_NAME
    if Path(consolidated).resolve() != target.resolve():
        shutil.copyfile(consolidated, target)
    return out
