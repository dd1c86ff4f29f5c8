"""MoLEMLP: a frozen LLaMA MLP plus a top-k routed mixture of LoRA experts on gate/up/down."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MoLEConfig
from .dispatch import LocalDispatcher, get_backend
from .experts import LoRAExperts
from .losses import RoutingStats, routing_stats
from .router import TopKRouter


class MoLEMLP(nn.Module):
    """Drop-in replacement for a LLaMA-style MLP (``down(act(gate(x)) * up(x))``).

    Keeps the original frozen ``gate_proj``/``up_proj``/``down_proj`` modules under the same names (base
    weight keys unchanged) and ``act_fn``, and adds ``router`` and ``experts``. Forward:

    1. route each non-masked token in fp32 (``router``) -> chosen experts and their weights;
    2. dropout(x) goes through the chosen experts' gate/up LoRA (one dispatch plan for the layer);
    3. g = gate_proj(x) + s * dg, u = up_proj(x) + s * du, h = act(g) * u;
    4. y = down_proj(h) + s * dd, with dd the chosen experts' down LoRA on dropout(h).

    Local top-1 fast path (one dispatched expert per token, single process, grouped backend): the whole MLP
    runs on the tokens permuted into expert order, so only the narrow (T, hidden) input and output are
    permuted; the wide (T, intermediate) activations and deltas are never gathered or scattered:

    1. sort tokens by expert once; xs = x[order];
    2. gate/up: base projections on xs + grouped LoRA on contiguous expert groups of xs;
    3. h = act(g) * u (still in expert order); down: base + grouped LoRA on h;
    4. y[order] = ys.

    The routing statistics of the last forward are kept in ``last_stats`` for ``mole_ds.aux_loss``; the
    token mask (1 = real token) is set by a hook that ``patch_model`` puts on the language model.
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
        self.router = TopKRouter(hidden, config.num_experts, config.top_k, config.routing, **factory)
        n_local = config.num_experts if num_local_experts is None else num_local_experts
        self.experts = LoRAExperts(n_local, hidden, inter, config.rank, expert_offset, layer_idx, **factory)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.dispatcher = LocalDispatcher(get_backend(config.backend, w.device))
        self.token_mask: torch.Tensor | None = None
        self.sample_domains: torch.Tensor | None = None
        """(B,) domain id per sample of the next forward (set by ``mole_ds.set_sample_domains``; oracle routing)."""
        self.last_stats: RoutingStats | None = None

    def _mask_BS(self, B: int, S: int, device: torch.device) -> torch.Tensor:
        m = self.token_mask
        if m is None:
            return torch.ones(B, S, device=device)
        if m.dim() != 2 or m.shape[0] != B or m.shape[1] < S:
            raise ValueError(f"MoLE layer {self.layer_idx}: attention mask of shape {tuple(m.shape)} does not "
                             f"match hidden states of batch {B} and length {S}")
        return m[:, -S:].to(device)  # with a KV cache the mask covers past + current tokens

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        shape = x_BSD.shape
        D = shape[-1]
        x_TD = x_BSD.reshape(-1, D)
        B, S = (shape[0], shape[1]) if len(shape) == 3 else (1, x_TD.shape[0])

        route = self.router.route(self.router(x_TD))
        self.last_stats = routing_stats(route.logits_TE, route.probs_TE, route.chosen_TK, self._mask_BS(B, S, x_TD.device))

        ex = self.experts
        plan = self.dispatcher.plan(route.expert_idx_TJ, route.weights_TJ, self.config.num_experts)
        if self._sorted_path_ok(route):
            return self._forward_sorted(x_TD, plan).view(shape)
        dg_TF, du_TF = ex(self.lora_dropout(x_TD), plan, self.dispatcher, ("gate", "up"))
        g_TF = self.gate_proj(x_TD) + self.scaling * dg_TF.to(x_TD.dtype)
        u_TF = self.up_proj(x_TD) + self.scaling * du_TF.to(x_TD.dtype)
        h_TF = self.act_fn(g_TF) * u_TF
        (dd_TD,) = ex(self.lora_dropout(h_TF), plan, self.dispatcher, ("down",))
        y_TD = self.down_proj(h_TF) + self.scaling * dd_TD.to(h_TF.dtype)
        return y_TD.view(shape)

    def _sorted_path_ok(self, route) -> bool:
        d = self.dispatcher
        return (type(d) is LocalDispatcher and d.backend.name != "loop" and route.expert_idx_TJ.shape[1] == 1
                and self.experts.num_experts == self.config.num_experts)

    def _forward_sorted(self, x_TD: torch.Tensor, plan) -> torch.Tensor:
        ex, s = self.experts, self.scaling
        order_T, counts_E = plan.order_R, plan.counts_E
        # Sparse routing adds the delta unscaled: skip a (T, intermediate) multiply by ones.
        w_T1 = None if self.config.routing == "sparse" else plan.weight_R.to(x_TD.dtype)[:, None]
        xs_TD = x_TD.index_select(0, order_T)
        xd_TD = self.lora_dropout(xs_TD)
        dg_TF, du_TF = ex(xd_TD, plan, self.dispatcher, ("gate", "up"), grouped_counts=counts_E)
        if w_T1 is not None:
            dg_TF, du_TF = dg_TF * w_T1, du_TF * w_T1
        g_TF = self.gate_proj(xs_TD) + s * dg_TF.to(xs_TD.dtype)
        u_TF = self.up_proj(xs_TD) + s * du_TF.to(xs_TD.dtype)
        h_TF = self.act_fn(g_TF) * u_TF
        (dd_TD,) = ex(self.lora_dropout(h_TF), plan, self.dispatcher, ("down",), grouped_counts=counts_E)
        if w_T1 is not None:
            dd_TD = dd_TD * w_T1
        ys_TD = self.down_proj(h_TF) + s * dd_TD.to(h_TF.dtype)
        # Inverse permutation as a gather (its backward is a cheap scatter of the (T, hidden) gradient).
        inv_T = torch.empty_like(order_T)
        inv_T[order_T] = torch.arange(order_T.numel(), device=order_T.device)
        return ys_TD.index_select(0, inv_T)

    def extra_repr(self) -> str:
        c = self.config
        return (f"layer={self.layer_idx}, experts={c.num_experts}, top_k={c.top_k}, routing={c.routing}, "
                f"dispatcher={self.dispatcher!r}")
