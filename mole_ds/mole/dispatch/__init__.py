"""Dispatch backends: how routed tokens reach their LoRA experts and come back.

One interface, several implementations, chosen by ``MoLEConfig.backend``:

* ``loop``: per-expert masked loop over the original token order. The reference; always runs.
* ``torch``: dropless grouped path: sort rows by expert, ``torch.nn.functional.grouped_mm`` over the
  groups, scatter back. CPU and CUDA, no extra packages.
* ``megablocks``: CUDA only; MegaBlocks ops for the permutation and grouped GEMM for the LoRA products.

Every backend provides the same four steps (see :class:`Backend`): plan, gather, grouped_lora, scatter.
A token dispatcher drives them: :class:`LocalDispatcher` (every expert here) or the expert-parallel one in
``mole_ds.parallel``, which puts one all-to-all after ``gather`` and one before ``scatter``.
"""
from __future__ import annotations

import torch

from .base import Backend, LocalDispatcher, Plan, scatter_rows, sort_plan
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
    "Backend", "LocalDispatcher", "Plan", "scatter_rows", "sort_plan", "LoopBackend", "TorchGroupedBackend", "MegaBlocksBackend",
    "get_backend", "resolve_backend_name", "megablocks_available",
]
