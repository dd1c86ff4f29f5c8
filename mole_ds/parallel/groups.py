"""Expert-parallel process groups, from DeepSpeed's own registry (deepspeed.utils.groups).

With world W and ep_size P, DeepSpeed builds expert-parallel groups of consecutive ranks
([0..P-1], [P..2P-1], ...) and expert-data-parallel groups of strided ranks ([0, P, 2P, ...], ...):
a rank owns the experts ``[ep_rank * E/P, (ep_rank + 1) * E/P)`` and shares them with its
expert-data-parallel peers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass
class EPContext:
    """Where this rank sits in the expert-parallel layout."""

    ep_size: int
    ep_rank: int
    group_name: str
    ep_group: object
    edp_group: object
    world_size: int
    rank: int

    def expert_slice(self, num_experts: int) -> tuple[int, int]:
        """(offset, count) of the experts this rank owns."""
        n = num_experts // self.ep_size
        return self.ep_rank * n, n


def check_ep_size(ep_size: int, world_size: int, num_experts: int | None = None) -> list[str]:
    """Every problem with an expert-parallel degree, named with values."""
    p = []
    if ep_size < 1:
        p.append(f"mole.ep_size ({ep_size}) must be >= 1")
        return p
    if ep_size > world_size:
        p.append(f"mole.ep_size ({ep_size}) must be <= world size ({world_size})")
    elif world_size % ep_size:
        p.append(f"world size ({world_size}) must be divisible by mole.ep_size ({ep_size})")
    if num_experts is not None and num_experts % ep_size:
        p.append(f"mole.num_experts ({num_experts}) must be divisible by mole.ep_size ({ep_size})")
    return p


def create_expert_groups(ep_size: int, num_experts: int | None = None) -> EPContext:
    """Create (or reuse) DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep_size``."""
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed; call deepspeed.init_distributed() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    problems = check_ep_size(ep_size, world, num_experts)
    if problems:
        raise ValueError("invalid expert parallel layout:\n  " + "\n  ".join(problems))
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return EPContext(ep_size=ep_size, ep_rank=groups._get_expert_parallel_rank(name), group_name=name,
                     ep_group=groups._get_expert_parallel_group(name),
                     edp_group=groups._get_expert_data_parallel_group(name), world_size=world, rank=rank)
