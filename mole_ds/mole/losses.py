"""Routing statistics per layer and the auxiliary losses built from them.

Each MoLE MLP keeps the small :class:`RoutingStats` of its last forward; ``aux_loss`` pools them after the
forward. Nothing lives in module globals, so two models (or two micro-batches in flight) never mix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingStats:
    """Per-sample sums over non-pad tokens of one layer's routing, enough for every balance loss."""

    prob_sum_BE: torch.Tensor
    """sum_t mask * p_e (fp32, carries grad to the router)."""
    count_BE: torch.Tensor
    """sum_t mask * [e in top-k(t)] (fp32, no grad)."""
    tokens_B: torch.Tensor
    """sum_t mask (fp32)."""
    z_sum_B: torch.Tensor
    """sum_t mask * logsumexp(logits)^2 (fp32, grad)."""
    top_k: int


def routing_stats(logits_TE: torch.Tensor, probs_TE: torch.Tensor, chosen_TK: torch.Tensor,
                  mask_BS: torch.Tensor) -> RoutingStats:
    """Sum one layer's routing over the non-pad tokens of each sample (mask 1 = real token)."""
    B, S = mask_BS.shape
    E = probs_TE.shape[-1]
    m_BS = mask_BS.to(torch.float32)
    prob_sum_BE = torch.einsum("bse,bs->be", probs_TE.view(B, S, E), m_BS)
    onehot_BSE = torch.zeros(B * S, E, device=probs_TE.device, dtype=torch.float32)
    onehot_BSE.scatter_add_(1, chosen_TK, torch.ones_like(chosen_TK, dtype=torch.float32))
    count_BE = torch.einsum("bse,bs->be", onehot_BSE.view(B, S, E), m_BS)
    z_BS = torch.logsumexp(logits_TE, dim=-1).view(B, S).square()
    return RoutingStats(prob_sum_BE, count_BE, m_BS.sum(1), (z_BS * m_BS).sum(1), chosen_TK.shape[1])


def mole_balance_loss(stats: list[RoutingStats]) -> torch.Tensor:
    """The paper's form: per sample, sum_e P_e * f_e with P and f pooled over all layers' non-pad tokens,
    then the mean over samples that have tokens. Uniform routing gives 1/E."""
    L = len(stats)
    prob_BE = sum(s.prob_sum_BE for s in stats)
    count_BE = sum(s.count_BE for s in stats)
    tokens_B = stats[0].tokens_B
    valid_B = tokens_B > 0
    denom_B = (tokens_B * L).clamp_min(1.0)
    P_BE = prob_BE / denom_B[:, None]
    f_BE = count_BE / (denom_B * stats[0].top_k)[:, None]
    per_sample_B = (P_BE * f_BE).sum(-1)
    return per_sample_B[valid_B].mean() if bool(valid_B.any()) else per_sample_B.sum() * 0.0


def switch_balance_loss(stats: list[RoutingStats]) -> torch.Tensor:
    """Switch Transformer: E * sum_e f_e P_e over the batch's non-pad tokens, per layer, mean over layers.
    Uniform routing gives 1."""
    losses = []
    for s in stats:
        n = s.tokens_B.sum().clamp_min(1.0)
        E = s.prob_sum_BE.shape[-1]
        P_E = s.prob_sum_BE.sum(0) / n
        f_E = s.count_BE.sum(0) / (n * s.top_k)
        losses.append(E * (P_E * f_E).sum())
    return torch.stack(losses).mean()


def z_loss(stats: list[RoutingStats]) -> torch.Tensor:
    """Router z-loss: mean over non-pad tokens and layers of logsumexp(logits)^2."""
    return torch.stack([s.z_sum_B.sum() / s.tokens_B.sum().clamp_min(1.0) for s in stats]).mean()


def mi_loss(stats: list[RoutingStats]) -> torch.Tensor:
    """-I(sample; expert) in nats, mean over layers (Mod-Squad, Chen et al. 2023, with samples for tasks).

    Per layer, p_b = the mean routing probability of sample b over its non-pad tokens (for sample-level
    routing, the sample's p); I = H(mean_b p_b) - mean_b H(p_b): high when each sample is decisive (low
    H(p_b)) and the batch as a whole uses every expert (high H of the mean). Minimising -I rewards both; it
    is 0 for a single sample and at most log E. Samples without tokens are left out."""
    losses = []
    for s in stats:
        valid_B = s.tokens_B > 0
        p_BE = s.prob_sum_BE[valid_B] / s.tokens_B[valid_B, None]
        if p_BE.shape[0] == 0:
            losses.append(s.prob_sum_BE.sum() * 0.0)
            continue
        mean_E = p_BE.mean(0)
        h_mean = -(mean_E * mean_E.clamp_min(1e-12).log()).sum()
        h_each = -(p_BE * p_BE.clamp_min(1e-12).log()).sum(-1).mean()
        losses.append(h_each - h_mean)
    return torch.stack(losses).mean()


BALANCE_LOSSES = {"mole": mole_balance_loss, "switch": switch_balance_loss}
