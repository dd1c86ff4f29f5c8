"""Loading for inference: a local transformers base (LLaVA or Llama, offline) with a MoLE export restored.

:func:`load_for_inference` resolves the export (``mole_ds.checkpoint.resolve_consolidated``), loads the base
(:func:`load_base`), refuses an export that cannot be the base's (:func:`check_export_fits_base`), restores it
with ``mole_ds.export.load_mole`` and records the chat format of training (:func:`chat_format_of`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from ..checkpoint import CONSOLIDATED_NAME, read_config, read_consolidated, resolve_consolidated
from ..config import MoLEConfig
from ..data.chat import chat_tokenizer, check_chat_format
from ..export import load_mole
from ..mole.experts import is_expert_name
from ..patching import PatchReport, find_language_model
from ..runtime import bound_cpu_kernel_caches

DEFAULT_CHAT_FORMAT = "vicuna_v1"
SUPPORTED_MODEL_TYPES = {"llava": "LLaVA with a Llama language model", "llama": "Llama causal LM"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


def load_base(base: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor-or-tokenizer, is_llava) from a local transformers directory, offline, eval mode.

    Refuses (ValueError naming the path and the value) a directory without ``config.json``, a model that is
    neither LLaVA (with a Llama language model) nor Llama, and a directory without a processor/tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

    base = Path(base)
    if not (base / "config.json").is_file():
        raise ValueError(f"base model {base} is not a local transformers model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(base, local_files_only=True)
    text_type = getattr(getattr(cfg, "text_config", None), "model_type", None)
    if cfg.model_type not in SUPPORTED_MODEL_TYPES or (cfg.model_type == "llava" and text_type != "llama"):
        kind = f"{cfg.model_type!r}" + (f" with a {text_type!r} language model" if text_type else "")
        raise ValueError(f"base model {base} is a {kind} model ({', '.join(cfg.architectures or [])}); mole_ds "
                         "runs LLaVA models with a Llama language model (model_type 'llava') and Llama models "
                         "(model_type 'llama')")
    is_llava = cfg.model_type == "llava"
    cls = LlavaForConditionalGeneration if is_llava else AutoModelForCausalLM
    model = cls.from_pretrained(base, dtype=dtype, local_files_only=True).eval()
    try:
        processor = AutoProcessor.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"base model {base} has no processor/tokenizer saved beside it: {e}") from e
    return model, processor, is_llava


def chat_format_of(extra: dict) -> str:
    """The chat format the export was trained with: ``extra["chat_format"]``, else the training run config's
    ``data.chat_format`` (recorded in every training checkpoint's consolidated file), else vicuna_v1."""
    run_data = ((extra.get("run_config") or {}).get("data") or {}) if isinstance(extra.get("run_config"), dict) else {}
    return extra.get("chat_format") or run_data.get("chat_format") or DEFAULT_CHAT_FORMAT


def check_export_fits_base(state: dict[str, torch.Tensor], cfg: MoLEConfig, model: nn.Module,
                           export: Path, base: Path | str) -> None:
    """Refuse an export that cannot be the base's (before anything is patched), naming both paths.

    1. every expert tensor holds ``cfg.num_experts`` experts on dim 0 (the file agrees with its own config);
    2. the export has MoLE tensors for exactly the base's decoder layers."""
    bad = [(n, tuple(t.shape)) for n, t in state.items() if is_expert_name(n) and t.shape[0] != cfg.num_experts]
    if bad:
        name, shape = bad[0]
        raise ValueError(f"export {export} holds {shape[0]} experts in {name} (shape {shape}) but its config says "
                         f"num_experts={cfg.num_experts}: the file is inconsistent")
    layers = sorted({int(m[1]) for n in state if ".mlp." in n and (m := _LAYER_RE.search(n))})
    n_base = len(find_language_model(model).layers)
    if layers != list(range(n_base)):
        have = f"layers {layers[0]}..{layers[-1]} ({len(layers)} layers)" if layers else "no decoder layer"
        raise ValueError(f"export {export} has MoLE tensors for {have}; base model {base} has {n_base} decoder "
                         "layers: the export was trained on another base model")


@dataclass
class InferenceModel:
    """A base model with a MoLE export restored, ready for ``generate`` / ``loglikelihood``."""

    model: nn.Module
    processor: object
    """LlavaProcessor for LLaVA bases, the tokenizer for Llama bases."""
    is_llava: bool
    config: MoLEConfig
    extra: dict
    """The export's recorded metadata (base_model, step, domains, chat_format, ...)."""
    export: Path
    base: Path
    chat_format: str
    report: PatchReport

    @property
    def tokenizer(self):
        """The tokenizer that renders prompts (with the processor's chat_template when only it has one)."""
        return chat_tokenizer(self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def domain_ids(self, domains: Sequence[str | None] | None) -> torch.Tensor | None:
        """(B,) ids of ``domains`` in the export's training domain list, for ``routing: oracle`` exports."""
        if self.config.routing != "oracle":
            return None
        names = list(self.extra.get("domains") or [])
        missing = sorted({str(d) for d in (domains or [None]) if d not in names})
        if missing:
            raise ValueError(f"export {self.export} routes by domain (routing 'oracle'): every sample needs a "
                             f"domain among {names}, got {missing}")
        return torch.tensor([names.index(d) for d in domains], dtype=torch.long)


def load_for_inference(export: str | Path, base: str | Path | None = None, *, dtype: torch.dtype | str = "float32",
                       device: str | torch.device = "cpu", backend: str | None = None,
                       chat_format: str | None = None) -> InferenceModel:
    """Load ``base`` (default: the base_model recorded in the export) and restore ``export`` into it.

    ``export`` is a ``mole.safetensors``, a directory holding one or a training output_dir (newest complete
    checkpoint). ``chat_format`` overrides the one recorded in the export. Errors (FileNotFoundError /
    ValueError) name the path and the offending values."""
    bound_cpu_kernel_caches()  # prompts of every length: one kernel per shape (mole_ds.runtime)
    path = resolve_consolidated(export)
    state, cfg, extra = read_consolidated(path)
    base = base or extra.get("base_model")
    if not base:
        raise ValueError(f"export {path} records no base_model: give the base model directory")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model, processor, is_llava = load_base(base, dtype)
    check_export_fits_base(state, cfg, model, path, base)
    del state
    try:
        report = load_mole(path, model, backend=backend)
    except ValueError as e:
        raise ValueError(f"export {path} does not fit base model {base}: {e}") from e
    model.to(device).eval()
    fmt = chat_format or chat_format_of(extra)
    check_chat_format(fmt)
    return InferenceModel(model, processor, is_llava, cfg, extra, path, Path(base), fmt, report)


def write_full_model(consolidated: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """The full model for inference: ``out/base/`` (the base model as ``save_pretrained`` writes it, with its
    processor) and ``out/mole.safetensors`` (load both with :func:`load_for_inference`)."""
    import shutil

    _, extra = read_config(consolidated)
    base = base or extra.get("base_model")
    if not base:
        raise ValueError(f"{consolidated}: no base model recorded; pass base")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor, _ = load_base(base)
    model.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")
    target = out / CONSOLIDATED_NAME
    if Path(consolidated).resolve() != target.resolve():
        shutil.copyfile(consolidated, target)
    return out


__all__ = ["DEFAULT_CHAT_FORMAT", "SUPPORTED_MODEL_TYPES", "InferenceModel", "chat_format_of",
           "check_export_fits_base", "load_base", "load_for_inference", "write_full_model"]
