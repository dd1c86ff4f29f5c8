"""Answer exact-match on held-out data: greedy generation after the training prompt, compared normalised.

Algorithm of :func:`exact_match`:
  1. For each held-out LLaVA record take the first user turn (question, with its ``<image>`` placeholder) and
     the first assistant turn (the reference answer).
  2. Render the vicuna_v1 prompt up to "ASSISTANT:" exactly as training templated it (``build_segments``),
     let the processor expand the image placeholder and prepend bos.
  3. Group records whose prompts are the same text apart from the image (same token length, so a group is
     one batch with no padding), greedy-decode up to ``max_new_tokens`` with full forwards, stop each row at
     ``</s>``.
  4. Decode, normalise (lower case, punctuation and a leading article dropped) and compare with the reference.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from ..data.conversation import build_segments
from .stats import normalise_answer


def generation_prompt(question: str) -> str:
    """The template of training up to and including "ASSISTANT:" (``question`` keeps its ``<image>``)."""
    segs = build_segments([{"from": "human", "value": question}, {"from": "gpt", "value": ""}])
    return "".join(text for text, supervised in segs if not supervised)


def load_base(path: str | Path):
    """(model, processor) of a local transformers LLaVA directory, fp32, eval mode, offline."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep study logs to one line per run
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)


def load_run_model(base: str | Path, export: str | Path | None):
    """The base with a MoLE/LoRA export restored (``mole_ds.load_mole``); ``export=None`` gives the base."""
    from ..export import load_mole

    model, processor = load_base(base)
    if export is not None:
        load_mole(export, model)
    return model.eval(), processor


@torch.no_grad()
def greedy_answers(model, processor, questions: list[str], images: list, max_new_tokens: int = 6) -> list[str]:
    """Greedy answers for one batch of same-text prompts (steps 2-3)."""
    tok = processor.tokenizer
    prompts = [generation_prompt(q) for q in questions]
    enc = processor(images=images, text=prompts, return_tensors="pt")
    ids, mask, pix = enc["input_ids"], enc["attention_mask"], enc["pixel_values"].float()
    n = ids.shape[0]
    done = torch.zeros(n, dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pix).logits[:, -1]  # (n, V)
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        new.append(nxt)
        done |= nxt == tok.eos_token_id
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        if bool(done.all()):
            break
    gen = torch.stack(new, 1).tolist()
    out = []
    for row in gen:
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


def exact_match(model, processor, records: list[dict], image_root: str | Path, batch_size: int = 32,
                max_new_tokens: int = 6, keep_examples: int = 5) -> dict:
    """{"em": fraction, "n": count, "examples": [(question, reference, prediction), ...]} over ``records``."""
    from PIL import Image

    image_root = Path(image_root)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["conversations"][0]["value"]].append(r)
    hits, n, examples = 0, 0, []
    for question, recs in groups.items():
        for i in range(0, len(recs), batch_size):
            chunk = recs[i: i + batch_size]
            images = [Image.open(image_root / r["image"]).convert("RGB") for r in chunk]
            preds = greedy_answers(model, processor, [question] * len(chunk), images, max_new_tokens)
            for r, p in zip(chunk, preds):
                ref = r["conversations"][1]["value"]
                ok = normalise_answer(p) == normalise_answer(ref)
                hits += ok
                n += 1
                if len(examples) < keep_examples:
                    examples.append([question.replace("<image>\n", ""), ref, p])
    return {"em": hits / n if n else float("nan"), "n": n, "examples": examples}


def exact_match_file(model, processor, json_path: str | Path, **kw) -> dict:
    """:func:`exact_match` over a LLaVA JSON file whose images lie in ``<json dir>/<stem>/images``."""
    json_path = Path(json_path)
    records = json.loads(json_path.read_text())
    return exact_match(model, processor, records, json_path.parent / json_path.stem / "images", **kw)
