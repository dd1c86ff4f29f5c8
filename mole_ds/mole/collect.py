"""Read the last forward's routing out of a patched model: auxiliary losses and token counts."""
from __future__ import annotations

import torch
import torch.nn as nn

from .block import MoLEMLP
from .losses import BALANCE_LOSSES, RoutingStats, mi_loss, z_loss


def _stats(model: nn.Module) -> tuple[list[RoutingStats], MoLEMLP]:
    layers = [m for m in model.modules() if isinstance(m, MoLEMLP)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoLE layers; call mole_ds.patch_model first")
    missing = [m.layer_idx for m in layers if m.last_stats is None]
    if missing:
        raise RuntimeError(f"MoLE layers {missing} have no routing from a forward pass yet")
    return [m.last_stats for m in layers], layers[0]


def aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unweighted components of the last forward's auxiliary loss: 'balance', 'z' and 'mi' (-I(sample;
    expert), :func:`mole_ds.mole.losses.mi_loss`), tensors with grad."""
    stats, first = _stats(model)
    cfg = first.config
    zero = stats[0].prob_sum_BE.sum() * 0.0
    balance = BALANCE_LOSSES[cfg.balance_loss](stats) if cfg.balance_loss != "none" else zero
    return {"balance": balance, "z": z_loss(stats), "mi": mi_loss(stats)}


def aux_loss(model: nn.Module) -> torch.Tensor:
    """balance_coef * balance + z_loss_coef * z + mi_coef * mi for the last forward (add it to the task loss)."""
    cfg = _stats(model)[1].config
    parts = aux_losses(model)
    total = cfg.balance_coef * parts["balance"] + cfg.z_loss_coef * parts["z"]
    mi_coef = getattr(cfg, "mi_coef", 0.0)
    return total + mi_coef * parts["mi"] if mi_coef else total


def routing_counts(model: nn.Module) -> torch.Tensor:
    """(layers, E) number of non-pad tokens routed to each expert in the last forward (top-k choices)."""
    stats, _ = _stats(model)
    return torch.stack([s.count_BE.sum(0).detach() for s in stats])


def routing_counts_by_sample(model: nn.Module) -> torch.Tensor:
    """(layers, B, E) per-sample counts of the last forward, e.g. to aggregate routing per domain."""
    stats, _ = _stats(model)
    return torch.stack([s.count_BE.detach() for s in stats])
