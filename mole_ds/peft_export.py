"""Export a consolidated MoLE file as one PEFT LoRA adapter per expert.

Semantics of ``expert_{k}/``: the base model with expert k's LoRA on every decoder MLP (gate/up/down) plus the
shared attention LoRA (q/k/v/o), each delta with weight 1 and PEFT scaling ``lora_alpha / r`` (= MoLE's
``alpha / rank``). That is exactly the MoLE model with **every token routed to expert k alone with weight 1**:

* ``sparse`` routing, ``top_k`` 1: the trained model picks an expert per token and layer; the adapter forces
  expert k everywhere. It reproduces the trained model only where the router chose k.
* ``sparse`` with ``top_k`` > 1 (deltas of k experts summed), ``weighted`` (delta times its router
  probability) and ``dense`` (all experts, softmax-weighted): no single adapter is the trained model's
  behaviour, not even for a token whose top-1 expert is k. The adapter is a probe of one expert, not a
  replacement for ``mole_ds.load_mole``.

Routers are not exported (PEFT has no place for them). A trained multimodal projector travels with every
adapter in PEFT's ``modules_to_save`` (saved under its plain module names, as PEFT itself writes it).

Algorithm of :func:`export_peft_adapters`:
  1. read the consolidated file (``mole_ds.checkpoint.read_consolidated``): trainable tensors + MoLE config;
  2. sort its tensors into experts (``<lm>.layers.N.mlp.experts.{gate,up,down}_{A,B}``, E on dim 0), attention
     LoRA (``<lm>.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}``), routers (dropped) and projector; anything
     else is an error (an adapter that silently lacks a trained tensor is worse than none);
  3. target modules = a full-match regex anchored at the language model's prefix (``<lm>.layers.N.``), so the
     CLIP vision tower's own q/k/v projections are never wrapped;
  4. per expert k: PEFT keys ``base_model.model.<module>.lora_{A,B}.weight`` from slice k (and the shared
     attention/projector tensors), written with ``LoraConfig.save_pretrained`` + safetensors, plus a README and
     ``mole_expert.json`` that state the semantics above.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import MoLEConfig
from .checkpoint import read_consolidated

_EXPERT_RE = re.compile(r"^(?P<lm>.*?)layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<proj>gate|up|down)_(?P<ab>[AB])$")
_ATTN_RE = re.compile(r"^(?P<lm>.*?)layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkvo]_proj)\.lora_(?P<ab>[AB])$")
_ROUTER_RE = re.compile(r"^.*?layers\.\d+\.mlp\.router\.(weight|bias)$")
_PROJECTOR_RE = re.compile(r"^(?P<module>(?:.*\.)?multi_modal_projector)\.(?P<rest>.+)$")


def target_modules_regex(lm_prefix: str, attn: bool) -> str:
    """Full-match regex for PEFT's ``target_modules``: the decoder MLPs (and attention) of the language model
    whose module path starts with ``lm_prefix`` (e.g. ``model.language_model.``), nothing in the vision tower."""
    mods = r"mlp\.(gate_proj|up_proj|down_proj)"
    if attn:
        mods = rf"({mods}|self_attn\.(q_proj|k_proj|v_proj|o_proj))"
    return rf"{re.escape(lm_prefix)}layers\.\d+\.{mods}"


def _split(state: dict[str, torch.Tensor], path: Path):
    experts: dict[str, torch.Tensor] = {}   # module path of the base Linear + ".lora_A" -> (E, ...) tensor
    attn: dict[str, torch.Tensor] = {}      # module path + ".lora_A" -> tensor
    projector: dict[str, torch.Tensor] = {}
    projector_modules: set[str] = set()
    prefixes: set[str] = set()
    unknown: list[str] = []
    for name, t in state.items():
        if m := _EXPERT_RE.match(name):
            prefixes.add(m["lm"])
            experts[f"{m['lm']}layers.{m['layer']}.mlp.{m['proj']}_proj.lora_{m['ab']}"] = t
        elif m := _ATTN_RE.match(name):
            prefixes.add(m["lm"])
            attn[f"{m['lm']}layers.{m['layer']}.self_attn.{m['proj']}.lora_{m['ab']}"] = t
        elif _ROUTER_RE.match(name):
            continue  # routers have no PEFT counterpart: dropped by design
        elif m := _PROJECTOR_RE.match(name):
            projector[name] = t
            projector_modules.add(m["module"])
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"{path}: cannot map trained tensor(s) {unknown[:5]}{'...' if len(unknown) > 5 else ''} "
                         "to a PEFT LoRA adapter (only MoLE experts, attention LoRA, routers and the "
                         "multi_modal_projector are known)")
    if not experts:
        raise ValueError(f"{path}: no MoLE expert tensors (…layers.N.mlp.experts.gate_A …) in the file")
    if len(prefixes) != 1:
        raise ValueError(f"{path}: expert tensors under several decoder stacks {sorted(prefixes)}")
    return experts, attn, projector, sorted(projector_modules), prefixes.pop()


def _readme(k: int, cfg: MoLEConfig, base: str | None, extra: dict, projector: bool) -> str:
    exact = cfg.routing == "sparse" and cfg.top_k == 1
    caveat = ("It reproduces the trained MoLE model exactly for the tokens (and layers) where the router chose "
              f"expert {k}; elsewhere the trained model would have used another expert."
              if exact else
              f"WARNING: this run used routing={cfg.routing!r}, top_k={cfg.top_k}. The trained model "
              + ("scales each chosen expert's delta by its router probability"
                 if cfg.routing == "weighted" else
                 "mixes every expert's delta, weighted by the router's softmax" if cfg.routing == "dense" else
                 f"adds the deltas of {cfg.top_k} experts per token")
              + ", so no single adapter is the trained model's behaviour, not even where expert "
              f"{k} ranks first. Use mole_ds.load_mole for the trained model.")
    domains = ", ".join(extra.get("domains") or [])
    trained_on = f", domains {domains}" if domains else ""
    projector_note = ", and the trained multimodal projector (modules_to_save)" if projector else ""
    return f"""# MoLE expert {k} of {cfg.num_experts} as a PEFT LoRA adapter

