#!/usr/bin/env python
"""Greedy generation with an exported MoLE model, optionally showing each token's experts.

    python tools/generate.py EXPORT --prompt "What is in the image?" [--image img.png] [--max-new-tokens 32]
                             [--base BASE_MODEL_DIR] [--show-routing]

EXPORT is a consolidated ``mole.safetensors``, a directory holding one (``tools/export.py --out`` or a
checkpoint tag) or a training ``output_dir`` (newest complete checkpoint). The base model (weights +
processor, a local transformers directory) defaults to the ``base_model`` recorded in the export.

Algorithm:
  1. load the base model from BASE (LLaVA or a causal LM) and ``mole_ds.load_mole`` the export into it;
  2. render the LLaVA-1.5 (vicuna_v1) prompt: ``<s>{SYSTEM} USER: <image>\\n{prompt} ASSISTANT:``
     (no ``<image>`` without --image); the processor expands the placeholder into the image tokens;
  3. greedy-decode up to --max-new-tokens with ``model.generate`` (stops at ``</s>``);
  4. --show-routing: a forward hook on every MoLE router keeps, per decoding step, the top-k experts of the
     last input position, i.e. of the position whose logits produced that step's token (the prompt's last
     token for step 0, the previous generated token afterwards). One line per generated token, layer 0 first,
     each expert with its router probability.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from mole_ds.data.conversation import build_segments
from mole_ds.export import read_consolidated
from mole_ds.peft_export import resolve_consolidated


def render_generation_prompt(prompt: str, has_image: bool) -> str:
    """The vicuna_v1 prompt up to and including "ASSISTANT:" (the template of training, without a reply)."""
    question = f"<image>\n{prompt}" if has_image else prompt
    # build_segments drops a trailing user turn without a reply: give it an empty reply and keep the part
    # before it (the unsupervised segment ending in "ASSISTANT:").
    segs = build_segments([{"from": "human", "value": question}, {"from": "gpt", "value": ""}])
    return "".join(text for text, supervised in segs if not supervised)


def load_base(base: str | Path, dtype: torch.dtype):
    """(model, processor-or-tokenizer, is_llava) from a local transformers directory, offline."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

    base = Path(base)
    if not (base / "config.json").is_file():
        raise ValueError(f"base model {base} is not a local transformers model directory (no config.json); "
                         "give one with --base")
    cfg = AutoConfig.from_pretrained(base, local_files_only=True)
    is_llava = cfg.model_type == "llava"
    cls = LlavaForConditionalGeneration if is_llava else AutoModelForCausalLM
    model = cls.from_pretrained(base, dtype=dtype, local_files_only=True).eval()
    try:
        processor = AutoProcessor.from_pretrained(base, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"base model {base} has no processor/tokenizer saved beside it: {e}") from e
    return model, processor, is_llava


class RoutingRecorder:
    """Forward hooks on every MoLE router: per call, the top-k experts and probabilities of the last token."""

    def __init__(self, model: torch.nn.Module) -> None:
        from mole_ds import mole_layers

        self.layers = mole_layers(model)
        self.steps: list[dict[int, tuple[list[int], list[float]]]] = []
        self._handles = [m.router.register_forward_hook(self._hook(i, m)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int, layer):
        def hook(module, args, logits_TE):
            if i == 0:
                self.steps.append({})
            probs_E = logits_TE[-1].float().softmax(-1)  # batch 1: the last row is the last input position
            p_K, e_K = probs_E.topk(module.top_k)
            self.steps[-1][i] = (e_K.tolist(), p_K.tolist())
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def format_routing(step: int, token_id: int, piece: str, record: dict) -> str:
    layers = " ".join(f"L{i}=" + "+".join(f"e{e}({p:.2f})" for e, p in zip(*record[i])) for i in sorted(record))
    return f"step {step:3d} token {token_id:6d} {piece!r:>12}: {layers}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", help="mole.safetensors, a directory holding one, or a training output_dir")
    ap.add_argument("--prompt", required=True, help="the user's question")
    ap.add_argument("--image", help="image file (LLaVA base models); omit for a text-only prompt")
    ap.add_argument("--base", help="base model directory (default: the base_model recorded in the export)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--show-routing", action="store_true", help="print the experts chosen per layer for each token")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", help="MoLE dispatch backend (default: the exported config's)")
    args = ap.parse_args(argv)

    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SafetensorError as e:  # a truncated or corrupt file
        print(f"error: cannot read {args.export}: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from transformers.utils import logging as hf_logging

    from mole_ds.export import load_mole

    hf_logging.disable_progress_bar()  # keep stdout/stderr to the answer and the routing table

    path = resolve_consolidated(args.export)
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    _, cfg, extra = read_consolidated(path)
    base = args.base or extra.get("base_model")
    if not base:
        raise ValueError(f"{path} records no base_model: give the base model directory with --base")
    model, processor, is_llava = load_base(base, getattr(torch, args.dtype))
    report = load_mole(path, model, backend=args.backend)
    model.to(args.device)
    tokenizer = getattr(processor, "tokenizer", processor)
    print(f"loaded {path} into {base}: {report.layers} MoLE layers x {cfg.num_experts} experts, "
          f"routing {cfg.routing}, top_k {cfg.top_k}", file=sys.stderr)

    text = render_generation_prompt(args.prompt, has_image=args.image is not None)
    if args.image is not None:
        if not is_llava:
            raise ValueError(f"--image given but the base model {base} is not a LLaVA model")
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
        inputs = processor(images=image, text=text, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, args.dtype))
    else:
        inputs = tokenizer(text, return_tensors="pt")
    inputs = {k: v.to(args.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    prompt_len = inputs["input_ids"].shape[1]

    recorder = RoutingRecorder(model) if args.show_routing else None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    new_ids = out[0, prompt_len:].tolist()
    if recorder is not None:
        recorder.remove()
        if len(recorder.steps) < len(new_ids):
            raise RuntimeError(f"routing was recorded for {len(recorder.steps)} forward passes but "
                               f"{len(new_ids)} tokens were generated")
        print(f"routing: top-{cfg.top_k} expert(s) per MoLE layer (router probability) at the position that "
              f"produced each token ({cfg.routing} routing)")
        for step, token_id in enumerate(new_ids):
            print(format_routing(step, token_id, tokenizer.decode([token_id]), recorder.steps[step]))
    answer = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    print(f"ASSISTANT: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
