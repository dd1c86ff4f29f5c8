"""The backend interface, the dispatch plan, and the single-process (identity) token dispatcher."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Plan:
    """Where each of the R = T*J (token, slot) rows goes, grouped by expert. Built once per layer."""

    num_experts: int
    J: int
    """Rows per token (top_k, or E in dense mode)."""
    order_R: torch.Tensor
    """Grouped row r is flattened (token, slot) ``order_R[r]``; stable, so rows keep token order per expert."""
    token_R: torch.Tensor
    """Token index of each grouped row (``order_R // J``)."""
    counts_E: torch.Tensor
    """Rows per expert (int64)."""
    extra: object = None
    """Backend-private data (e.g. MegaBlocks bins)."""


class Backend:
    """How rows are grouped and multiplied on one process. Four steps, each a small tensor program:

    1. ``plan(expert_idx_TJ, num_experts)``: group the (token, slot) rows by expert (a :class:`Plan`);
    2. ``gather(x_TD, plan)``: the rows in grouped order, x_RD;
    3. ``grouped_lora(x_RD, counts_E, A_ErI, B_EOr)``: each group times its expert's A then B, y_RO;
    4. ``scatter(y_RO, plan, weight_TJ, num_tokens)``: weight each row and sum rows back onto their tokens.
    """

    name = "base"

    def plan(self, expert_idx_TJ: torch.Tensor, num_experts: int) -> Plan:
        raise NotImplementedError

    def gather(self, x_TD: torch.Tensor, plan: Plan) -> torch.Tensor:
        raise NotImplementedError

    def grouped_lora(self, x_RD: torch.Tensor, counts_E: torch.Tensor, A_ErI: torch.Tensor,
                     B_EOr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scatter(self, y_RO: torch.Tensor, plan: Plan, weight_TJ: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def row_values(self, v_TJ: torch.Tensor, plan: Plan) -> torch.Tensor:
        """A per-(token, slot) value in grouped row order (e.g. the rows' delta weights)."""
        return v_TJ.reshape(-1).index_select(0, plan.order_R)


def sort_plan(expert_idx_TJ: torch.Tensor, num_experts: int) -> Plan:
    """The plan every pure-torch backend uses.

    1. flatten the (token, slot) choices into R = T*J rows;
    2. stable-sort rows by expert (rows of one expert stay in token order);
    3. count rows per expert (the group sizes); empty experts get a zero-size group.
    """
    J = expert_idx_TJ.shape[1]
    flat_R = expert_idx_TJ.reshape(-1)
    order_R = torch.argsort(flat_R, stable=True)
    counts_E = torch.bincount(flat_R, minlength=num_experts)
    return Plan(num_experts, J, order_R, order_R // J, counts_E)


def scatter_rows(y_RO: torch.Tensor, plan: Plan, weight_TJ: torch.Tensor | None, num_tokens: int) -> torch.Tensor:
    """Sum weighted grouped rows back onto their tokens (pure torch).

    Top-1 with unit weights is a permutation: its inverse is a gather (whose backward is a cheap scatter of the
    (T, D) gradient); otherwise rows are weighted and index-added.
    """
    if weight_TJ is None and plan.J == 1:
        inv_T = torch.empty_like(plan.order_R)
        inv_T[plan.order_R] = torch.arange(plan.order_R.numel(), device=plan.order_R.device)
        return y_RO.index_select(0, inv_T)
    out_TO = y_RO.new_zeros(num_tokens, y_RO.shape[1])
    if weight_TJ is not None:
        y_RO = y_RO * weight_TJ.reshape(-1).index_select(0, plan.order_R).to(y_RO.dtype)[:, None]
    return out_TO.index_add(0, plan.token_R, y_RO)


class LocalDispatcher:
    """The identity token dispatcher: every expert is on this process. Expert parallelism swaps in
    ``mole_ds.parallel.ExpertParallelDispatcher``, which has the same four methods and moves rows between
    ranks; the MoLE MLP never knows which one it has.

    ``dispatch`` returns the rows grouped by (local) expert plus their delta weights; ``combine`` takes the rows'
    outputs in that same order back to their tokens, weighted.
    """

    def __init__(self, backend) -> None:
        self.backend = backend

    def plan(self, expert_idx_TJ: torch.Tensor, num_experts: int) -> Plan:
        return self.backend.plan(expert_idx_TJ, num_experts)

    def local_counts(self, plan: Plan) -> torch.Tensor:
        """Rows per expert held here, in the order ``dispatch`` returns them."""
        return plan.counts_E

    def dispatch(self, x_TD: torch.Tensor, plan: Plan, delta_weight_TJ: torch.Tensor | None):
        x_RD = self.backend.gather(x_TD, plan)
        w_R1 = None
        if delta_weight_TJ is not None:
            w_R1 = self.backend.row_values(delta_weight_TJ, plan).to(x_TD.dtype)[:, None]
        return x_RD, w_R1

    def combine(self, y_RD: torch.Tensor, plan: Plan, combine_weight_TJ: torch.Tensor | None,
                num_tokens: int) -> torch.Tensor:
        return self.backend.scatter(y_RD, plan, combine_weight_TJ, num_tokens)

    def __repr__(self) -> str:
        return f"LocalDispatcher({self.backend.name})"
