"""How visible is the domain to a sample-level router? A measurement of the frozen base, before any training.

A ``routing_level: sample`` router sees, per layer, the mean over the prompt of that layer's MLP input
(``mole_ds.mole.sample_routing.pool_prompt_BD``), and the MI objective asks it for a decisive split of those
pooled vectors that is balanced over the batch. Whether that split is the domain split depends on how much of
the pooled vectors' spread the domain accounts for, against the other things that vary between prompts (here,
the input symbols of each slot). :func:`salience` measures it on the frozen base, per layer:

* ``domain_r2``: the share of the pooled vectors' total variance between the domain means (between-group sum
  of squares / total sum of squares); ``slot_r2``: the same share for each input slot's symbol;
* ``mean_to_spread``: the squared norm of the pooled vectors' common mean over their mean squared distance from
  it (how much of what a linear router multiplies is the same for every prompt);
* ``kmeans_mi_bits``: I(domain; cluster) of a k-means split of the pooled vectors into ``experts`` clusters
  (the most salient decisive split, a stand-in for what an unsupervised balanced router finds), out of
  log2(domains) bits.

Drawn like a training batch (``ConflictTask.sample`` over every domain), with a fixed generator.
"""
from __future__ import annotations

import math

import torch

from ..demo.conflict import ConflictTask
from ..mole.sample_routing import pool_prompt_BD
from ..routing_table import mutual_information_bits


def pooled_mlp_inputs(model, ids_BL: torch.Tensor) -> list[torch.Tensor]:
    """Per decoder layer of ``model`` (a transformers causal LM), the prompt-mean of its MLP input (B, hidden):
    what a sample-level router of that layer pools. Every token of ``ids_BL`` is prompt."""
    layers = model.model.layers
    got: list[torch.Tensor | None] = [None] * len(layers)
    pool_BS = torch.ones(ids_BL.shape, dtype=torch.bool)

    def hook(i):
        def pre(_mod, args):
            got[i] = pool_prompt_BD(args[0].detach().float(), pool_BS)
        return pre

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids_BL)
    finally:
        for h in handles:
            h.remove()
    return [g for g in got if g is not None]


def variance_share(X_BD: torch.Tensor, group_B: torch.Tensor) -> float:
    """Between-group sum of squares / total sum of squares of the rows of ``X_BD`` (0: the groups' means are
    equal; 1: rows equal their group's mean)."""
    X = X_BD.double() - X_BD.double().mean(0)
    total = float((X ** 2).sum())
    between = 0.0
    for g in group_B.unique():
        sel = group_B == g
        between += int(sel.sum()) * float((X[sel].mean(0) ** 2).sum())
    return between / total if total > 0 else 0.0


def kmeans(X_BD: torch.Tensor, k: int, seed: int = 0, iters: int = 50, restarts: int = 5) -> torch.Tensor:
    """Cluster ids (B,) of the best of ``restarts`` k-means runs (k-means++ seeding, Euclidean)."""
    X = X_BD.double()
    gen = torch.Generator().manual_seed(seed)
    best, best_cost = None, math.inf
    for _ in range(restarts):
        centres = [X[torch.randint(X.shape[0], (1,), generator=gen)].squeeze(0)]
        for _c in range(1, k):
            d2 = torch.cdist(X, torch.stack(centres)).min(1).values ** 2
            centres.append(X[torch.multinomial(d2 / d2.sum(), 1, generator=gen)].squeeze(0))
        C = torch.stack(centres)
        for _it in range(iters):
            ids = torch.cdist(X, C).argmin(1)
            newC = torch.stack([X[ids == j].mean(0) if (ids == j).any() else C[j] for j in range(k)])
            if torch.allclose(newC, C):
                break
            C = newC
        ids = torch.cdist(X, C).argmin(1)
        cost = float(((X - C[ids]) ** 2).sum())
        if cost < best_cost:
            best, best_cost = ids, cost
    return best


def salience(model, task: ConflictTask, samples: int = 384, experts: int = 3, seed: int = 0) -> list[dict]:
    """Per decoder layer of the frozen ``model``: how much of the pooled prompt's variance the domain and each
    input slot account for, and how much a ``experts``-way k-means split says about the domain (module
    docstring). ``samples`` prompts drawn as a training batch over every domain."""
    gen = torch.Generator().manual_seed(seed)
    d_B, x_BS = task.sample(gen, samples, list(range(task.num_domains)))
    ids_BL, _ = task.encode(d_B, x_BS)
    rows = []
    for i, X in enumerate(pooled_mlp_inputs(model, ids_BL)):
        clusters = kmeans(X, experts, seed=seed)
        Xd = X.double()
        spread = float(((Xd - Xd.mean(0)) ** 2).sum(1).mean())
        joint_DE = [[float(((d_B == d) & (clusters == e)).sum()) for e in range(experts)]
                    for d in range(task.num_domains)]
        rows.append({"layer": i, "domain_r2": variance_share(X, d_B),
                     "mean_to_spread": float((Xd.mean(0) ** 2).sum()) / spread if spread > 0 else math.inf,
                     "slot_r2": [variance_share(X, x_BS[:, s]) for s in range(x_BS.shape[1])],
                     "kmeans_mi_bits": mutual_information_bits(joint_DE),
                     "max_bits": math.log2(task.num_domains)})
    return rows


__all__ = ["kmeans", "pooled_mlp_inputs", "salience", "variance_share"]
