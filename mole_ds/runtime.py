"""Process facts every layer needs: this process's rank and world size (1 process when no process group is
initialised), a barrier that is a no-op without one, and a free TCP port on the loopback for a new launch.

The one home of these helpers: modules import them from here instead of writing their own."""
from __future__ import annotations

import socket

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


__all__ = ["barrier", "free_port", "rank", "world_size"]
