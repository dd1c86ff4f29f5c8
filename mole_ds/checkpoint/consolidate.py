"""Consolidation without ranks: a checkpoint tag's DeepSpeed files -> the consolidated ``mole.safetensors``,
tensor for tensor what training writes into the tag (``tools/consolidate.py`` is the CLI)."""
from __future__ import annotations

from pathlib import Path

import torch

from .consolidated import read_config, write_consolidated
from .deepspeed_files import read_full_state
from .layout import CONSOLIDATED_NAME, read_marker, resolve_tag


def consolidated_metadata(tag: Path) -> tuple[dict, dict]:
    """(MoLE config dict, extra) that training writes into the tag's mole.safetensors, rebuilt from the marker
    (or, for checkpoints whose marker has no config, from the tag's own consolidated file)."""
    meta = read_marker(tag)
    cfg = meta.get("mole")
    if cfg is None and (tag / CONSOLIDATED_NAME).is_file():
        cfg = read_config(tag / CONSOLIDATED_NAME)[0].to_dict()
    if cfg is None:
        raise ValueError(f"{tag}: the marker records no MoLE config ('mole') and there is no {CONSOLIDATED_NAME}")
    return cfg, {"step": meta.get("step"), **(meta.get("export_extra") or {})}


def consolidate(src: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``out`` (a file, or a directory that receives mole.safetensors) from a checkpoint tag or output_dir
    (resolved and verified by :func:`mole_ds.checkpoint.resolve_tag`): every trainable tensor in full, as
    training's own consolidated file. ``dtype``: the tensors' dtype (default: the dtype recorded in the
    marker, else float32)."""
    return consolidate_tag(resolve_tag(src), out, dtype)


def consolidate_tag(tag: Path, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    """:func:`consolidate` of a tag already resolved and verified by ``resolve_tag`` (its files are hashed
    once, not again here)."""
    state = read_full_state(tag, moments=False)
    if dtype is None:
        dtype = getattr(torch, read_marker(tag).get("param_dtype", "float32"))
    out = Path(out)
    if out.suffix != ".safetensors":
        out = out / CONSOLIDATED_NAME
    cfg, extra = consolidated_metadata(tag)
    tensors = {n: state.weights[n].to(dtype) for n in state.order if n in state.weights}
    return write_consolidated(out, tensors, cfg, extra)


__all__ = ["consolidate", "consolidate_tag", "consolidated_metadata"]
