"""DeepSpeed's CPU shared-memory all-reduce op (deepspeed_shm_comm) creates
``/dev/shm/deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank>`` (~66 MB per rank) and never unlinks it, even
on a clean exit; /dev/shm is RAM, so a machine running many jobs fills up. Each process removes its own
buffer as soon as every rank has attached to every peer's (they do so inside init_distributed; a barrier
after it proves all have): the mappings stay valid until the processes exit, and even a crashed or killed
job then leaves nothing behind."""
from __future__ import annotations

import os
from pathlib import Path


def release_own_shm_buffer() -> int:
    """Barrier, then unlink this process's DeepSpeed shm buffer(s); returns how many were removed."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK", os.environ.get("LOCAL_RANK"))
    if port is None or rank is None:
        return 0
    return _unlink_buffers(f"deepspeed_allreduce_buffer_*_{port}_{rank}")


def release_port_buffers(port: int) -> int:
    """Unlink every DeepSpeed shm buffer of the finished launch on ``port`` (covers a launch killed before
    its ranks released their own); returns how many were removed."""
    return _unlink_buffers(f"deepspeed_allreduce_buffer_*_{port}_*")


def _unlink_buffers(pattern: str) -> int:
    shm = Path("/dev/shm")
    n = 0
    for f in (shm.glob(pattern) if shm.is_dir() else ()):
        try:
            f.unlink()
            n += 1
        except OSError:
            pass
    return n
