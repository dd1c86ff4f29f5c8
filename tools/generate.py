#!/usr/bin/env python
"""Greedy generation with an exported MoLE model, optionally showing each token's experts.

    python tools/generate.py EXPORT --prompt "What is in the image?" [--image img.png] [--max-new-tokens 32]
                             [--base BASE_MODEL_DIR] [--chat-format vicuna_v1|template] [--show-routing]

EXPORT is a consolidated ``mole.safetensors``, a directory holding one (``tools/export.py --out`` or a
checkpoint tag) or a training ``output_dir`` (newest complete checkpoint). The base model (weights +
processor, a local transformers directory) defaults to the ``base_model`` recorded in the export.

A thin CLI over :mod:`mole_ds.inference` (the library the lmms-eval plugin uses too):
  1. ``load_for_inference``: the base (LLaVA or Llama) with the export restored; the chat format is the one
     recorded in the export (vicuna_v1 when none), unless --chat-format overrides it;
  2. ``generate``: the training template up to where the reply starts ("... ASSISTANT:" for vicuna_v1, with
     "<image>" in front of the question when --image is given), greedy decoding up to --max-new-tokens,
     stopping at eos;
  3. --show-routing: ``RoutingRecorder`` keeps, per decoding step, the top-k experts of the last input position,
     i.e. of the position whose logits produced that step's token (the prompt's last token for step 0, the
     previous generated token afterwards). One line per generated token, layer 0 first, each expert with its
     router probability. Under ``routing_level: sample`` each layer decides once per sample, from the pooled
     prompt, at the prompt step (the only router call: decoding steps reuse it); every token follows that
     decision, so every line shows it, and the header says the decision is per sample.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from mole_ds.inference import (  # noqa: F401  (load_base: re-exported for callers of this tool)
    DEFAULT_CHAT_FORMAT,
    RoutingRecorder,
    generate,
    generation_prompt,
    load_base,
    load_for_inference,
)


def render_generation_prompt(prompt: str, has_image: bool, chat_format: str = DEFAULT_CHAT_FORMAT,
                             tokenizer=None) -> str:
    """The training template up to where the reply starts, "<image>" not yet expanded."""
    return generation_prompt(prompt, int(has_image), chat_format, tokenizer)


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
    ap.add_argument("--chat-format", help="override the chat format recorded in the export (vicuna_v1 | template)")
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

    hf_logging.disable_progress_bar()  # keep stdout/stderr to the answer and the routing table
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image}: no such file")
    m = load_for_inference(args.export, args.base, dtype=args.dtype, device=args.device, backend=args.backend,
                           chat_format=args.chat_format)
    cfg = m.config
    print(f"loaded {m.export} into {m.base}: {m.report.layers} MoLE layers x {cfg.num_experts} experts, "
          f"routing {cfg.routing}, top_k {cfg.top_k}, chat format {m.chat_format}", file=sys.stderr)
    images = []
    if args.image is not None:
        from PIL import Image

        images = [Image.open(args.image).convert("RGB")]

    recorder = RoutingRecorder(m.model) if args.show_routing else None
    try:
        out = generate(m, [args.prompt], [images], max_new_tokens=args.max_new_tokens, batch_size=1)
    finally:
        if recorder is not None:
            recorder.remove()
    new_ids = out.token_ids[0]
    if recorder is not None:
        per_sample = cfg.routing_level == "sample" and cfg.routing != "oracle"
        needed = 1 if per_sample else len(new_ids)  # sample level: the router runs at the prompt step only
        if len(recorder.steps) < needed:
            raise RuntimeError(f"routing was recorded for {len(recorder.steps)} forward passes but "
                               f"{len(new_ids)} tokens were generated")
        if per_sample:
            print(f"routing: top-{cfg.top_k} expert(s) per MoLE layer (router probability), one decision per "
                  f"sample and MoLE layer (routing_level sample: made from the pooled prompt; every token "
                  f"follows it) ({cfg.routing} routing)")
        else:
            print(f"routing: top-{cfg.top_k} expert(s) per MoLE layer (router probability) at the position that "
                  f"produced each token ({cfg.routing} routing)")
        for step, token_id in enumerate(new_ids):
            record = recorder.steps[0 if per_sample else step]
            print(format_routing(step, token_id, m.tokenizer.decode([token_id]), record))
    print(f"ASSISTANT: {out.texts[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
