"""Shared builders for unit tests: real transformers modules from small configs."""
from __future__ import annotations

import copy

import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from mole_ds import MoLEConfig, MoLEMLP
from mole_ds.mole.dispatch import LocalDispatcher, get_backend
from mole_ds.models.tiny import tiny_llama_config


def make_mlp_pair(E: int, top_k: int = 1, routing: str = "sparse", hidden: int = 32, inter: int = 48,
                  rank: int = 4, seed: int = 0, backends=("torch", "loop")) -> list[MoLEMLP]:
    """Identical MoLE MLPs (random non-zero B so every gradient is live) that differ only in backend."""
    torch.manual_seed(seed)
    cfg = MoLEConfig(num_experts=E, top_k=top_k, rank=rank, alpha=2.0 * rank, dropout=0.0, routing=routing,
                     backend="torch")
    base = LlamaMLP(tiny_llama_config(hidden_size=hidden, intermediate_size=inter, num_heads=2, num_kv_heads=2))
    mlp = MoLEMLP(base, cfg)
    with torch.no_grad():
        for p in mlp.experts.parameters():
            p.normal_(0, 0.2)
        mlp.router.weight.normal_(0, 1.0)
    out = []
    for b in backends:
        m = copy.deepcopy(mlp)
        m.dispatcher = LocalDispatcher(get_backend(b))
        out.append(m)
    return out


def force_routing(mlp: MoLEMLP, bias_E: torch.Tensor) -> None:
    """Make routing depend only on the bias (e.g. every token to one expert)."""
    with torch.no_grad():
        mlp.router.weight.zero_()
        mlp.router.bias.copy_(bias_E)
