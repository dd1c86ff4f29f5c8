"""The reference backend: a per-expert loop over masks of the original token order."""
from __future__ import annotations

import torch

from .base import Backend, Plan


class LoopBackend(Backend):
    """Obviously-correct and slow. ``lora`` never sorts: for each expert it selects its rows by mask."""

    name = "loop"

    def plan(self, expert_idx_TJ, weights_TJ, num_experts):
        counts_E = torch.bincount(expert_idx_TJ.reshape(-1), minlength=num_experts)
        order_R = torch.argsort(expert_idx_TJ.reshape(-1), stable=True)
        J = expert_idx_TJ.shape[1]
        return Plan(expert_idx_TJ, weights_TJ, num_experts, order_R, order_R // J,
                    weights_TJ.reshape(-1)[order_R], counts_E)

    def lora(self, x_TD, plan, pairs):
        # Algorithm (reference):
        # 1. for every expert e and every slot j, pick the tokens whose j-th choice is e;
        # 2. y[tokens] += w * (x[tokens] @ A_e^T) @ B_e^T.
        outs = []
        for A_ErI, B_EOr in pairs:
            y_TO = x_TD.new_zeros(x_TD.shape[0], B_EOr.shape[1])
            for e in range(plan.num_experts):
                for j in range(plan.expert_idx_TJ.shape[1]):
                    tok = torch.nonzero(plan.expert_idx_TJ[:, j] == e).flatten()
                    if tok.numel() == 0:
                        continue
                    w = plan.weights_TJ[tok, j].to(x_TD.dtype)[:, None]
                    y_TO = y_TO.index_add(0, tok, w * ((x_TD[tok] @ A_ErI[e].T) @ B_EOr[e].T))
            outs.append(y_TO)
        return outs

    # Grouped-row steps, used when an outer (expert-parallel) dispatcher has already grouped the rows.
    def gather(self, x_TD, plan):
        return x_TD.index_select(0, plan.token_R)

    def grouped_lora(self, x_RD, counts_E, A_ErI, B_EOr):
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            outs.append((x_RD[start:start + n] @ A_ErI[e].T) @ B_EOr[e].T)
            start += n
        return torch.cat(outs, 0) if outs else x_RD.new_zeros(0, B_EOr.shape[1])

    def combine(self, y_RO, plan, num_tokens):
        w = plan.weight_R.to(y_RO.dtype)[:, None]
        return y_RO.new_zeros(num_tokens, y_RO.shape[1]).index_add(0, plan.token_R, y_RO * w)
