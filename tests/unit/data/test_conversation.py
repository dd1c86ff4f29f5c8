"""vicuna_v1 template and label masking with the embedded processor, truncation, collation, the tiny processor.
(Other tokenizer kinds, chat templates and the no-offsets fallback: test_chat.py.)"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mole_ds.data.collate import SampleEncoder, collate, model_inputs
from mole_ds.data.conversation import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    conversation_problem,
    encode_conversation,
    render_prompt,
)
from mole_ds.data.samples import Record, SkipSample
from mole_ds.models import build_tiny_processor, load_processor

MULTI = [
    {"from": "human", "value": "What is the capital of France?"},
    {"from": "gpt", "value": "Paris."},
    {"from": "human", "value": "And of Italy? Answer in one word."},
    {"from": "gpt", "value": "Rome, which has been the capital since 1871."},
]
IMAGE_FIRST = [
    {"from": "human", "value": "<image>\nDescribe the chart."},
    {"from": "gpt", "value": "The value increases from 2010 to 2020."},
]


def supervised_spans(ids, labels):
    """Decode each contiguous run of supervised tokens."""
    spans, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


def png_bytes(size=(40, 30)):
    b = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(b, format="PNG")
    return b.getvalue()


def test_prompt_layout():
    assert render_prompt(MULTI) == (
        f"{SYSTEM_PROMPT} USER: What is the capital of France? ASSISTANT: Paris.</s>"
        "USER: And of Italy? Answer in one word. ASSISTANT: Rome, which has been the capital since 1871.</s>"
    )


@pytest.mark.parametrize("conv", [MULTI, MULTI[:2]], ids=["multi_turn", "text_only"])
def test_only_assistant_tokens_are_supervised(processor, conv):
    tok = processor.tokenizer
    enc = encode_conversation(conv, tok)
    assert enc.method == "offsets"
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE_INDEX
    spans = [tok.decode(s) for s in supervised_spans(enc.input_ids, enc.labels)]
    replies = [f" {t['value']}</s>" for t in conv if t["from"] == "gpt"]
    assert spans == replies
    # everything else is masked: the unsupervised tokens decode to the prompt minus the replies
    masked = tok.decode([i for i, l in zip(enc.input_ids, enc.labels) if l == IGNORE_INDEX], skip_special_tokens=True)
    assert masked == render_prompt(conv).replace(replies[0], "").replace(replies[-1], "")
    assert enc.input_ids == tok(render_prompt(conv))["input_ids"]


def test_image_first_matches_llava_processor(processor):
    """Image-token expansion and ids equal what transformers' LlavaProcessor produces for the same prompt."""
    enc = SampleEncoder(processor, ["general"], max_length=512)
    rec = Record("x", "general", IMAGE_FIRST, png_bytes(), "png", "k", "u")
    s = enc(rec)
    ref = processor(text=render_prompt(IMAGE_FIRST), images=[Image.open(io.BytesIO(png_bytes())).convert("RGB")])
    assert s.input_ids == list(ref["input_ids"][0])
    assert s.input_ids.count(processor.image_token_id) == 16  # (32 // 8) ** 2
    assert torch.allclose(s.pixel_values, torch.as_tensor(ref["pixel_values"][0]))
    spans = [processor.tokenizer.decode(x) for x in supervised_spans(s.input_ids, s.labels)]
    assert spans == [f" {IMAGE_FIRST[1]['value']}</s>"]
    assert all(l == IGNORE_INDEX for i, l in zip(s.input_ids, s.labels) if i == processor.image_token_id)


def test_truncation_rules(processor):
    rec = Record("t", "general", IMAGE_FIRST, png_bytes(), "png", "k", "u")
    with pytest.raises(SkipSample) as ei:
        SampleEncoder(processor, ["general"], max_length=20)(rec)  # cuts into the 16 image tokens
    assert ei.value.reason == "image_truncated" and "16 of them image tokens) > max_length 20" in str(ei.value)
    text = Record("t", "general", MULTI[:2], None, None, "k", "u")
    labels = encode_conversation(MULTI[:2], processor.tokenizer).labels
    n_prompt = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)  # cut right before the reply
    with pytest.raises(SkipSample) as ei:
        SampleEncoder(processor, ["general"], max_length=n_prompt)(text)
    assert ei.value.reason == "no_supervised_tokens"


@pytest.mark.parametrize("conv,has_image,reason", [
    ([{"from": "human", "value": "hi"}], False, "no_assistant_turn"),
    ([{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}], False, "unknown_role"),
    ([{"from": "gpt", "value": "x"}, {"from": "human", "value": "hi"}], False, "bad_turn_order"),
    ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}], False, "placeholder_without_image"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], True, "image_without_placeholder"),
    ("not a list", False, "malformed_conversation"),
    (IMAGE_FIRST, True, None),
])
def test_conversation_problems(conv, has_image, reason):
    assert conversation_problem(conv, has_image) == reason


def test_collate_mixes_text_and_image_samples(processor):
    enc = SampleEncoder(processor, ["general", "medical"], 512)
    a = enc(Record("a", "general", MULTI, None, None, "k", "u"))
    b = enc(Record("b", "medical", IMAGE_FIRST, png_bytes(), "png", "k", "u"))
    batch = collate([a, b], processor.tokenizer.pad_token_id)
    T = max(len(a.input_ids), len(b.input_ids))
    assert batch["input_ids"].shape == (2, T) and batch["labels"].shape == (2, T)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["has_image"].tolist() == [False, True] and batch["domain_ids"].tolist() == [0, 1]
    assert batch["attention_mask"].sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert (batch["input_ids"][pad] == processor.tokenizer.pad_token_id).all()
    assert model_inputs(collate([a], 3))["pixel_values"] is None


def test_tiny_processor_is_deterministic_and_round_trips(processor, tmp_path):
    again = build_tiny_processor(image_size=32, patch_size=8)
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    processor.save_pretrained(tmp_path)
    loaded = load_processor(str(tmp_path))
    text = render_prompt(IMAGE_FIRST)
    img = Image.new("RGB", (50, 40))
    assert loaded(text=text, images=[img])["input_ids"] == processor(text=text, images=[img])["input_ids"]
    assert loaded.image_token_id == processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert len(loaded.tokenizer) == len(processor.tokenizer)
    with pytest.raises(ValueError, match=r"image_size \(30\) must be a multiple of patch_size \(8\)"):
        build_tiny_processor(image_size=30)
