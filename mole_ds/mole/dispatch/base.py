"""The backend interface and the single-process dispatcher that drives it."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Plan:
    """Where each of the R = T*J (token, expert) rows goes. Built once per layer, used for gate/up and down."""

    expert_idx_TJ: torch.Tensor
    weights_TJ: torch.Tensor
    num_experts: int
    order_R: torch.Tensor | None = None
    """Row permutation that groups rows by expert (stable, so rows keep token order within an expert)."""
    token_R: torch.Tensor | None = None
    """Token index of each grouped row."""
    weight_R: torch.Tensor | None = None
    """Weight of each grouped row."""
    counts_E: torch.Tensor | None = None
    """Rows per expert (int64)."""
    extra: object = None
    """Backend-private data (e.g. MegaBlocks bins)."""


class Backend:
    """Base class; see the package docstring for the four steps."""

    name = "base"

    def plan(self, expert_idx_TJ: torch.Tensor, weights_TJ: torch.Tensor, num_experts: int) -> Plan:
        raise NotImplementedError

    def gather(self, x_TD: torch.Tensor, plan: Plan) -> torch.Tensor:
        raise NotImplementedError

    def grouped_lora(self, x_RD: torch.Tensor, counts_E: torch.Tensor, A_ErI: torch.Tensor,
                     B_EOr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def combine(self, y_RO: torch.Tensor, plan: Plan, num_tokens: int) -> torch.Tensor:
        raise NotImplementedError

    def lora(self, x_TD: torch.Tensor, plan: Plan, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Unscaled LoRA deltas of several (A, B) pairs that share the input and the routing."""
        x_RD = self.gather(x_TD, plan)
        return [self.combine(self.grouped_lora(x_RD, plan.counts_E, A, B), plan, x_TD.shape[0]) for A, B in pairs]


class LocalDispatcher:
    """Single-process dispatch: every expert is local. Expert parallelism swaps in another dispatcher
    with the same two methods (``plan``, ``lora``)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def plan(self, expert_idx_TJ: torch.Tensor, weights_TJ: torch.Tensor, num_experts: int) -> Plan:
        return self.backend.plan(expert_idx_TJ, weights_TJ, num_experts)

    def lora(self, x_TD: torch.Tensor, plan: Plan, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return self.backend.lora(x_TD, plan, pairs)

    def __repr__(self) -> str:
        return f"LocalDispatcher({self.backend.name})"
