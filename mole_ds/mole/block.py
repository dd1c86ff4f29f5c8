"""MoLEMLP: a frozen LLaMA MLP plus a top-k routed mixture of LoRA experts on gate/up/down."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MoLEConfig
from .dispatch import LocalDispatcher, get_backend
from .experts import LoRAExperts
from .losses import RoutingStats, routing_stats
from .router import TopKRouter
from .sample_routing import sample_logits_TE


class MoLEMLP(nn.Module):
    """Drop-in replacement for a LLaMA-style MLP (``down(act(gate(x)) * up(x))``).

    Keeps the original frozen ``gate_proj``/``up_proj``/``down_proj`` modules under the same names (base
    weight keys unchanged) and ``act_fn``, and adds ``router`` and ``experts``. Forward (token dispatch):

    1. route each token in fp32 (``router``): J rows per token, each with an expert, a delta weight w and a
       combine weight c (see :class:`mole_ds.MoLEConfig` for the routing modes);
    2. ``dispatcher.dispatch``: the rows, grouped by expert, reach the process that holds their expert (here,
       or another rank under expert parallelism: only hidden-size rows travel);
    3. :meth:`expert_mlp` on the rows: the whole MLP, frozen projections plus each row's expert LoRA on gate,
       up and down, as grouped products over contiguous expert groups;
    4. ``dispatcher.combine``: the (hidden-size) outputs go back to their tokens, summed with weights c.

    The module never calls a collective: the dispatcher decides where rows go. The routing statistics of the
    last forward are kept in ``last_stats`` for ``mole_ds.aux_loss``; the token mask (1 = real token) is set by
    a hook that ``patch_model`` puts on the language model.
    """

    def __init__(self, mlp: nn.Module, config: MoLEConfig, layer_idx: int = 0,
                 expert_offset: int = 0, num_local_experts: int | None = None) -> None:
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise TypeError(f"cannot patch {type(mlp).__name__} (layer {layer_idx}): it has no {name}; "
                                "MoLE needs a LLaMA-style gated MLP")
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.config = config
        self.layer_idx = layer_idx
        hidden, inter = self.gate_proj.in_features, self.gate_proj.out_features
        w = self.gate_proj.weight
        # Under ZeRO-3 the base weight may be a partitioned placeholder; its dtype/device still hold.
        factory = {"dtype": w.dtype, "device": w.device}
        self.router = TopKRouter(hidden, config.num_experts, config.top_k, config.routing,
                                 temperature=config.router_temperature, input_norm=config.router_input_norm,
                                 noise=config.router_noise, center=config.router_center, **factory)
        n_local = config.num_experts if num_local_experts is None else num_local_experts
        self.experts = LoRAExperts(n_local, hidden, inter, config.rank, expert_offset, layer_idx, **factory)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.dispatcher = LocalDispatcher(get_backend(config.backend, w.device))
        self.token_mask: torch.Tensor | None = None
        self.sample_domains: torch.Tensor | None = None
        """(B,) domain id per sample of the next forward (set by ``mole_ds.set_sample_domains``; oracle routing)."""
        self.prompt_mask: torch.Tensor | None = None
        """(B, S) prompt tokens of the next forward (``mole_ds.set_prompt_mask``; sample routing)."""
        self.past_length = 0
        """Positions in the KV cache the next forward continues (0: none), set with ``token_mask`` by the hook
        ``patch_model`` puts on the language model; sample routing reuses its decision when it is > 0."""
        self.sample_logits_BE: torch.Tensor | None = None
        """Sample routing: the last prompt step's per-sample logits, reused by KV-cache decoding steps."""
        self.last_stats: RoutingStats | None = None
        self.recomputing = False
        """Set while activation checkpointing re-runs this layer's forward during backward: the routing
        statistics of the real forward are kept (``mole_ds.parallel.activation_checkpoint``)."""

    def _mask_BS(self, B: int, S: int, device: torch.device) -> torch.Tensor:
        m = self.token_mask
        if m is None:
            return torch.ones(B, S, device=device)
        if m.dim() != 2 or m.shape[0] != B or m.shape[1] < S:
            raise ValueError(f"MoLE layer {self.layer_idx}: attention mask of shape {tuple(m.shape)} does not "
                             f"match hidden states of batch {B} and length {S}")
        return m[:, -S:].to(device)  # with a KV cache the mask covers past + current tokens

    def _domain_T(self, B: int, S: int) -> torch.Tensor | None:
        d = self.sample_domains
        if d is None or self.config.routing != "oracle":
            return None
        if d.dim() != 1 or d.shape[0] != B:
            raise ValueError(f"MoLE layer {self.layer_idx}: sample domains of shape {tuple(d.shape)} do not match "
                             f"a batch of {B}")
        return d.view(B, 1).expand(B, S).reshape(-1)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        shape = x_BSD.shape
        D = shape[-1]
        x_TD = x_BSD.reshape(-1, D)
        B, S = (shape[0], shape[1]) if len(shape) == 3 else (1, x_TD.shape[0])

        if self.config.routing_level == "sample" and self.config.routing != "oracle":
            logits_TE = sample_logits_TE(self, x_TD, B, S)  # one decision per sample (mole/sample_routing.py)
        else:
            logits_TE = self.router(x_TD)
        route = self.router.route(logits_TE, self._domain_T(B, S))
        # Computed in a recompute too (the aux loss's backward needs the tensors it saves), kept only from the
        # real forward.
        stats = routing_stats(route.logits_TE, route.probs_TE, route.chosen_TK, self._mask_BS(B, S, x_TD.device))
        if not self.recomputing:
            self.last_stats = stats

        d = self.dispatcher
        plan = d.plan(route.expert_idx_TJ, self.config.num_experts)
        x_QD, w_Q1 = d.dispatch(x_TD, plan, route.delta_weight_TJ)
        y_QD = self.expert_mlp(x_QD, d.local_counts(plan), w_Q1)
        return d.combine(y_QD, plan, route.combine_weight_TJ, x_TD.shape[0]).view(shape)

    def expert_mlp(self, x_QD: torch.Tensor, counts_L: torch.Tensor, w_Q1: torch.Tensor | None) -> torch.Tensor:
        """The MLP of rows grouped by local expert (``counts_L[e]`` rows of expert e, in order).

        1. dg, du = w * grouped LoRA (gate, up) of dropout(x);
        2. g = gate_proj(x) + s dg, u = up_proj(x) + s du, h = act(g) * u  (s = alpha / rank);
        3. y = down_proj(h) + s * w * grouped LoRA (down) of dropout(h).
        Sparse routing has w = None: no (rows, intermediate) multiply by ones.
        """
        ex, s, backend = self.experts, self.scaling, self.dispatcher.backend
        dg_QF, du_QF = ex(self.lora_dropout(x_QD), counts_L, backend, ("gate", "up"))
        if w_Q1 is not None:
            dg_QF, du_QF = dg_QF * w_Q1, du_QF * w_Q1
        g_QF = self.gate_proj(x_QD) + s * dg_QF.to(x_QD.dtype)
        u_QF = self.up_proj(x_QD) + s * du_QF.to(x_QD.dtype)
        h_QF = self.act_fn(g_QF) * u_QF
        (dd_QD,) = ex(self.lora_dropout(h_QF), counts_L, backend, ("down",))
        if w_Q1 is not None:
            dd_QD = dd_QD * w_Q1
        return self.down_proj(h_QF) + s * dd_QD.to(h_QF.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (f"layer={self.layer_idx}, experts={c.num_experts}, top_k={c.top_k}, routing={c.routing}, "
                f"dispatcher={self.dispatcher!r}")
