"""The LLaVA-1.5 conversation template (vicuna_v1) and label masking.

Prompt layout (LLaVA's ``conv_vicuna_v1``: sep " ", sep2 "</s>")::

    <s>{SYSTEM} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

Only the assistant replies and their eos are supervised; everything else gets label -100.

Algorithm of :func:`encode_conversation`:
  1. Split the prompt into segments, each marked supervised or not: "{SYSTEM} USER: {q1} ASSISTANT:" (masked),
     " {a1}</s>" (supervised), "USER: {q2} ASSISTANT:" (masked), ...  The "<image>" placeholder has already
     been replaced by the processor's expansion (N image tokens), so image tokens are masked prompt tokens.
  2. input_ids = tokenizer's leading special tokens (bos) + the concatenation of each segment tokenized alone;
     labels copy the ids of supervised segments, -100 elsewhere.  Labels are therefore exact by construction.
  3. Tokenize the whole prompt in one call (what generation and the HF processor do) and compare.  If the ids
     differ (a merge across a segment boundary, an added token spanning one), the sample is a *tokenization
     mismatch*: it is reported and counted, never turned into a silently all-masked sample (LLaVA's bug).
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"
SEP, SEP2 = " ", "</s>"
IMAGE_PLACEHOLDER = "<image>"
ROLE_ALIASES = {"human": USER, "gpt": ASSISTANT}
IGNORE_INDEX = -100


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


def build_segments(conversations, image_expansion: str | None = None) -> list[tuple[str, bool]]:
    """Template the conversation into (text, supervised) segments (step 1 above).

    image_expansion replaces the "<image>" placeholder (the processor's N-token string); None keeps it.
    A trailing user turn without a reply is dropped (nothing to supervise after it).
    """
    segs: list[tuple[str, bool]] = []
    prompt = SYSTEM_PROMPT + SEP
    for turn in conversations:
        role = ROLE_ALIASES[turn["from"]]
        text = turn["value"]
        if image_expansion is not None:
            text = text.replace(IMAGE_PLACEHOLDER, image_expansion)
        if role == USER:
            prompt += f"{USER}: {text}{SEP}{ASSISTANT}:"
        else:
            segs.append((prompt, False))
            segs.append((f" {text}{SEP2}", True))
            prompt = ""
    return segs


def render_prompt(conversations, image_expansion: str | None = None) -> str:
    """The whole templated text (what a generation prompt / the HF processor would see)."""
    return "".join(t for t, _ in build_segments(conversations, image_expansion))


@dataclass
class EncodedConversation:
    """Token ids and labels of one conversation.

    input_ids / labels: equal-length lists; labels are -100 except on assistant replies and their eos.
    mismatch: the segment-wise ids differ from the whole-prompt tokenization (step 3).
    """

    input_ids: list[int]
    labels: list[int]
    mismatch: bool


def encode_conversation(conversations, tokenizer, image_expansion: str | None = None) -> EncodedConversation:
    """Tokenize and mask a validated conversation (see the module docstring for the algorithm)."""
    segs = build_segments(conversations, image_expansion)
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]  # [bos] for Llama-style tokenizers
    ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    texts = [t for t, _ in segs]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for (_, supervised), seg_ids in zip(segs, enc):
        ids.extend(seg_ids)
        labels.extend(seg_ids if supervised else [IGNORE_INDEX] * len(seg_ids))
    whole = tokenizer("".join(texts), add_special_tokens=True)["input_ids"]
    return EncodedConversation(ids, labels, mismatch=(whole != ids))
