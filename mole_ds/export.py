"""Consolidated export: every expert (from every rank) and every trainable weight in one safetensors file.

``save_consolidated`` is collective (all ranks call it; rank 0 writes). ``load_mole`` restores the file into a
fresh base model in a single process.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import MoLEConfig
from .patching import PatchReport, patch_model

FORMAT = "mole_ds.consolidated.v1"
CONSOLIDATED_NAME = "mole.safetensors"
"""The consolidated file's name, in every checkpoint tag and in every ``tools/export.py`` output."""
CHECKPOINT_MARKER = "mole_meta.json"
"""The file that marks a training checkpoint tag complete (written last; see mole_ds.train.checkpoint)."""


def _gathered(p: nn.Parameter):
    if hasattr(p, "ds_id"):  # ZeRO-3 partitioned: gather it (collective over its partition group)
        import deepspeed

        return deepspeed.zero.GatheredParameters([p], modifier_rank=None)
    return contextlib.nullcontext()


def gather_trainable_state(model: nn.Module, ep_group=None, ep_size: int = 1) -> dict[str, torch.Tensor]:
    """Full values of every trainable tensor; expert tensors concatenated over the expert-parallel group."""
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        with _gathered(p):
            t = p.data.detach().clone().cpu()
        if getattr(p, "allreduce", True) is False and ep_size > 1:
            parts = [torch.empty_like(t) for _ in range(ep_size)]
            dist.all_gather(parts, t.contiguous(), group=ep_group)
            t = torch.cat(parts, 0)  # ep rank i owns experts [i*n, (i+1)*n): concatenation is global order
        state[name] = t.contiguous()
    return state


def save_consolidated(model: nn.Module, path: str | Path, config: MoLEConfig, ep_group=None,
                      extra: dict | None = None) -> Path | None:
    """Gather and write ``path`` (rank 0). The MoLE config travels in the file's metadata (ep_size reset to 1)."""
    state = gather_trainable_state(model, ep_group, config.ep_size)
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = Path(path)
    if rank == 0:
        cfg = {**config.to_dict(), "ep_size": 1}
        meta = {"format": FORMAT, "mole_config": json.dumps(cfg), "extra": json.dumps(extra or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata=meta)
    if dist.is_initialized():
        dist.barrier()
    return path if rank == 0 else None


def read_consolidated(path: str | Path) -> tuple[dict[str, torch.Tensor], MoLEConfig, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mole_ds consolidated export (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    cfg = MoLEConfig.from_dict(json.loads(meta["mole_config"]))
    return load_file(str(path)), cfg, json.loads(meta.get("extra", "{}"))


def load_mole(path: str | Path, base_model: nn.Module, backend: str | None = None) -> PatchReport:
    """Patch ``base_model`` with the exported config and load every exported tensor into it.

    Every trainable tensor of the patched model must be in the file and every tensor in the file must
    exist in the model (a mismatch is an error listing the names)."""
    state, cfg, _ = read_consolidated(path)
    if backend is not None:
        cfg.backend = backend
    report = patch_model(base_model, cfg)
    params = dict(base_model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trainable - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the patched model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for name, t in state.items():
            p = params[name]
            if p.shape != t.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
    return report
