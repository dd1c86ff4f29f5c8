"""Dispatch backends: how routed tokens reach their LoRA experts and come back.

One interface, several implementations, chosen by ``MoLEConfig.backend``:

* ``loop``: per-expert masked loop over the original token order. The reference; always runs.
* ``torch``: dropless grouped path: sort rows by expert, ``torch.nn.functional.grouped_mm`` over the
  groups, scatter back. CPU and CUDA, no extra packages.
* ``megablocks``: CUDA only; MegaBlocks ops for the permutation and grouped GEMM for the LoRA products.

Every backend provides the same four steps (so the expert-parallel dispatcher can put an all-to-all
between them):

1. ``plan(expert_idx_TJ, weights_TJ, num_experts)``: which row goes where (a :class:`Plan`).
2. ``gather(x_TD, plan)``: rows grouped by expert, x_RD.
3. ``grouped_lora(x_RD, counts_E, A_ErI, B_EOr)``: each group times its expert's A then B, y_RO.
4. ``combine(y_RO, plan, num_tokens)``: weight each row and sum rows back onto their tokens, y_TO.
"""
from __future__ import annotations

import torch

from .base import Backend, LocalDispatcher, Plan
from .loop import LoopBackend
from .torch_grouped import TorchGroupedBackend
from .megablocks import MegaBlocksBackend, megablocks_available

_BACKENDS = {"loop": LoopBackend, "torch": TorchGroupedBackend, "megablocks": MegaBlocksBackend}


def resolve_backend_name(name: str, device: torch.device | str | None = None) -> str:
    """Turn 'auto' into a concrete backend for the device."""
    if name != "auto":
        if name not in _BACKENDS:
            raise ValueError(f"mole.backend ({name!r}) must be one of auto, {', '.join(_BACKENDS)}")
        return name
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and megablocks_available()[0]:
        return "megablocks"
    return "torch"


def get_backend(name: str, device: torch.device | str | None = None) -> Backend:
    """A backend instance by name ('auto' resolved for the device); a clear error if it cannot run."""
    cls = _BACKENDS[resolve_backend_name(name, device)]
    return cls()


__all__ = [
    "Backend", "LocalDispatcher", "Plan", "LoopBackend", "TorchGroupedBackend", "MegaBlocksBackend",
    "get_backend", "resolve_backend_name", "megablocks_available",
]
