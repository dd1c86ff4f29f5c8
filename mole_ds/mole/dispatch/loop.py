"""The reference backend: per-expert loops, no grouped kernels."""
from __future__ import annotations

import torch

from .base import Backend, sort_plan


class LoopBackend(Backend):
    """Obviously-correct and slow: each expert's rows are multiplied on their own, and rows are summed back
    onto their tokens one slot at a time."""

    name = "loop"

    def plan(self, expert_idx_TJ, num_experts):
        return sort_plan(expert_idx_TJ, num_experts)

    def gather(self, x_TD, plan):
        return x_TD[plan.token_R]

    def grouped_lora(self, x_RD, counts_E, A_ErI, B_EOr):
        # Algorithm (reference): for every expert e, its contiguous rows times A_e^T then B_e^T.
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            outs.append((x_RD[start:start + n] @ A_ErI[e].T) @ B_EOr[e].T)
            start += n
        return torch.cat(outs, 0) if outs else x_RD.new_zeros(0, B_EOr.shape[1])

    def scatter(self, y_RO, plan, weight_TJ, num_tokens):
        # For every slot j: the rows of slot j belong to distinct tokens; add them (weighted) to those tokens.
        out_TO = y_RO.new_zeros(num_tokens, y_RO.shape[1])
        slot_R = plan.order_R % plan.J
        for j in range(plan.J):
            rows = torch.nonzero(slot_R == j).flatten()
            y = y_RO[rows]
            if weight_TJ is not None:
                y = y * weight_TJ[plan.token_R[rows], j].to(y.dtype)[:, None]
            out_TO = out_TO.index_add(0, plan.token_R[rows], y)
        return out_TO
