"""Expert-parallel token dispatch: hidden-size rows to the rank that owns their expert, and back.

The MoLE MLP asks its dispatcher for ``plan``, ``dispatch``, ``local_counts`` and ``combine`` and runs the
whole MLP (frozen projections + its local experts' LoRA) on the rows it is handed. This dispatcher puts one
all-to-all after the local gather and one before the local scatter: one round trip per layer forward (and
one backward), ``hidden`` values per (token, expert) row each way - the minimum for top-k token routing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mole.dispatch.base import Backend, Plan
from .all_to_all import CommStats, all_to_all, exchange_counts


@dataclass
class EPPlan:
    local: Plan
    """The local plan over *global* experts (rows grouped by expert, so by owning rank)."""
    send_splits: list[int]
    recv_splits: list[int]
    regroup_Q: torch.Tensor | None
    """Order that turns received rows (grouped by source rank, then expert) into rows grouped by local expert
    (None when that is already the order: one local expert, or one source)."""
    restore_Q: torch.Tensor | None
    """Inverse of ``regroup_Q``."""
    local_counts_L: torch.Tensor
    """Received rows per local expert."""


class ExpertParallelDispatcher:
    """Dispatch over an expert-parallel group of ``ep_size`` ranks, each owning ``E / ep_size`` experts
    (rank i of the group owns experts ``[i * E_local, (i + 1) * E_local)``).

    ``plan`` (per layer):
    1. group local rows by global expert with the local backend (so they are grouped by owning rank);
    2. all-to-all the (ranks, E_local) row-count matrix: every rank learns how many rows it will receive
       from each peer for each of its experts (a few bytes; ``stats.meta_calls``);
    3. precompute the permutation that regroups received rows by local expert (and its inverse).

    ``dispatch``: gather rows (+ one column of delta weights when the routing mode has them), all-to-all them
    to the owners (uneven splits, autograd), regroup by local expert.
    ``combine``: undo the regrouping, all-to-all the outputs back, weight and sum them onto their tokens.
    Every rank runs its local experts even on zero rows, so ZeRO-3 sees the same parameter use everywhere.
    """

    def __init__(self, backend: Backend, group, ep_size: int, ep_rank: int, num_experts: int) -> None:
        self.backend = backend
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_experts = num_experts
        self.num_local = num_experts // ep_size  # divisibility is validated by MoLEConfig
        self.stats = CommStats()

    def plan(self, expert_idx_TJ: torch.Tensor, num_experts: int) -> EPPlan:
        local = self.backend.plan(expert_idx_TJ, num_experts)
        send_counts = local.counts_E.view(self.ep_size, self.num_local).to(torch.int64)
        recv_counts = exchange_counts(send_counts, self.group)  # (source rank, local expert)
        self.stats.meta_calls += 1
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        regroup_Q = restore_Q = None
        if self.num_local > 1:
            local_expert_Q = torch.repeat_interleave(
                torch.arange(self.num_local, device=recv_counts.device).repeat(self.ep_size), recv_counts.reshape(-1))
            regroup_Q = torch.argsort(local_expert_Q, stable=True)
            restore_Q = torch.empty_like(regroup_Q)
            restore_Q[regroup_Q] = torch.arange(regroup_Q.numel(), device=regroup_Q.device)
        return EPPlan(local, send_splits, recv_splits, regroup_Q, restore_Q, recv_counts.sum(0))

    def local_counts(self, plan: EPPlan) -> torch.Tensor:
        return plan.local_counts_L

    def dispatch(self, x_TD: torch.Tensor, plan: EPPlan, delta_weight_TJ: torch.Tensor | None):
        D = x_TD.shape[1]
        x_RD = self.backend.gather(x_TD, plan.local)
        if delta_weight_TJ is not None:
            # The delta weight travels as one extra column of the same message (no second all-to-all); it
            # is cast to the rows' dtype exactly as the local path casts it.
            w_R1 = self.backend.row_values(delta_weight_TJ, plan.local).to(x_TD.dtype)[:, None]
            x_RD = torch.cat([x_RD, w_R1], 1)
        x_QD = all_to_all(x_RD, plan.recv_splits, plan.send_splits, self.group, self.ep_rank, self.stats)
        if plan.regroup_Q is not None:
            x_QD = x_QD.index_select(0, plan.regroup_Q)
        if delta_weight_TJ is not None:
            return x_QD[:, :D], x_QD[:, D:]
        return x_QD, None

    def combine(self, y_QD: torch.Tensor, plan: EPPlan, combine_weight_TJ: torch.Tensor | None,
                num_tokens: int) -> torch.Tensor:
        if plan.restore_Q is not None:
            y_QD = y_QD.index_select(0, plan.restore_Q)
        y_RD = all_to_all(y_QD, plan.send_splits, plan.recv_splits, self.group, self.ep_rank, self.stats)
        return self.backend.scatter(y_RD, plan.local, combine_weight_TJ, num_tokens)

    def __repr__(self) -> str:
        return f"ExpertParallelDispatcher({self.backend.name}, ep_size={self.ep_size}, ep_rank={self.ep_rank})"
