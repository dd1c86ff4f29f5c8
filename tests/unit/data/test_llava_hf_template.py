"""chat_format 'template' with the chat_template that llava-hf ships for llava-1.5 (its processor's
chat_template.json, reproduced below as published). That template iterates typed content
(``message['content'] | selectattr('type', ...)``): given plain string content it renders "USER: ASSISTANT: "
with no error and no words. Rendering must notice and use typed content, in prompts and in training labels."""
from __future__ import annotations

import pytest

from local_tokenizers import llama_spm
from mole_ds.data.chat import ChatTemplateError, build_prompt, chat_tokenizer, render_training
from mole_ds.data.conversation import IGNORE_INDEX, encode_conversation

# llava-hf/llava-1.5-7b-hf, chat_template.json ("chat_template"), as published with the checkpoint.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CONV = [
    {"from": "human", "value": "<image>\nWhat is the capital of France?"},
    {"from": "gpt", "value": "Paris."},
    {"from": "human", "value": "And of Italy?"},
    {"from": "gpt", "value": "Rome, since 1871."},
]


@pytest.fixture(scope="module")
def tok():
    t = llama_spm(False)
    t.chat_template = LLAVA_HF_TEMPLATE
    return t


def test_string_content_renders_empty_with_this_template(tok):
    """The trap itself, as transformers renders it: no exception, no words."""
    text = tok.apply_chat_template([{"role": "user", "content": "What is it?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "USER: ASSISTANT:"


def test_prompt_keeps_every_word(tok):
    text = build_prompt(CONV[:1], "template", tok, image_expansion="<image><image>")
    assert text == "USER: <image><image>\nWhat is the capital of France? ASSISTANT:"
    text = build_prompt(CONV[:3], "template", tok)
    assert text == "USER: <image>\nWhat is the capital of France? ASSISTANT: Paris. USER: And of Italy? ASSISTANT:"


def test_training_labels_are_the_replies(tok):
    text, spans = render_training(CONV, "template", tok)
    assert [text[a:b] for a, b in spans] == [" Paris.", " Rome, since 1871."]  # not the separator after
    enc = encode_conversation(CONV, tok, None, "template")
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(supervised).split() == ["Paris.", "Rome,", "since", "1871."]
    assert enc.labels[0] == IGNORE_INDEX


def test_processor_template_reaches_the_tokenizer():
    """llava-hf ships the template on the processor; the tokenizer beside it has none."""
    from mole_ds.models.processor import build_tiny_processor

    proc = build_tiny_processor(image_size=32, patch_size=8)
    proc.tokenizer.chat_template = None
    proc.chat_template = LLAVA_HF_TEMPLATE
    tok = chat_tokenizer(proc)
    assert tok is proc.tokenizer and tok.chat_template == LLAVA_HF_TEMPLATE
    assert build_prompt(CONV[:1], "template", tok).endswith("What is the capital of France? ASSISTANT:")


def test_template_that_drops_words_either_way_is_refused(tok):
    t = llama_spm(False)
    t.chat_template = "{% for m in messages %}{{ m['role'] }}: {% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"drops the words of turn 0 .*vicuna_v1"):
        build_prompt(CONV[:1], "template", t)


def test_image_sample_encodes_through_the_training_encoder():
    """What training does with a llava-hf-style processor (template on the processor only): an image sample
    is encoded, its image tokens expanded and only the replies supervised (was: every sample refused with
    "does not reproduce the text of assistant turn")."""
    import io

    from PIL import Image

    from mole_ds.data.collate import SampleEncoder
    from mole_ds.data.samples import Record
    from mole_ds.models.processor import build_tiny_processor

    proc = build_tiny_processor(image_size=32, patch_size=8)
    proc.tokenizer.chat_template = None
    proc.chat_template = LLAVA_HF_TEMPLATE
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="PNG")
    rec = Record("s1", "general", CONV, buf.getvalue(), "png", "k", "u")
    enc = SampleEncoder(proc, ["general"], 512, "error", chat_format="template")(rec)
    assert enc.input_ids.count(proc.image_token_id) == 16  # (32 // 8) ** 2
    tok = proc.tokenizer
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(supervised).split() == ["Paris.", "Rome,", "since", "1871."]
