"""Top-k router over LoRA experts; all math in fp32 whatever the autocast or parameter dtype."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RouterOutput:
    """What one router call decided, for the dispatcher and for the losses.

    A token is dispatched as J rows (J = top_k, or E in dense mode); row j runs the MLP with expert
    ``expert_idx_TJ[:, j]``'s LoRA deltas scaled by ``delta_weight_TJ[:, j]`` and its output is summed into the
    token with weight ``combine_weight_TJ[:, j]``. ``None`` means "all ones" (no multiply, no tensor moved).
    """

    logits_TE: torch.Tensor
    """fp32 router logits."""
    probs_TE: torch.Tensor
    """fp32 softmax probabilities."""
    chosen_TK: torch.Tensor
    """int64 experts each token counts for in routing statistics and balance losses."""
    expert_idx_TJ: torch.Tensor
    """int64 experts each token is dispatched to."""
    delta_weight_TJ: torch.Tensor | None
    """fp32 multiplier of each row's LoRA deltas (inside the MLP), or None for 1."""
    combine_weight_TJ: torch.Tensor | None
    """fp32 weight of each row's MLP output in its token's output, or None for 1 (top-1)."""


class TopKRouter(nn.Linear):
    """``nn.Linear(hidden, E, bias=True)`` whose ``route`` turns fp32 logits into a :class:`RouterOutput`.

    It is a plain Linear in the state dict (``router.weight``, ``router.bias``), so checkpoints stay
    readable by anything that knows the paper's layout. Routing modes: see :class:`mole_ds.MoLEConfig`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, routing: str, *,
                 temperature: float = 1.0, input_norm: bool = False, noise: float = 0.0, center: bool = False,
                 **factory) -> None:
        super().__init__(hidden_size, num_experts, bias=True, **factory)
        self.num_experts = num_experts
        self.top_k = top_k
        self.routing = routing
        self.temperature = float(temperature)
        self.input_norm = bool(input_norm)
        self.noise = float(noise)
        self.center = bool(center)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """fp32 logits: ``linear(x / rms(x) if input_norm) / temperature`` plus N(0, noise^2) in training mode.
        With ``center`` in training mode (and more than one row) the logits are ``W (x - m) + stopgrad(W m) + b``,
        m the rows' mean (detached): the same value as ``W x + b``, but the weight's gradient is
        ``sum_i g_i (x_i - m)^T`` instead of ``sum_i g_i x_i^T``. When every row shares a large component (the
        template of every prompt: 8-25x the rows' spread in a pretrained LM, docs/conflict_study.md), the plain
        gradient mostly moves all rows' logits together; the centered one moves them apart. Per micro-batch
        (like the MI term's batch mean), so with one row per micro-batch nothing changes.
        Returning a plain tensor matters: ZeRO-3 re-gathers a module's weights for backward through hooks on
        its tensor outputs."""
        # fp32 routing: bf16 logits flip argmax decisions between otherwise identical runs.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.float()
            if self.input_norm:
                # Parameter-free RMS scaling: the router's step size then does not depend on the hidden-state
                # scale, which differs between layers and (for pooled prompts) between prompt lengths.
                x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
            if self.center and self.training and x.shape[0] > 1:
                w = self.weight.float()
                m = x.mean(0, keepdim=True).detach()
                logits = F.linear(x - m, w, self.bias.float()) + F.linear(m, w).detach()
            else:
                logits = F.linear(x, self.weight.float(), self.bias.float())
            if self.temperature != 1.0:
                logits = logits / self.temperature
            if self.training and self.noise > 0:
                # Drawn from the global RNG, so activation checkpointing's restored RNG state redraws it.
                logits = logits + self.noise * torch.randn_like(logits)
            return logits

    def route(self, logits_TE: torch.Tensor, domain_T: torch.Tensor | None = None) -> RouterOutput:
        """The routing decision for fp32 logits (no parameters used). ``domain_T``: per-token domain id,
        needed by ``oracle`` routing only."""
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        k = self.top_k
        if self.routing == "oracle":
            if domain_T is None:
                raise ValueError("mole.routing ('oracle') needs each sample's domain id: call "
                                 "mole_ds.set_sample_domains(model, domain_ids) before the forward (the training "
                                 "loop does it for batches that carry domain ids)")
            idx_T1 = (domain_T.to(device=logits_TE.device, dtype=torch.long) % E).view(T, 1)
            return RouterOutput(logits_TE, probs_TE, idx_T1, idx_T1, None, None)
        _, chosen_TK = probs_TE.topk(k, dim=-1)
        # Top-k rows are averaged (c = 1/k) so the frozen base output keeps weight 1.
        mean_TK = None if k == 1 else torch.full((T, k), 1.0 / k, device=logits_TE.device)
        if self.routing == "sparse":
            # The paper: the chosen deltas are added unscaled; the router learns only from aux losses.
            return RouterOutput(logits_TE, probs_TE, chosen_TK, chosen_TK, None, mean_TK)
        if self.routing == "weighted":
            # Full-softmax probability (not renormalised over top-k) so top-1 still gets task gradient.
            return RouterOutput(logits_TE, probs_TE, chosen_TK, chosen_TK, probs_TE.gather(1, chosen_TK), mean_TK)
        if self.routing == "st":
            # Straight-through: (p - stopgrad(p)) is exactly 0, so the forward is sparse's bit for bit; the
            # backward passes d loss / d w to p.
            p_TK = probs_TE.gather(1, chosen_TK)
            return RouterOutput(logits_TE, probs_TE, chosen_TK, chosen_TK, (p_TK - p_TK.detach()) + 1.0, mean_TK)
        if self.routing == "dense":
            idx_TE = torch.arange(E, device=logits_TE.device).expand(T, E)
            return RouterOutput(logits_TE, probs_TE, chosen_TK, idx_TE, None, probs_TE)
        # validated in MoLEConfig; kept for modules built by hand
        raise ValueError(f"router.routing ({self.routing!r}) must be sparse, weighted, st, dense or oracle")

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v, d in (("temperature", self.temperature, 1.0),
                                                     ("input_norm", self.input_norm, False),
                                                     ("noise", self.noise, 0.0),
                                                     ("center", self.center, False)) if v != d)
        return f"{super().extra_repr()}, top_k={self.top_k}, routing={self.routing}{extra}"
