"""Conversation checks and exact label masking (the template itself lives in :mod:`mole_ds.data.chat`).

Only the assistant replies and their end-of-turn marker are supervised; everything else gets label -100.

Algorithm of :func:`encode_conversation` (fast tokenizers, i.e. any tokenizer with an offset mapping):
  1. Render the whole conversation once with :func:`mole_ds.data.chat.render_training`: the text (with
     "<image>" already expanded to the processor's N image tokens) and the character spans [a, b) of the
     supervised parts.
  2. Tokenize that text once, without the tokenizer's own specials, with return_offsets_mapping; put the
     tokenizer's leading specials (bos) in front unless the text starts with the bos (never doubled).  These ids
     are exactly what generation and the HF processor produce for the same text.
  3. A token is supervised iff its characters [s, e) overlap a span (s < b and e > a); a zero-width token
     (a prepended "▁") iff it sits inside one (a <= s < b).  Leading specials are never supervised.
     Every character of every reply is therefore covered by supervised tokens, and when no token merges
     across a span boundary (the case for Llama, Llama-3 and chatml tokenizers with these templates) the
     supervised tokens decode to exactly the replies with their end-of-turn marker.  Nothing is dropped.

Fallback for tokenizers without offsets (python "slow" tokenizers): tokenize the whole text and, for every
span boundary b, the prefix text[:b].  If each prefix's ids are a prefix of the whole text's ids, boundary b
falls exactly between token len(ids(text[:b])) - 1 and the next, and the labels are exact.  Otherwise a token
merges across the boundary and :class:`TokenizationMismatchError` is raised (the encoder applies
``mismatch_policy``: "error" stops, "skip" counts the sample as ``tokenization_mismatch``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from mole_ds.data.chat import (
    DEFAULT_EOS,
    IMAGE_PLACEHOLDER,
    SEP,
    SYSTEM_PROMPT,
    build_prompt,
    leading_specials,
    render_training,
    special_affixes,
)

USER, ASSISTANT = "USER", "ASSISTANT"
SEP2 = DEFAULT_EOS
ROLE_ALIASES = {"human": USER, "gpt": ASSISTANT}
IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "SEP", "SYSTEM_PROMPT", "EncodedConversation",
           "TokenizationMismatchError", "conversation_problem", "encode_conversation", "render_prompt"]


class TokenizationMismatchError(RuntimeError):
    """A tokenizer without offsets merges tokens across a reply boundary: exact labels are impossible."""


def conversation_problem(conversations, has_image: bool) -> str | None:
    """Return the skip reason for a malformed conversation, or None if it is usable.

    Reasons: 'malformed_conversation' (not a list of {"from", "value": str}), 'unknown_role',
    'bad_turn_order' (must alternate human/gpt starting with human), 'no_assistant_turn',
    'placeholder_in_reply', 'multiple_placeholders', 'placeholder_without_image', 'image_without_placeholder'.
    """
    if not isinstance(conversations, list) or not conversations:
        return "malformed_conversation"
    placeholders = 0
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            return "malformed_conversation"
        role = ROLE_ALIASES.get(turn["from"])
        if role is None:
            return "unknown_role"
        if role != (USER if i % 2 == 0 else ASSISTANT):
            return "bad_turn_order"
        n = turn["value"].count(IMAGE_PLACEHOLDER)
        if n and role == ASSISTANT:
            return "placeholder_in_reply"
        placeholders += n
    if not any(ROLE_ALIASES[t["from"]] == ASSISTANT for t in conversations):
        return "no_assistant_turn"
    if placeholders > 1:
        return "multiple_placeholders"
    if placeholders and not has_image:
        return "placeholder_without_image"
    if has_image and not placeholders:
        return "image_without_placeholder"
    return None


def render_prompt(conversations, image_expansion: str | None = None, tokenizer=None,
                  chat_format: str = "vicuna_v1") -> str:
    """The whole templated conversation (what the HF processor would see for it)."""
    return build_prompt(conversations, chat_format, tokenizer, image_expansion=image_expansion,
                        add_generation_prompt=False)


@dataclass
class EncodedConversation:
    """Token ids and labels of one conversation.

    input_ids / labels: equal-length lists; labels are -100 except on assistant replies and their end-of-turn.
    method: "offsets" or "prefix" (the fallback for tokenizers without offsets).
    """

    input_ids: list[int]
    labels: list[int]
    method: str


def _overlap_labels(ids, offsets, spans) -> list[int]:
    """Step 3: label each token by whether its character span meets a supervised span.

    Spans are sorted and disjoint, so the first span ending after a token's start is the only candidate.
    """
    ends = [b for _, b in spans]
    labels = []
    for tid, (s, e) in zip(ids, offsets):
        j = bisect.bisect_right(ends, s)  # first span with b > s
        hit = j < len(spans) and (spans[j][0] < e if e > s else spans[j][0] <= s)
        labels.append(tid if hit else IGNORE_INDEX)
    return labels


def _encode_offsets(text, spans, tokenizer, lead) -> EncodedConversation:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = _overlap_labels(ids, enc["offset_mapping"], spans)
    return EncodedConversation(lead + ids, [IGNORE_INDEX] * len(lead) + labels, "offsets")


def _encode_prefixes(text, spans, tokenizer, lead) -> EncodedConversation:
    def tok(t):
        return list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else []

    ids = tok(text)
    at = {}
    for b in sorted({x for span in spans for x in span}):
        pre = tok(text[:b])
        if ids[: len(pre)] != pre:
            raise TokenizationMismatchError(
                f"tokenizer {type(tokenizer).__name__} has no offset mapping and merges tokens across the "
                f"reply boundary at character {b} ({text[max(0, b - 20) : b]!r} | {text[b : b + 20]!r})")
        at[b] = len(pre)
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        labels[at[a] : at[b]] = ids[at[a] : at[b]]
    return EncodedConversation(lead + ids, [IGNORE_INDEX] * len(lead) + labels, "prefix")


def has_offsets(tokenizer) -> bool:
    """Fast (Rust tokenizers) tokenizers give character offsets; python ones do not."""
    return bool(getattr(tokenizer, "is_fast", False))


def encode_conversation(conversations, tokenizer, image_expansion: str | None = None, chat_format: str = "vicuna_v1",
                        *, method: str | None = None, affixes=None) -> EncodedConversation:
    """Tokenize and mask a conversation exactly (see the module docstring for the algorithm).

    method: None = "offsets" when the tokenizer has them, else "prefix"; forcing "prefix" is for tests.
    affixes: cached :func:`~mole_ds.data.chat.special_affixes` of the tokenizer (computed when None).
    Raises TokenizationMismatchError only on the "prefix" path.
    """
    text, spans = render_training(conversations, chat_format, tokenizer, image_expansion=image_expansion)
    lead = leading_specials(text, tokenizer, affixes or special_affixes(tokenizer))
    method = method or ("offsets" if has_offsets(tokenizer) else "prefix")
    if method == "offsets":
        return _encode_offsets(text, spans, tokenizer, lead)
    if method == "prefix":
        return _encode_prefixes(text, spans, tokenizer, lead)
    raise ValueError(f"method ({method!r}) must be 'offsets', 'prefix' or None")
