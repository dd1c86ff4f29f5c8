"""Typed, validated configuration for the MoLE layer, and the config rules every layer shares.

Every problem is reported at construction, all at once, each naming its field and value, e.g.
``mole.num_experts (6) must be divisible by mole.ep_size (4)``. A refused configuration is a
:class:`ConfigError` (a ValueError carrying the list of problems), wherever it is found: the launcher prints
it as one message and exits 2 (mole_ds.train.launch).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

ROUTING_MODES = ("sparse", "weighted", "st", "dense", "oracle")
BALANCE_LOSSES = ("mole", "switch", "none")
BACKENDS = ("auto", "torch", "loop", "megablocks")
ROUTING_LEVELS = ("token", "sample")


class ConfigError(ValueError):
    """A refused configuration: ``problems`` lists every problem, each naming its field and value; the message
    is ``"<title>:\n  problem\n  problem..."``, the one format of every config refusal."""

    def __init__(self, problems: Iterable[str], title: str = "invalid run configuration") -> None:
        self.problems = list(problems)
        self.title = title
        super().__init__(f"{title}:\n  " + "\n  ".join(self.problems))


def check_ep_size(ep_size: int, world_size: int) -> list[str]:
    """Every problem with an expert-parallel degree for a world size, named with values: the one home of this
    rule (the launcher checks it before start, the expert-group builder again with the real world size).
    Divisibility of num_experts by ep_size is :meth:`MoLEConfig.problems`."""
    if ep_size > world_size:
        return [f"mole.ep_size ({ep_size}) must be <= world size ({world_size})"]
    if world_size % ep_size:
        return [f"world size ({world_size}) must be divisible by mole.ep_size ({ep_size})"]
    return []


@dataclass
class MoLEConfig:
    """How every decoder MLP becomes a Mixture of LoRA Experts.

    Each routed (token, expert) row runs the whole MLP with that expert's LoRA on gate, up and down
    (``MLP_e(x; w) = down(act(gate(x) + s w dg_e) * (up(x) + s w du_e)) + s w dd_e``, s = alpha / rank), and a
    token's output is ``sum_j c_j MLP_{e_j}(x; w_j)`` over its rows. Router math is fp32 (``p = softmax``).

    * ``sparse`` (the paper): top-k experts by ``p``; w = 1 (deltas unscaled), c = 1/k. The router gets no
      gradient from the task loss; it learns only from the balance / z losses.
    * ``weighted``: as sparse with w = p_e (full-softmax probability, so top-1 passes task gradient to the
      router; the forward changes: deltas shrink by p).
    * ``st`` (straight-through): the forward of sparse (w = 1 exactly); the backward gives the router the task
      gradient through w = 1 + p - stopgrad(p).
    * ``dense`` (the paper's inference demo, in output space): every expert for every token, w = 1, c = p;
      E rows per token (E MLP evaluations; with expert parallelism E rows travel).
    * ``oracle``: each sample's domain id d picks expert ``d % E`` for all its tokens (an upper bound for
      studies; ``mole_ds.set_sample_domains`` must give the ids). top_k must be 1.

    With top_k = 1, sparse/st/weighted equal the paper's per-projection form exactly (one expert per token).

    ``routing_level: sample`` makes every learned mode choose once per sample and layer, from the mean of the
    layer's MLP input over the sample's prompt tokens, and send all of the sample's tokens there (what
    ``oracle`` does with the domain id; the cost stays one expert per token). ``mi_coef`` adds the
    mutual-information objective -(H(mean_b p_b) - mean_b H(p_b)) (Mod-Squad), ``router_*`` shape the router.
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
    """'sparse' | 'weighted' | 'st' | 'dense' | 'oracle' (see class docstring)."""
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
    routing_level: str = "token"
    """'token' (each token routed on its own hidden state) or 'sample' (each sample routed once per layer from
    its pooled prompt; see ``mole_ds.mole.sample_routing``). Ignored by 'oracle', which is per sample already."""
    mi_coef: float = 0.0
    """Weight in ``aux_loss`` of -I(sample; expert) = -(H(mean_b p_b) - mean_b H(p_b)) per layer (nats), p_b a
    sample's mean routing probability over its non-pad tokens: rewards decisive, batch-balanced routing."""
    router_temperature: float = 1.0
    """Router logits are divided by this before the softmax (< 1: sharper p, larger task gradient)."""
    router_input_norm: bool = False
    """Scale the router's input to unit RMS (no weights) before the router Linear."""
    router_center: bool = False
    """Center the router's weight gradient on the batch (``mole_ds.mole.router.TopKRouter``): in training, the
    router's input rows (tokens, or pooled prompts under routing_level 'sample') enter its weight gradient
    minus their micro-batch mean, while its output is the plain Linear's. For inputs that share a large
    common component (every prompt's template). No state: exports and inference are unchanged."""
    router_noise: float = 0.0
    """Std of Gaussian noise added to the router logits in training mode (exploration); 0 = none. Under
    activation checkpointing the recompute redraws the same noise (the RNG state is restored)."""
    backend: str = "auto"
    """'auto' (megablocks on CUDA when installed, else torch) | 'torch' | 'loop' | 'megablocks'."""
    ep_size: int | str = 1
    """Expert-parallel degree: each rank holds num_experts / ep_size experts (1 = replicated), or 'auto': the
    cost model (mole_ds.parallel.cost_model) picks the placement at start-up and prints why."""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, "invalid MoLE config")

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
        ep_ok = False
        if isinstance(self.ep_size, str):
            if self.ep_size != "auto":
                p.append(f"mole.ep_size ({self.ep_size!r}) must be a positive integer or 'auto'")
        else:
            ep_ok = _int("ep_size", 1)
        if e_ok and k_ok and self.top_k > self.num_experts:
            p.append(f"mole.top_k ({self.top_k}) must be <= mole.num_experts ({self.num_experts})")
        if e_ok and ep_ok and self.num_experts % self.ep_size != 0:
            # The one place this rule lives: every layout builder trusts a validated config.
            p.append(f"mole.num_experts ({self.num_experts}) must be divisible by mole.ep_size ({self.ep_size})")
        if k_ok and self.routing == "oracle" and self.top_k != 1:
            p.append(f"mole.top_k ({self.top_k}) must be 1 with mole.routing 'oracle' (one expert per domain)")
        if _num("alpha") and self.alpha <= 0:
            p.append(f"mole.alpha ({self.alpha}) must be > 0")
        if _num("dropout") and not 0.0 <= self.dropout < 1.0:
            p.append(f"mole.dropout ({self.dropout}) must be in [0, 1)")
        if _num("router_temperature") and self.router_temperature <= 0:
            p.append(f"mole.router_temperature ({self.router_temperature}) must be > 0")
        for name in ("balance_coef", "z_loss_coef", "mi_coef", "router_noise"):
            if _num(name) and getattr(self, name) < 0:
                p.append(f"mole.{name} ({getattr(self, name)}) must be >= 0")
        _choice("routing", ROUTING_MODES)
        _choice("balance_loss", BALANCE_LOSSES)
        _choice("backend", BACKENDS)
        _choice("routing_level", ROUTING_LEVELS)
        for name in ("attn_lora", "train_projector", "router_input_norm", "router_center"):
            if not isinstance(getattr(self, name), bool):
                p.append(f"mole.{name} ({getattr(self, name)!r}) must be true or false")
        return p

    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / rank."""
        return float(self.alpha) / self.rank

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
