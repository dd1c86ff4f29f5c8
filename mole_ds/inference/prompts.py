"""Prompts for inference, rendered and tokenized exactly as training does, and batched for the model.

* :func:`generation_prompt` is the training template up to where the reply starts, written by the project's
  single prompt builder (``mole_ds.data.chat.build_prompt``), so evaluation sees the training template;
* :func:`encode_prompt` tokenizes it with its images as the training data path does;
* :func:`length_batches`, :func:`pad_batch` and :func:`model_inputs` turn encoded prompts into model batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..data.chat import IMAGE_PLACEHOLDER, build_prompt, tokenize_prompt
from ..data.collate import image_expansion

if TYPE_CHECKING:
    from .loading import InferenceModel


def user_turn(question: str, n_images: int) -> dict:
    """The LLaVA-style user turn: the question, with one "<image>" line per image in front unless it holds them."""
    if n_images and IMAGE_PLACEHOLDER not in question:
        question = "\n".join([IMAGE_PLACEHOLDER] * n_images + [question])
    return {"from": "human", "value": question}


def generation_prompt(question: str, n_images: int, chat_format: str, tokenizer,
                      image_expansion: str | None = None) -> str:
    """The training template up to where the assistant's reply starts (``mole_ds.data.chat.build_prompt``)."""
    return build_prompt([user_turn(question, n_images)], chat_format, tokenizer, image_expansion=image_expansion,
                        add_generation_prompt=True)


@dataclass
class EncodedPrompt:
    """One prompt as training tokenizes it: ``ids`` (bos + text, "<image>" expanded) and its images."""

    ids: list[int]
    pixel_values: torch.Tensor | None
    """(n_images, 3, H, W) from the processor's image processor, or None."""


def encode_prompt(m: InferenceModel, question: str, images: list, continuation: str = "") -> EncodedPrompt:
    """Render and tokenize exactly as the training data path does (``mole_ds.data.collate.SampleEncoder``):

    1. each image through ``processor.image_processor``; "<image>" expanded to the processor's N image tokens;
    2. text = :func:`generation_prompt` (+ ``continuation``); ids = ``mole_ds.data.chat.tokenize_prompt``
       (leading bos unless the text starts with it; the whole text tokenized at once, as training does)."""
    if images and not m.is_llava:
        raise ValueError(f"images given but the base model {m.base} is not a LLaVA model")
    pv, expansion = None, None
    if images:
        pv = torch.cat([m.processor.image_processor(images=im, return_tensors="pt")["pixel_values"] for im in images])
        expansion = image_expansion(m.processor, pv[0])
    text = generation_prompt(question, len(images), m.chat_format, m.tokenizer, expansion)
    return EncodedPrompt(tokenize_prompt(text + continuation, m.tokenizer), pv)


def pad_token_id(tokenizer) -> int:
    """The id rows are padded with: the tokenizer's pad token, else its eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_batch(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``rows`` padded on ``side`` ("left" for generation, "right" to score)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def model_inputs(m: InferenceModel, prompts: list[EncodedPrompt], rows: list[list[int]], side: str) -> dict:
    """The model's keyword arguments for ``rows`` (the ids of ``prompts``, possibly extended) padded on
    ``side``, on the model's device; pixel_values of every prompt with images, in prompt order."""
    ids, mask = pad_batch(rows, pad_token_id(m.tokenizer), side)
    out = {"input_ids": ids.to(m.device), "attention_mask": mask.to(m.device)}
    pvs = [p.pixel_values for p in prompts if p.pixel_values is not None]
    if pvs:  # images in prompt order: LLaVA scatters image features into the image tokens in order
        out["pixel_values"] = torch.cat(pvs).to(m.device, m.dtype)
    return out


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Request indices in batches of ``batch_size``, ordered by length so a batch holds similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # longest first: memory errors show at once
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


__all__ = ["EncodedPrompt", "encode_prompt", "generation_prompt", "length_batches", "model_inputs", "pad_batch",
           "pad_token_id", "user_turn"]
