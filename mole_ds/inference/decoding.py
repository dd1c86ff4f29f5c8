"""Greedy decoding: :func:`generate` answers questions in batches, :func:`greedy_ids` decodes one batch.

Algorithm of :func:`generate` (batched greedy decoding):
  1. render and tokenize each prompt exactly as the training data path does (``prompts.encode_prompt``);
     order the requests by token length so a batch holds similar lengths;
  2. per batch: left-pad (the last prompt token of every row sits at the same position), images in prompt
     order; set oracle domain ids when the export routes by domain;
  3. ``model.generate`` greedy up to ``max_new_tokens``, stopping at eos (``synced_gpus`` when several ranks
     decode together, so every rank runs the same number of forwards: ZeRO-3 gathers and expert all-to-alls
     are collective);
  4. a forward hook keeps ``routing_counts_by_sample`` of every forward; row i fed its prompt (forward 0)
     and its generated tokens but the last (forwards 1..n_i-1), so its counts are the sum of forwards
     0..n_i-1 (later forwards only fed padding to a finished row);
  5. decode each row up to its stop token, cut at the first ``until`` string, restore the request order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn

from ..patching import set_sample_domains
from ..runtime import world_size
from .prompts import encode_prompt, length_batches, model_inputs, pad_token_id
from .routing_hooks import ForwardRouting

if TYPE_CHECKING:
    from .loading import InferenceModel


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end a reply: the tokenizer's eos and the model's generation_config eos (an int or a list,
    e.g. Llama-3's end-of-turn)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def greedy_ids(model: nn.Module, tokenizer, inputs: dict, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation ids per row, each cut after its first stop id (kept) - steps 3 and 5 above."""
    stops = stop_ids(model, tokenizer)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         eos_token_id=stops, pad_token_id=pad_token_id(tokenizer), synced_gpus=world_size() > 1)
    rows = out[:, inputs["input_ids"].shape[1]:].tolist()
    return [r[: next((k + 1 for k, t in enumerate(r) if t in stops), len(r))] for r in rows]


def cut_at(text: str, until: Sequence[str] | None) -> str:
    """``text`` up to the first occurrence of any stop string (lmms-eval's ``until``)."""
    for s in until or ():
        if s and s in text:
            text = text.split(s, 1)[0]
    return text


@dataclass
class Generation:
    """What :func:`generate` returns, in request order."""

    texts: list[str]
    token_ids: list[list[int]]
    """Generated ids per request, up to and including eos when one was produced."""
    routing: list[torch.Tensor] | None = None
    """Per request (layers, E) token counts over its prompt and generated tokens (``routing=True``)."""


def generate(m: InferenceModel, questions: Sequence[str], images: Sequence[list] | None = None, *,
             max_new_tokens: int = 32, batch_size: int = 8, until: Sequence[str] | None = None,
             domains: Sequence[str | None] | None = None, routing: bool = False) -> Generation:
    """Greedy answers to ``questions`` (see the module docstring for the algorithm).

    images[i]: the PIL images of question i (LLaVA bases; ``[]`` for text only). domains[i]: its domain
    (required for ``routing: oracle`` exports). ``until``: stop strings cut from the decoded text."""
    n = len(questions)
    images = list(images) if images is not None else [[] for _ in range(n)]
    if len(images) != n or (domains is not None and len(domains) != n):
        raise ValueError(f"generate: {n} questions, {len(images)} image lists, "
                         f"{len(domains) if domains is not None else n} domains")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    tok = m.tokenizer
    prompts = [encode_prompt(m, q, im) for q, im in zip(questions, images)]  # step 1
    texts: list[str] = [""] * n
    ids: list[list[int]] = [[] for _ in range(n)]
    counts: list[torch.Tensor | None] = [None] * n
    for idx in length_batches([len(p.ids) for p in prompts], batch_size):
        inputs = model_inputs(m, [prompts[i] for i in idx], [prompts[i].ids for i in idx], "left")  # step 2
        set_sample_domains(m.model, m.domain_ids([domains[i] for i in idx] if domains else None))
        rec = ForwardRouting(m.model) if routing else None  # step 4
        try:
            rows = greedy_ids(m.model, tok, inputs, max_new_tokens)  # step 3
        finally:
            set_sample_domains(m.model, None)
            if rec is not None:
                rec.remove()
        for i, row in zip(idx, rows):  # step 5
            ids[i] = row
            texts[i] = cut_at(tok.decode(row, skip_special_tokens=True), until).strip()
        if rec is not None:
            for i, c in zip(idx, rec.per_sample([max(len(r), 1) for r in rows])):
                counts[i] = c
    return Generation(texts, ids, counts if routing else None)


__all__ = ["Generation", "cut_at", "generate", "greedy_ids", "stop_ids"]
