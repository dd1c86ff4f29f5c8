"""Turn a transformers LLaMA or LLaVA model into a MoLE model: freeze, wrap, report."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .config import MoLEConfig
from .mole.block import MoLEMLP
from .mole.experts import is_expert_name
from .mole.lora import LoRALinear

ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class PatchReport:
    """What ``patch_model`` did."""

    model_class: str
    layers: int
    num_experts: int
    local_experts: int = 0
    """Experts held by this process (num_experts unless expert parallel)."""
    attn_lora_modules: list[str] = field(default_factory=list)
    mole_modules: list[str] = field(default_factory=list)
    projector_trainable: bool = False
    trainable_params: int = 0
    total_params: int = 0
    trainable_by_kind: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {v:,}" for k, v in self.trainable_by_kind.items())
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        if self.num_experts == 0:
            return (f"{self.model_class}: no MoLE, LLM + projector trained in full: trainable "
                    f"{self.trainable_params:,} of {self.total_params:,}")
        held = "" if self.local_experts in (0, self.num_experts) else f" ({self.local_experts} held here)"
        return (f"{self.model_class}: {self.layers} MoLE MLPs x {self.num_experts} experts{held}, "
                f"{len(self.attn_lora_modules)} attention LoRA modules; trainable {self.trainable_params:,} of "
                f"{self.total_params:,} ({pct:.2f}%) on this process: {kinds}")


def find_language_model(model: nn.Module) -> nn.Module:
    """The LLaMA-style decoder stack (a module with ``.layers``) inside a CausalLM or LLaVA model."""
    candidates = [
        getattr(getattr(model, "model", None), "language_model", None),  # LlavaForConditionalGeneration
        getattr(model, "language_model", None),                          # LlavaModel
        getattr(model, "model", None),                                   # LlamaForCausalLM
        model,                                                           # LlamaModel
    ]
    for c in candidates:
        if c is not None and isinstance(getattr(c, "layers", None), nn.ModuleList):
            return c
    raise TypeError(f"cannot find a decoder stack (a module with .layers) in {type(model).__name__}; "
                    "mole_ds patches LlamaForCausalLM- and LlavaForConditionalGeneration-style models")


def find_projector(model: nn.Module) -> nn.Module | None:
    for holder in (getattr(model, "model", None), model):
        proj = getattr(holder, "multi_modal_projector", None) if holder is not None else None
        if proj is not None:
            return proj
    return None


def mole_layers(model: nn.Module) -> list[MoLEMLP]:
    """Every MoLE MLP of a patched model, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoLEMLP)]


def set_sample_domains(model: nn.Module, domain_ids_B) -> None:
    """Tell every MoLE layer the domain id of each sample of the next forward (a (B,) int tensor, or None).

    Only ``routing: oracle`` uses it (each sample's tokens go to the expert of its domain); the training loop
    sets it for every batch that carries domain ids, so any routing mode can be switched to oracle."""
    for layer in mole_layers(model):
        layer.sample_domains = domain_ids_B


def set_prompt_mask(model: nn.Module, prompt_mask_BS) -> None:
    """Tell every MoLE layer which tokens of the next forward are the prompt ((B, S) bool/0-1, or None).

    Used by ``routing_level: sample`` only (``mole_ds.mole.sample_routing``); set it before every training
    forward (e.g. ``prompt_mask_from_labels(labels, attention_mask)``) and for scoring a continuation in one
    forward. None (the default): the whole input of a forward is the prompt (generation)."""
    layers = mole_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoLE layers; call mole_ds.patch_model first")
    for layer in layers:
        layer.prompt_mask = prompt_mask_BS


