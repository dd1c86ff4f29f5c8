"""Scoring: :func:`loglikelihood` of continuations (the eval plugin's multiple choice) and
:func:`exact_match_batch` of greedy answers on collated training batches (training's held-out exact match).
Answers are compared with the project's one answer metric, ``mole_ds.answers``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn

from ..answers import answers_match
from ..mole.collect import routing_counts_by_sample
from ..patching import set_prompt_mask, set_sample_domains
from .decoding import greedy_ids
from .prompts import encode_prompt, length_batches, model_inputs, pad_batch, pad_token_id

if TYPE_CHECKING:
    from .loading import InferenceModel


@dataclass
class Scores:
    """What :func:`loglikelihood` returns, in request order."""

    logprobs: list[float]
    """Sum of log-probabilities of each continuation's tokens given its prompt."""
    greedy: list[bool]
    """Whether greedy decoding from the prompt would produce exactly the continuation's tokens."""
    routing: list[torch.Tensor] | None = None


@torch.no_grad()
def loglikelihood(m: InferenceModel, contexts: Sequence[str], continuations: Sequence[str],
                  images: Sequence[list] | None = None, *, batch_size: int = 8,
                  domains: Sequence[str | None] | None = None, routing: bool = False) -> Scores:
    """log p(continuation | prompt(context)) per request, the prompt being the training template up to the reply.

    1. prompt ids = ``encode_prompt`` of the context; continuation ids = the ids of prompt + continuation
       tokenized at once (as training tokenizes prompt and reply) past the prompt's length;
    2. right-pad prompt + continuation per batch, one forward, log-softmax;
    3. sum the log-probabilities at the continuation positions; greedy = argmax equals every continuation token.
    """
    n = len(contexts)
    images = list(images) if images is not None else [[] for _ in range(n)]
    if len(continuations) != n or len(images) != n:
        raise ValueError(f"loglikelihood: {n} contexts, {len(continuations)} continuations, {len(images)} image lists")
    prompts = [encode_prompt(m, c, im) for c, im in zip(contexts, images)]
    wholes = [encode_prompt(m, c, im, cont).ids for c, im, cont in zip(contexts, images, continuations)]
    empty = [i for i, (p, w) in enumerate(zip(prompts, wholes)) if len(w) <= len(p.ids)]
    if empty:
        raise ValueError(f"loglikelihood: continuation {continuations[empty[0]]!r} (request {empty[0]}) has no tokens")
    logprobs, greedy = [0.0] * n, [False] * n
    counts: list[torch.Tensor | None] = [None] * n
    for idx in length_batches([len(w) for w in wholes], batch_size):
        inputs = model_inputs(m, [prompts[i] for i in idx], [wholes[i] for i in idx], "right")
        set_sample_domains(m.model, m.domain_ids([domains[i] for i in idx] if domains else None))
        # Sample-level routing sees the prompt only, as when the continuation is generated (right-padded rows).
        T = inputs["input_ids"].shape[1]
        lens = torch.tensor([len(prompts[i].ids) for i in idx], device=inputs["input_ids"].device)
        set_prompt_mask(m.model, torch.arange(T, device=lens.device)[None] < lens[:, None])
        try:
            logp_BTV = m.model(**inputs).logits.float().log_softmax(-1)
            per = routing_counts_by_sample(m.model).cpu() if routing else None
        finally:
            set_sample_domains(m.model, None)
            set_prompt_mask(m.model, None)
        ids_BT = inputs["input_ids"]
        for j, i in enumerate(idx):
            pos = torch.arange(len(prompts[i].ids) - 1, len(wholes[i]) - 1, device=ids_BT.device)  # t predicts t+1
            target = ids_BT[j, pos + 1]
            logprobs[i] = float(logp_BTV[j, pos, target].sum())
            greedy[i] = bool((logp_BTV[j, pos].argmax(-1) == target).all())
            if per is not None:
                counts[i] = per[:, j]
    return Scores(logprobs, greedy, counts if routing else None)


@torch.no_grad()
def exact_match_batch(model: nn.Module, processor, batch: dict, max_new_tokens: int = 16) -> list[bool]:
    """Per-sample exact match of greedy answers on a collated batch (``mole_ds.data.collate.collate``).

    The batch is already templated and tokenized as training saw it (with its chat format), so nothing is
    re-rendered: for each sample
      1. prompt = its tokens before the first supervised label; reference = the first supervised run (the
         first assistant reply and its eos);
      2. the prompts are left-padded into one batch (pixel_values as collated: image tokens lie in the prompts);
      3. greedy decoding up to ``max_new_tokens`` (``synced_gpus`` under several ranks: call it on every
         rank, with each rank's own batch);
      4. correct = the decoded answer equals the decoded reference after normalisation
         (``mole_ds.answers.answers_match``: lower case, punctuation and a leading article dropped).
    Use ``batch["domains"]`` for per-domain rates (``mole_ds.answers.rate_by_domain``). The model's
    train/eval mode is restored afterwards."""
    tok = getattr(processor, "tokenizer", processor)
    ids_BT, labels_BT, mask_BT = batch["input_ids"], batch["labels"], batch["attention_mask"]
    B = ids_BT.shape[0]
    prompts, refs = [], []
    for i in range(B):
        sup = (labels_BT[i] != -100).nonzero().flatten().tolist()
        if not sup:
            raise ValueError(f"exact_match_batch: sample {i} (id {batch.get('ids', ['?'] * B)[i]}) has no "
                             "supervised tokens")
        s = sup[0]
        end = s
        while end < ids_BT.shape[1] and labels_BT[i, end] != -100 and mask_BT[i, end] == 1:
            end += 1
        prompts.append(ids_BT[i, :s].tolist())
        refs.append(ids_BT[i, s:end].tolist())
    device = next(model.parameters()).device
    in_BT, am_BT = pad_batch(prompts, pad_token_id(tok), "left")
    inputs = {"input_ids": in_BT.to(device), "attention_mask": am_BT.to(device)}
    pv = batch.get("pixel_values")
    if pv is not None and pv.numel():
        inputs["pixel_values"] = pv.to(device, next(model.parameters()).dtype)
    was_training = model.training
    model.eval()
    try:
        rows = greedy_ids(model, tok, inputs, max_new_tokens)
    finally:
        model.train(was_training)
    return [answers_match(tok.decode(r, skip_special_tokens=True), tok.decode(ref, skip_special_tokens=True))
            for r, ref in zip(rows, refs)]


__all__ = ["Scores", "exact_match_batch", "loglikelihood"]
