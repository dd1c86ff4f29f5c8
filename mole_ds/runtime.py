"""Process facts every layer needs: this process's rank and world size (1 process when no process group is
initialised), a barrier that is a no-op without one, a free TCP port on the loopback for a new launch, and the
bound on the CPU matmul kernels' caches that a MoLE run needs.

The one home of these helpers: modules import them from here instead of writing their own."""
from __future__ import annotations

import os
import socket
from typing import MutableMapping

import torch.distributed as dist


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """World size (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    """Barrier over the default group; nothing without a process group."""
    if dist.is_initialized():
        dist.barrier()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a launch's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPU_KERNEL_CACHE_CAPACITY = 128
"""Entries kept by each of PyTorch's CPU matmul caches (oneDNN's primitive cache and ideep's computation cache;
1,024 each by default)."""

CPU_KERNEL_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_cpu_kernel_caches(environ: MutableMapping[str, str] | None = None,
                            capacity: int = CPU_KERNEL_CACHE_CAPACITY) -> dict[str, str]:
    """Bound the CPU matmul caches to ``capacity`` entries each in ``environ`` (default: this process's
    environment), unless it already sets them; ``mole_ds.train.env.launch_env`` fills a launch's environment
    with the same defaults.

    On CPU, PyTorch runs bf16/fp32 matmuls through oneDNN (via ideep). Both libraries cache one compiled kernel
    per distinct matmul shape, 1,024 entries each, about 0.6 MiB per entry. A MoLE layer's grouped expert
    products change shape every step (the rows each expert gets), so these caches fill to capacity in a few
    steps and stay full: on the 254M stand-in (2 ZeRO-3 ranks, 1,024 tokens) heap in use grew by 580 MiB per
    rank over the first 3 steps with no tensor among it, and with 128 entries by 77 MiB, at the same step time
    (docs/scaling.md, "Memory the tensors do not explain"). Both libraries read these variables when they
    create their first kernel, so this must run before the process's first matmul; ``setup_training`` calls
    it. Returns the values in force."""
    env = os.environ if environ is None else environ
    for var in CPU_KERNEL_CACHE_VARS:
        env.setdefault(var, str(capacity))
    return {var: env[var] for var in CPU_KERNEL_CACHE_VARS}


__all__ = ["CPU_KERNEL_CACHE_CAPACITY", "barrier", "bound_cpu_kernel_caches", "free_port", "rank", "world_size"]
