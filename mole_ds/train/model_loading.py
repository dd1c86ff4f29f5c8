"""Build the base model (and its processor) a run trains: the embedded tiny LLaVA, or a local transformers
checkpoint directory (loaded partitioned under ZeRO-3), in the run's precision."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .config import ModelSection


def ds_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def model_dtype(section: ModelSection, ds: dict) -> torch.dtype:
    if section.dtype == "bf16" or (section.dtype == "auto" and ds.get("bf16", {}).get("enabled")):
        return torch.bfloat16
    return torch.float32


def build_model(section: ModelSection, ds: dict, seed: int = 0):
    """(model, processor). An empty ``section.path`` builds the embedded tiny LLaVA locally.

    Under ZeRO-3 a checkpoint directory is loaded inside ``deepspeed.zero.Init`` (through transformers'
    HfDeepSpeedConfig), so each rank only ever holds its partition of the frozen weights; the tiny embedded
    model is built whole and partitioned by ``deepspeed.initialize``."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    dtype = model_dtype(section, ds)
    zero3 = ds_stage(ds) == 3
    torch.manual_seed(seed)
    if section.path:
        path = Path(section.path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path ({section.path!r}) is not a local transformers model directory "
                             "(no config.json); nothing is downloaded")
        keep_alive = None
        if zero3:
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(copy.deepcopy(ds))  # makes from_pretrained load under zero.Init
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        cls = LlavaForConditionalGeneration if cfg.model_type == "llava" else None
        if cls is None:
            from transformers import AutoModelForCausalLM as cls  # noqa: N813
        model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
        model._mole_hf_ds_config = keep_alive
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        return model, processor

    from ..models.processor import build_tiny_processor
    from ..models.tiny import tiny_llava_config

    processor = build_tiny_processor(image_size=32, patch_size=8)
    tok = processor.tokenizer
    # initializer_range 1/sqrt(hidden), not transformers' 0.02: the frozen lm_head sits behind an RMSNorm of
    # weight 1, so at 0.02 its logits can never exceed ~0.16 sqrt(hidden) and no adapter could make the
    # model confident (answer loss stalls near 6 nats). Pretrained heads are not capped like that.
    cfg = tiny_llava_config(vocab_size=len(tok), image_token_id=processor.image_token_id,
                            pad_token_id=tok.pad_token_id, hidden_size=section.tiny_hidden,
                            intermediate_size=2 * section.tiny_hidden, num_layers=section.tiny_layers,
                            initializer_range=section.tiny_hidden ** -0.5)
    # Built whole (it is tiny); deepspeed.initialize partitions it under ZeRO-3. transformers' own weight
    # init cannot run inside zero.Init without its HfDeepSpeedConfig machinery.
    model = LlavaForConditionalGeneration(cfg).to(dtype)
    return model, processor




def bf16_supported() -> tuple[bool, str]:
    """(supported, why): any CUDA GPU, or a CPU with native bf16 (AVX512-BF16 or AMX) that oneDNN uses."""
    if torch.cuda.is_available():
        return True, "CUDA"
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return native, ("CPU with native bf16" if native else "CPU without native bf16 (AVX512-BF16/AMX)")


def resolve_precision(ds: dict) -> tuple[dict, str]:
    """The DeepSpeed config with ``"bf16": {"enabled": "auto"}`` made concrete (bf16 where the hardware has it,
    fp32 elsewhere), and a one-line reason to print. Explicit true/false are kept."""
    bf = ds.get("bf16") or {}
    if bf.get("enabled") != "auto":
        return ds, f"bf16 {'on' if bf.get('enabled') else 'off'} (DeepSpeed config)"
    ok, why = bf16_supported()
    ds = copy.deepcopy(ds)
    ds["bf16"] = {**bf, "enabled": ok}
    return ds, f"bf16 auto -> {'bf16' if ok else 'fp32'} ({why})"
