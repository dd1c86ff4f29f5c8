"""Expert-parallel layout: where this rank sits (groups come from DeepSpeed's registry, see deepspeed_compat).

With world W and ep_size P, expert-parallel groups are consecutive ranks ([0..P-1], [P..2P-1], ...) and
expert-data-parallel groups strided ranks ([0, P, 2P, ...], ...): a rank owns the experts
``[ep_rank * E/P, (ep_rank + 1) * E/P)`` and shares them with its expert-data-parallel peers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..config import ConfigError, check_ep_size
from . import deepspeed_compat


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


def create_expert_groups(ep_size: int) -> EPContext:
    """Create (or reuse) DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep_size``."""
    if not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed; call deepspeed.init_distributed() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    problems = check_ep_size(ep_size, world)
    if problems:
        raise ConfigError(problems, "invalid expert parallel layout")
    name, ep_group, edp_group, ep_rank = deepspeed_compat.expert_groups(ep_size)
    return EPContext(ep_size=ep_size, ep_rank=ep_rank, group_name=name, ep_group=ep_group, edp_group=edp_group,
                     world_size=world, rank=rank)
