"""Expert-parallel dispatch: a token dispatcher wrapped around a local backend.

The MoLE modules never call a collective: ``MoLEMLP`` asks its dispatcher for ``plan`` and ``lora``; this
dispatcher moves rows to the rank that owns their expert and back, and lets the local backend do the math.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mole.dispatch.base import Backend, Plan
from .all_to_all import all_to_all, exchange_counts


@dataclass
class EPPlan:
    local: Plan
    """The local plan over *global* experts (rows grouped by expert, so by owning rank)."""
    send_splits: list[int]
    recv_splits: list[int]
    regroup_Q: torch.Tensor
    """Order that turns received rows (grouped by source rank, then expert) into rows grouped by local expert."""
    restore_Q: torch.Tensor
    """Inverse of ``regroup_Q``."""
    local_counts_L: torch.Tensor
    """Received rows per local expert."""


class ExpertParallelDispatcher:
    """Dispatch over an expert-parallel group of ``ep_size`` ranks, each owning ``E / ep_size`` experts
    (rank i of the group owns experts ``[i * E_local, (i + 1) * E_local)``).

    Per layer (``plan``):
    1. group local rows by global expert with the local backend (so they are grouped by owning rank);
    2. all-to-all the (ranks, E_local) row-count matrix: every rank learns how many rows it will receive
       from each peer for each of its experts;
    3. precompute the permutation that regroups received rows by local expert (and its inverse).

    Per projection group (``lora``):
    4. all-to-all the rows (uneven splits, autograd) to the owners;
    5. regroup by local expert; grouped LoRA on the local experts (every local expert runs, even on zero
       rows, so ZeRO-3 sees the same parameter use on every rank);
    6. undo the regrouping, all-to-all the results back, weight and sum them onto their tokens.
    """

    def __init__(self, backend: Backend, group, ep_size: int, ep_rank: int, num_experts: int) -> None:
        if num_experts % ep_size:
            raise ValueError(f"mole.num_experts ({num_experts}) must be divisible by mole.ep_size ({ep_size})")
        self.backend = backend
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_experts = num_experts
        self.num_local = num_experts // ep_size
        self.bytes_sent = 0
        """Bytes this rank sent through the row all-to-alls since the counter was last reset."""

    def plan(self, expert_idx_TJ: torch.Tensor, weights_TJ: torch.Tensor, num_experts: int) -> EPPlan:
        local = self.backend.plan(expert_idx_TJ, weights_TJ, num_experts)
        send_counts = local.counts_E.view(self.ep_size, self.num_local).to(torch.int64)
        recv_counts = exchange_counts(send_counts, self.group)  # (source rank, local expert)
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        local_expert_Q = torch.repeat_interleave(
            torch.arange(self.num_local, device=recv_counts.device).repeat(self.ep_size), recv_counts.reshape(-1))
        regroup_Q = torch.argsort(local_expert_Q, stable=True)
        restore_Q = torch.empty_like(regroup_Q)
        restore_Q[regroup_Q] = torch.arange(regroup_Q.numel(), device=regroup_Q.device)
        return EPPlan(local, send_splits, recv_splits, regroup_Q, restore_Q, recv_counts.sum(0))

    def lora(self, x_TD: torch.Tensor, plan: EPPlan, pairs) -> list[torch.Tensor]:
        x_RD = self.backend.gather(x_TD, plan.local)
        x_QD = all_to_all(x_RD, plan.recv_splits, plan.send_splits, self.group)
        x_QD = x_QD.index_select(0, plan.regroup_Q)
        ys = [self.backend.grouped_lora(x_QD, plan.local_counts_L, A, B) for A, B in pairs]
        widths = [y.shape[1] for y in ys]
        y_QO = torch.cat(ys, 1).index_select(0, plan.restore_Q)  # one return trip for gate and up together
        y_RO = all_to_all(y_QO, plan.send_splits, plan.recv_splits, self.group)
        self.bytes_sent += (x_RD.numel() * x_RD.element_size() + y_QO.numel() * y_QO.element_size())
        return [self.backend.combine(y, plan.local, x_TD.shape[0]) for y in torch.split(y_RO, widths, 1)]

    def __repr__(self) -> str:
        return f"ExpertParallelDispatcher({self.backend.name}, ep_size={self.ep_size}, ep_rank={self.ep_rank})"
