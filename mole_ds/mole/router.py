"""Top-k router over LoRA experts; all math in fp32 whatever the autocast or parameter dtype."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterOutput:
    """What one router call decided, for the dispatcher and for the losses."""

    logits_TE: torch.Tensor
    """fp32 router logits."""
    probs_TE: torch.Tensor
    """fp32 softmax probabilities."""
    chosen_TK: torch.Tensor
    """int64 top-k experts per token (what routing statistics and balance losses count)."""
    expert_idx_TJ: torch.Tensor
    """int64 experts each token is dispatched to (J = K, or E in dense mode)."""
    weights_TJ: torch.Tensor
    """fp32 multiplier of each dispatched expert's delta (ones in sparse mode, no grad)."""


class TopKRouter(nn.Linear):
    """``nn.Linear(hidden, E, bias=True)`` whose forward returns a :class:`RouterOutput`.

    It is a plain Linear in the state dict (``router.weight``, ``router.bias``), so checkpoints stay
    readable by anything that knows the paper's layout.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, routing: str, **factory) -> None:
        super().__init__(hidden_size, num_experts, bias=True, **factory)
        self.num_experts = num_experts
        self.top_k = top_k
        self.routing = routing

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """fp32 logits. Returning a plain tensor matters: ZeRO-3 re-gathers a module's weights for backward
        through hooks on its tensor outputs."""
        # fp32 routing: bf16 logits flip argmax decisions between otherwise identical runs.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), self.weight.float(), self.bias.float())

    def route(self, logits_TE: torch.Tensor) -> RouterOutput:
        """The routing decision for fp32 logits (no parameters used)."""
        probs_TE = logits_TE.softmax(dim=-1)
        _, chosen_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.routing == "sparse":
            # The paper: the chosen deltas are added unscaled; the router learns only from aux losses.
            expert_idx_TJ = chosen_TK
            weights_TJ = torch.ones_like(chosen_TK, dtype=torch.float32)
        elif self.routing == "weighted":
            # Full-softmax probability (not renormalised over top-k) so top-1 still gets task gradient.
            expert_idx_TJ = chosen_TK
            weights_TJ = probs_TE.gather(1, chosen_TK)
        elif self.routing == "dense":
            T, E = probs_TE.shape
            expert_idx_TJ = torch.arange(E, device=logits_TE.device).expand(T, E)
            weights_TJ = probs_TE
        else:  # validated in MoLEConfig; kept for modules built by hand
            raise ValueError(f"router.routing ({self.routing!r}) must be sparse, weighted or dense")
        return RouterOutput(logits_TE, probs_TE, chosen_TK, expert_idx_TJ, weights_TJ)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, top_k={self.top_k}, routing={self.routing}"
