"""Activation checkpointing of the language model's decoder layers, applied after the model is built (as
expert parallelism is): each decoder layer keeps only its input through the forward and runs again during
backward, so a layer's activations exist once at a time.

A plain ``gradient_checkpointing_enable()`` would be wrong in two ways for MoLE, and this module exists for
them:

1. The recompute re-runs each MoLE layer's forward: it would overwrite the layer's routing statistics (the aux
   loss, the routing counts and the expert load would be read from the recompute, whose graph then stays
   alive until the next step) and its dispatch all-to-alls would land in the forward byte count (doubling it).
   While a layer is recomputed, every MoLE layer of the model has ``recomputing`` set and its dispatcher's
   ``CommStats.recomputing`` too: the layer keeps the statistics of the real forward, and the recompute's
   traffic is counted apart (``a2a_bytes_recompute``).
2. Under expert parallelism the recompute's all-to-alls must run in the same order on every rank of the
   group. Each rank recomputes its layers in the same order (backward walks the same layers), and the
   recompute is never cut short: torch's non-reentrant checkpoint may stop a recompute early once it has the
   tensors it needs (``early_stop``), which could stop one rank before a collective its peers enter; it is
   turned off here, so each recompute runs the whole layer, dispatch and combine included.

The recompute sees the same dropout masks as the forward (``preserve_rng_state``: the RNG state at the
layer's forward is restored for its recompute), and torch checks that the recomputed tensors have the
forward's shapes and dtypes. The checkpointing itself is transformers' own (``GradientCheckpointingLayer``:
the layer's ``forward`` is checkpointed, its module hooks stay outside) driven with the function below.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

from ..patching import find_language_model, mole_layers


def _set_recomputing(layers, flag: bool) -> None:
    for m in layers:
        m.recomputing = flag
        stats = getattr(m.dispatcher, "stats", None)
        if stats is not None:
            stats.recomputing = flag


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder layer of ``model``'s language model (MoLE-aware, see the module docstring);
    returns the number of decoder layers. The vision tower is left alone (frozen: nothing to recompute for)."""
    lm = find_language_model(model)
    layers = mole_layers(lm)

    @contextlib.contextmanager
    def recomputing() -> Iterator[None]:
        _set_recomputing(layers, True)
        try:
            yield
        finally:
            _set_recomputing(layers, False)

    def context_fn():
        return contextlib.nullcontext(), recomputing()

    kwargs = {"use_reentrant": False, "preserve_rng_state": True, "early_stop": False, "context_fn": context_fn}
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers releases before the rename
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    checkpointed = sum(1 for layer in lm.layers if getattr(layer, "gradient_checkpointing", False))
    if checkpointed != len(lm.layers):
        raise TypeError(f"{type(lm).__name__}: activation checkpointing reached {checkpointed} of {len(lm.layers)} "
                        "decoder layers (they must be transformers GradientCheckpointingLayer modules)")
    return checkpointed


__all__ = ["apply_activation_checkpointing"]
