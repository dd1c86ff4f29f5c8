"""Typed, validated configuration for the MoLE layer.

Every problem is reported at construction, all at once, each naming its field and value, e.g.
``mole.num_experts (6) must be divisible by mole.ep_size (4)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

ROUTING_MODES = ("sparse", "weighted", "dense")
BALANCE_LOSSES = ("mole", "switch", "none")
BACKENDS = ("auto", "torch", "loop", "megablocks")


@dataclass
class MoLEConfig:
    """How every decoder MLP becomes a Mixture of LoRA Experts.

    Routing semantics (E experts, router probabilities ``p = softmax(router(x))`` in fp32):

    * ``sparse`` (the paper): each token takes its ``top_k`` experts by probability and their LoRA deltas
      are added with weight 1 (unscaled). The router gets no gradient from the task loss; it learns only from
      the balance / z losses. With ``top_k > 1`` the k chosen deltas are summed.
    * ``weighted``: as ``sparse`` but each chosen delta is multiplied by its full-softmax probability
      ``p_e`` (not renormalised over the top k, so that top-1 still passes task gradient to the router).
    * ``dense`` (the paper's inference demo): every expert runs for every token, weighted by ``p``;
      ``top_k`` only decides which experts are counted in routing statistics and the balance loss.

    Inside one MLP the gate/up deltas of the chosen experts are summed before the activation and the down
    delta is applied to the shared hidden activation, so one router decision serves all three projections.
    """

    num_experts: int = 3
    """E: LoRA experts per decoder MLP."""
    top_k: int = 1
    """Experts per token (1 in the paper)."""
    rank: int = 32
    """LoRA rank r for the experts and for the attention LoRA."""
    alpha: float = 64.0
    """LoRA alpha; deltas are scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the LoRA input (applied once per token, shared by the experts it is routed to)."""
    routing: str = "sparse"
    """'sparse' | 'weighted' | 'dense' (see class docstring)."""
    balance_loss: str = "mole"
    """'mole' (paper: per-sample sum_e P_e * f_e pooled over layers, batch mean), 'switch' (E * sum_e f_e P_e
    per layer, mean over layers) or 'none'."""
    balance_coef: float = 0.01
    """Weight of the balance loss in ``aux_loss``."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (mean logsumexp(logits)^2) in ``aux_loss``."""
    attn_lora: bool = True
    """Plain (single) LoRA on q/k/v/o projections with the same rank and alpha."""
    train_projector: bool = False
    """Also train the multimodal projector of a LLaVA model."""
    backend: str = "auto"
    """'auto' (megablocks on CUDA when installed, else torch) | 'torch' | 'loop' | 'megablocks'."""
    ep_size: int = 1
    """Expert-parallel degree: each rank holds num_experts / ep_size experts (1 = replicated)."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid MoLE config:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with this config, each naming field and value."""
        p: list[str] = []

        def _int(name: str, lo: int) -> bool:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                p.append(f"mole.{name} ({v!r}) must be an integer")
                return False
            if v < lo:
                p.append(f"mole.{name} ({v}) must be >= {lo}")
                return False
            return True

        def _num(name: str) -> bool:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                p.append(f"mole.{name} ({v!r}) must be a number")
                return False
            return True

        def _choice(name: str, options: tuple[str, ...]) -> None:
            v = getattr(self, name)
            if v not in options:
                p.append(f"mole.{name} ({v!r}) must be one of {', '.join(options)}")

        e_ok = _int("num_experts", 1)
        k_ok = _int("top_k", 1)
        _int("rank", 1)
        ep_ok = _int("ep_size", 1)
        if e_ok and k_ok and self.top_k > self.num_experts:
            p.append(f"mole.top_k ({self.top_k}) must be <= mole.num_experts ({self.num_experts})")
        if e_ok and ep_ok and self.num_experts % self.ep_size != 0:
            p.append(f"mole.num_experts ({self.num_experts}) must be divisible by mole.ep_size ({self.ep_size})")
        if _num("alpha") and self.alpha <= 0:
            p.append(f"mole.alpha ({self.alpha}) must be > 0")
        if _num("dropout") and not 0.0 <= self.dropout < 1.0:
            p.append(f"mole.dropout ({self.dropout}) must be in [0, 1)")
        for name in ("balance_coef", "z_loss_coef"):
            if _num(name) and getattr(self, name) < 0:
                p.append(f"mole.{name} ({getattr(self, name)}) must be >= 0")
        _choice("routing", ROUTING_MODES)
        _choice("balance_loss", BALANCE_LOSSES)
        _choice("backend", BACKENDS)
        for name in ("attn_lora", "train_projector"):
            if not isinstance(getattr(self, name), bool):
                p.append(f"mole.{name} ({getattr(self, name)!r}) must be true or false")
        return p

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / rank."""
        return float(self.alpha) / self.rank

    @property
    def num_local_experts(self) -> int:
        """Experts held by one rank."""
        return self.num_experts // self.ep_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoLEConfig":
        """Build from a mapping, rejecting unknown keys (a typo must not silently fall back to a default)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown mole config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(d))