Exported by `mole_ds` from a consolidated MoLE checkpoint (step {extra.get('step', '?')}{trained_on}).

Contents: expert {k}'s LoRA on every decoder `gate_proj`/`up_proj`/`down_proj` plus the shared attention
LoRA on `q_proj`/`k_proj`/`v_proj`/`o_proj` of the language model (r={cfg.rank}, lora_alpha={cfg.alpha:g}){projector_note}.
Routers are not included.

Semantics: this adapter equals the MoLE model with **every token routed to expert {k} with weight 1**
(sparse routing). {caveat}

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "<this directory>")  # base_model: {base or "the training base model"}
```
"""


def export_peft_adapters(consolidated_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``out_dir/expert_{k}/`` (PEFT LoRA adapter) for every expert k of a consolidated MoLE file.

    Each directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` (what
    ``peft.PeftModel.from_pretrained(base_model, dir)`` loads offline), ``README.md`` and ``mole_expert.json``.
    See the module docstring for what an adapter means under each routing mode. Returns the directories."""
    from peft import LoraConfig

    path = Path(consolidated_path)
    state, cfg, extra = read_consolidated(path)
    experts, attn, projector, projector_modules, lm_prefix = _split(state, path)
    E = cfg.num_experts
    bad = sorted(n for n, t in experts.items() if t.shape[0] != E)
    if bad:
        raise ValueError(f"{path}: expert tensors {bad[:3]} do not hold num_experts ({E}) experts on dim 0")
    if cfg.attn_lora and not attn:
        raise ValueError(f"{path}: mole.attn_lora is true but the file has no attention LoRA tensors")
    base = extra.get("base_model")
    lora_config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=target_modules_regex(lm_prefix, attn=bool(attn)),
        modules_to_save=[m.rsplit(".", 1)[-1] for m in projector_modules] or None,
        base_model_name_or_path=base, inference_mode=True,
    )
    exact = cfg.routing == "sparse" and cfg.top_k == 1
    out_dir = Path(out_dir)
    written = []
    for k in range(E):
        d = out_dir / f"expert_{k}"
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"base_model.model.{n}.weight": t[k] for n, t in experts.items()}
        tensors.update({f"base_model.model.{n}.weight": t for n, t in attn.items()})
        tensors.update({f"base_model.model.{n}": t for n, t in projector.items()})
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(d / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        lora_config.save_pretrained(str(d))
        (d / "README.md").write_text(_readme(k, cfg, base, extra, bool(projector)))
        (d / "mole_expert.json").write_text(json.dumps({
            "expert": k, "num_experts": E, "source": str(path.resolve()), "step": extra.get("step"),
            "base_model": base, "mole_config": cfg.to_dict(), "routers_dropped": True,
            "projector_included": bool(projector),
            "semantics": f"every token routed to expert {k} with weight 1 (sparse routing)",
            "equals_trained_model_where_router_chose_k": exact,
        }, indent=1))
        written.append(d)
    return written
