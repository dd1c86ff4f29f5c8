"""Consolidated export: every expert (from every rank) and every trainable weight in one safetensors file.

``save_consolidated`` is collective (all ranks call it; rank 0 writes). ``load_mole`` restores the file into a
fresh base model in a single process. The file format is :mod:`mole_ds.checkpoint.consolidated`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint.consolidated import read_consolidated, write_consolidated
from .config import MoLEConfig
from .parallel.deepspeed_compat import gathered, is_expert_param
from .patching import PatchReport, patch_model
from .runtime import barrier, rank


def gather_trainable_state(model: nn.Module, ep_group=None, ep_size: int = 1) -> dict[str, torch.Tensor]:
    """Full values of every trainable tensor; expert tensors concatenated over the expert-parallel group."""
    state: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        with gathered(p):
            t = p.data.detach().clone().cpu()
        if is_expert_param(p) and ep_size > 1:
            parts = [torch.empty_like(t) for _ in range(ep_size)]
            dist.all_gather(parts, t.contiguous(), group=ep_group)
            t = torch.cat(parts, 0)  # ep rank i owns experts [i*n, (i+1)*n): concatenation is global order
        state[name] = t.contiguous()
    return state


def save_consolidated(model: nn.Module, path: str | Path, config: MoLEConfig, ep_group=None,
                      extra: dict | None = None) -> Path | None:
    """Gather and write ``path`` (rank 0). The MoLE config travels in the file's metadata (ep_size reset to 1)."""
    state = gather_trainable_state(model, ep_group, config.ep_size)
    path = Path(path)
    if rank() == 0:
        write_consolidated(path, state, config.to_dict(), extra)
    barrier()
    return path if rank() == 0 else None


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
