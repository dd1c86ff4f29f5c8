"""Timing one MoLE MLP against a plain-LoRA MLP: the modules and the alternating timer.

``tools/bench_mole.py`` (backends x E on CPU) and ``tools/gpu_check.py`` (first contact with a GPU) both use
these, so "MoLE MLP vs plain LoRA" means the same thing in every table: the same frozen LLaMA MLP, either with
one LoRA of rank r on gate/up/down (:func:`plain_lora_mlp`) or as a :class:`MoLEMLP` with E experts of that
rank (:func:`mole_mlp`), each timed for one forward + backward on the same tokens (:func:`fwd_bwd`),
alternately (:func:`time_pair`).

Only torch, transformers' ``LlamaMLP`` and the MoLE math are imported, so this runs on a machine that has
nothing else installed.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from ..config import MoLEConfig
from .block import MoLEMLP
from .lora import LoRALinear

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def llama_mlp(hidden: int, intermediate: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> LlamaMLP:
    """A frozen LLaMA MLP (SiLU-gated, no bias) of the given sizes, initialised directly on ``device``."""
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")
    with torch.device(device):
        mlp = LlamaMLP(cfg)
    return mlp.to(dtype).requires_grad_(False)


def plain_lora_mlp(base: LlamaMLP, rank: int) -> LlamaMLP:
    """A copy of ``base`` with one plain LoRA (rank ``rank``, alpha 2r, PEFT init) on gate, up and down."""
    plain = copy.deepcopy(base).requires_grad_(False)
    for name in _PROJECTIONS:
        setattr(plain, name, LoRALinear(getattr(plain, name), rank, 2.0 * rank, 0.0))
    return plain


def mole_mlp(base: LlamaMLP, config: MoLEConfig, expert_std: float = 0.02) -> MoLEMLP:
    """A :class:`MoLEMLP` over a frozen copy of ``base`` (same device and dtype). Every expert A and B is drawn
    from N(0, ``expert_std``): non-zero B, so every expert does real work and every gradient is live."""
    mole = MoLEMLP(copy.deepcopy(base), config)
    for name in _PROJECTIONS:
        getattr(mole, name).requires_grad_(False)
    with torch.no_grad():
        for p in mole.experts.parameters():
            p.normal_(0, expert_std)
    return mole


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One training-style step of ``module`` on ``x``: forward, backward of ``grad``, gradients reset first."""
    def run() -> None:
        module.zero_grad(set_to_none=True)
        module(x.detach().requires_grad_(True)).backward(grad)
    return run


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def time_pair(fn_a: Callable[[], None], fn_b: Callable[[], None], warmup: int, reps: int,
              sync: Callable[[], None]) -> tuple[float, float]:
    """Median seconds of ``fn_a`` and ``fn_b`` over ``reps`` runs each after ``warmup`` runs of both, measured
    alternately (a, b, a, b, ...) so that both see the same machine load and clocks."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def step_peak_bytes(fn: Callable[[], None], device: torch.device | str) -> int | None:
    """Peak CUDA memory that one call of ``fn`` allocates above what was allocated before it (activations,
    gradients, workspaces); None on CPU, where torch keeps no such counter."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - before
