"""From a parsed record to model tensors: image processing, templating, masking, truncation, padding.

Batch convention (what :func:`collate` returns)::

    input_ids       [B, T] long   right-padded with the tokenizer's pad id
    attention_mask  [B, T] long   1 on real tokens
    labels          [B, T] long   -100 except assistant replies + their eos
    pixel_values    [N, 3, H, W] float, N = number of samples with an image (in batch order); an empty tensor
                    when N == 0;
                    exactly what LlavaForConditionalGeneration expects, since image features are scattered
                    into the image-token positions in order.  Pass None to the model when N == 0.
    has_image       [B] bool
    domain_ids      [B] long      index into the loader's domain_names
    domains, ids    list[str]     per-sample domain name and sample id
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mole_ds.data.chat import chat_tokenizer, special_affixes
from mole_ds.data.conversation import IGNORE_INDEX, IMAGE_PLACEHOLDER, TokenizationMismatchError, encode_conversation
from mole_ds.data.samples import Record, SkipSample, decode_image

__all__ = ["EncodedSample", "SampleEncoder", "TokenizationMismatchError", "collate", "image_expansion", "model_inputs"]


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # [3, H, W]
    domain: str
    domain_id: int
    id: str


def image_expansion(processor, pixel_values_CHW) -> str:
    """The processor's own "<image>" expansion for one processed image (N copies of the image token)."""
    if hasattr(processor, "replace_image_token"):
        return processor.replace_image_token({"pixel_values": [pixel_values_CHW]}, 0)
    return IMAGE_PLACEHOLDER  # processors that expand inside the model


class SampleEncoder:
    """Callable record -> EncodedSample; raises SkipSample with a counted reason.

    Templating and masking: :func:`mole_ds.data.conversation.encode_conversation` with ``chat_format``.
    Extra reasons: 'tokenization_mismatch' (only for tokenizers without offsets, under mismatch_policy 'skip';
    'error' raises TokenizationMismatchError), 'image_truncated' (max_length would cut the image tokens),
    'no_supervised_tokens' (nothing left to learn from after truncation), 'unknown_domain'.
    """

    def __init__(self, processor, domain_names: list[str], max_length: int, mismatch_policy: str = "error",
                 process_images: bool = True, chat_format: str = "vicuna_v1"):
        self.processor = processor
        self.tokenizer = chat_tokenizer(processor)
        self.domain_ids = {d: i for i, d in enumerate(domain_names)}
        self.max_length = max_length
        self.mismatch_policy = mismatch_policy
        self.process_images = process_images
        self.chat_format = chat_format
        self.image_token_id = getattr(processor, "image_token_id", None)
        self.affixes = special_affixes(self.tokenizer)
        self.mismatches = 0

    def __call__(self, rec: Record) -> EncodedSample:
        pv = None
        expansion = None
        if rec.image_bytes is not None:
            img = decode_image(rec)
            if self.process_images:
                pv = torch.as_tensor(self.processor.image_processor(images=img, return_tensors="np")["pixel_values"][0])
                expansion = image_expansion(self.processor, pv)
            else:
                expansion = IMAGE_PLACEHOLDER
        try:
            enc = encode_conversation(rec.conversations, self.tokenizer, expansion, self.chat_format,
                                      affixes=self.affixes)
        except TokenizationMismatchError as exc:
            self.mismatches += 1
            msg = f"{rec.url}#{rec.key} (id {rec.id}): {exc}"
            if self.mismatch_policy == "error":
                raise TokenizationMismatchError(msg + " (mismatch_policy 'skip' counts and skips such samples)") from exc
            raise SkipSample("tokenization_mismatch", msg) from exc
        ids, labels = enc.input_ids[: self.max_length], enc.labels[: self.max_length]
        if pv is not None and self.image_token_id is not None:
            n_img = enc.input_ids.count(self.image_token_id)
            if n_img != ids.count(self.image_token_id):
                raise SkipSample("image_truncated", f"id {rec.id}: needs {len(enc.input_ids)} tokens ({n_img} of them "
                                 f"image tokens) > max_length {self.max_length}")
        if all(x == IGNORE_INDEX for x in labels):
            raise SkipSample("no_supervised_tokens", f"id {rec.id}: the prompt takes {self._prompt_len(enc)} tokens "
                             f"of max_length {self.max_length} before the first reply")
        if rec.domain not in self.domain_ids:
            raise SkipSample("unknown_domain", f"id {rec.id}: domain {rec.domain!r}")
        return EncodedSample(ids, labels, pv, rec.domain, self.domain_ids[rec.domain], rec.id)

    @staticmethod
    def _prompt_len(enc) -> int:
        return next((i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX), len(enc.labels))


def collate(samples: list[EncodedSample], pad_id: int) -> dict:
    """Right-pad a list of EncodedSample into the batch dict described in the module docstring."""
    B = len(samples)
    T = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        attention_mask[i, :n] = 1
    imgs = [s.pixel_values for s in samples if s.pixel_values is not None]
    pixel_values = torch.stack(imgs) if imgs else torch.zeros((0,))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "has_image": torch.tensor([s.pixel_values is not None for s in samples]),
        "domain_ids": torch.tensor([s.domain_id for s in samples], dtype=torch.long),
        "domains": [s.domain for s in samples],
        "ids": [s.id for s in samples],
    }


def model_inputs(batch: dict) -> dict:
    """The keyword arguments for LlavaForConditionalGeneration.forward (pixel_values None when no images)."""
    pv = batch["pixel_values"]
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["labels"],
        "pixel_values": pv if pv.numel() else None,
    }