def _past_length(kwargs: dict) -> int:
    """Positions already in the KV cache a decoder forward continues (0: none, or no cache).

    The cache is ``cache`` (transformers >= 5) or ``past_key_values``; a ``Cache`` object tells its length, a
    legacy tuple cache holds (key, value) per layer, keys (B, heads, past, head_dim)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None and len(cache[0]):
        return int(cache[0][0].shape[-2])
    return 0


def _mask_hook():
    # Decoder MLPs never see the attention mask; hand it to them before the decoder stack runs, so pad
    # tokens count neither in the balance loss nor in the routing statistics. The layers are looked up on the
    # module the hook runs on, not captured: a deep copy of a patched model then feeds its own layers.
    # Sample routing also needs to know whether the forward continues a KV cache (a decoding step): the mask
    # alone cannot tell, since generate drops an all-ones mask (no padding, e.g. batch 1) and passes None.
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        if mask is not None and mask.dim() != 2:
            mask = None  # a custom 4D mask has no per-token padding to read; count every token
        layers = mole_layers(module)
        past = _past_length(kwargs) if any(m.config.routing_level == "sample" for m in layers) else 0
        for layer in layers:
            layer.token_mask = mask
            layer.past_length = past
    return hook


def patch_model(model: nn.Module, config: MoLEConfig, *, expert_offset: int = 0,
                num_local_experts: int | None = None) -> PatchReport:
    """Patch every LLM decoder layer in place and freeze everything but LoRA, experts and routers.

    * ``layer.mlp`` becomes :class:`MoLEMLP` (base projections kept under their names, B = 0 at init, so the
      patched model equals the base model until it trains);
    * with ``config.attn_lora``, q/k/v/o become :class:`LoRALinear` (same rank and alpha);
    * the vision tower is untouched and frozen; the projector is trainable iff ``config.train_projector``.

    ``expert_offset``/``num_local_experts`` build only one rank's slice of the experts (expert parallelism).
    Returns a :class:`PatchReport`.
    """
    if mole_layers(model):
        raise ValueError(f"{type(model).__name__} is already patched with MoLE layers")
    lm = find_language_model(model)
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)

    report = PatchReport(type(model).__name__, len(lm.layers), config.num_experts,
                         local_experts=config.num_experts if num_local_experts is None else num_local_experts)
    for i, layer in enumerate(lm.layers):
        layer.mlp = MoLEMLP(layer.mlp, config, layer_idx=i, expert_offset=expert_offset,
                            num_local_experts=num_local_experts)
        report.mole_modules.append(f"layers.{i}.mlp")
        if config.attn_lora:
            attn = layer.self_attn
            for name in ATTN_PROJECTIONS:
                base = getattr(attn, name, None)
                if not isinstance(base, nn.Linear):
                    raise TypeError(f"layer {i}: self_attn.{name} is {type(base).__name__}, expected nn.Linear")
                setattr(attn, name, LoRALinear(base, config.rank, config.alpha, config.dropout))
                report.attn_lora_modules.append(f"layers.{i}.self_attn.{name}")

    for m in model.modules():
        if isinstance(m, MoLEMLP):
            for p in list(m.router.parameters()) + list(m.experts.parameters()):
                p.requires_grad_(True)
        elif isinstance(m, LoRALinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    projector = find_projector(model)
    if config.train_projector:
        if projector is None:
            raise ValueError(f"mole.train_projector (True) but {type(model).__name__} has no multi_modal_projector")
        for p in projector.parameters():
            p.requires_grad_(True)
        report.projector_trainable = True

    lm.register_forward_pre_hook(_mask_hook(), with_kwargs=True)
    model.mole_config = config
    model.train(was_training)  # new modules (with dropout) take the mode of the model they joined

    kinds = {"experts": 0, "routers": 0, "attn_lora": 0, "projector": 0}
    for name, p in model.named_parameters():
        n = _numel(p)
        report.total_params += n
        if not p.requires_grad:
            continue
        report.trainable_params += n
        if is_expert_name(name):
            kinds["experts"] += n
        elif ".router." in name:
            kinds["routers"] += n
        elif ".lora_" in name:
            kinds["attn_lora"] += n
        else:
            kinds["projector"] += n
    report.trainable_by_kind = {k: v for k, v in kinds.items() if v}
    return report


def _numel(p: nn.Parameter) -> int:
    # ZeRO-3 partitioned parameters report their full size in ds_numel.
    return int(getattr(p, "ds_numel", p.numel()))
