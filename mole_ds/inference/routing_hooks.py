"""Routing statistics at inference, read by forward hooks (the model itself is not changed).

* :class:`ForwardRouting`: per-sample routing counts after every forward of a batch (``generate``'s and the
  eval plugin's per-domain statistics);
* :class:`RoutingRecorder`: the top-k experts of the last position at every step of a batch-1 decode
  (``tools/generate.py --show-routing``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..mole.collect import routing_counts_by_sample
from ..patching import mole_layers


class ForwardRouting:
    """A forward hook on the whole model: ``routing_counts_by_sample`` (layers, B, E) after every forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps: list[torch.Tensor] = []
        self._handle = model.register_forward_hook(lambda mod, args, out: self.steps.append(
            routing_counts_by_sample(self.model).cpu()))

    def per_sample(self, forwards_BN: list[int]) -> list[torch.Tensor]:
        """(layers, E) counts per row: the sum of its first ``forwards_BN[i]`` forwards."""
        return [torch.stack(self.steps[:n]).sum(0)[:, i] for i, n in enumerate(forwards_BN)]

    def remove(self) -> None:
        self._handle.remove()


class RoutingRecorder:
    """Forward hooks on every MoLE router: per call, the top-k experts and probabilities of the last token
    (batch 1), for showing which experts produced each generated token."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = mole_layers(model)
        self.steps: list[dict[int, tuple[list[int], list[float]]]] = []
        self._handles = [m.router.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):
        def hook(module, args, logits_TE):
            if i == 0:
                self.steps.append({})
            probs_E = logits_TE[-1].float().softmax(-1)  # batch 1: the last row is the last input position
            p_K, e_K = probs_E.topk(module.top_k)
            self.steps[-1][i] = (e_K.tolist(), p_K.tolist())
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


__all__ = ["ForwardRouting", "RoutingRecorder"]
