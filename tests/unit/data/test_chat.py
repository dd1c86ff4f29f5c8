"""The prompt builder and exact label masking, for the tokenizer kinds real checkpoints ship (built locally)."""

from __future__ import annotations

import random

import pytest

from local_tokenizers import byt5, chatml, llama3_bytelevel, llama_spm
from mole_ds.data import DataConfig
from mole_ds.data.chat import ChatTemplateError, build_prompt, render_training, tokenize_prompt
from mole_ds.data.collate import SampleEncoder
from mole_ds.data.conversation import IGNORE_INDEX, TokenizationMismatchError, encode_conversation
from mole_ds.data.samples import Record, SkipSample

IMG = "<image>" * 4  # a processor's expansion of "<image>" (N image tokens)

CONVS = {
    "image_4_turns": [
        {"from": "human", "value": "<image>\nWhat is the capital of France?"},
        {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "And of Italy?\nAnswer in one word."},
        {"from": "gpt", "value": "Rome, which has been the capital since 1871."},
    ],
    "text_only": [
        {"from": "human", "value": "How many bars are there?"},
        {"from": "gpt", "value": "There are 3 bars."},
    ],
    "spaces_newlines_digits": [
        {"from": "human", "value": "<image>\nDescribe the chart."},
        {"from": "gpt", "value": "  42\n\nThe value increases from 2010 to 2020.\n"},
        {"from": "human", "value": "Read the word."},
        {"from": "gpt", "value": " cat"},
    ],
    "trailing_question": [
        {"from": "human", "value": "What is in the image?\n<image>"},
        {"from": "gpt", "value": "100 %"},
        {"from": "human", "value": "And now?"},
    ],
}

# (tokenizer factory, chat_format, how the format writes reply r): vicuna adds " " + r + eos; Llama-3's
# template trims the content; chatml writes it as it is.
CASES = {
    "llama_legacy/vicuna": (lambda: llama_spm(True), "vicuna_v1", lambda r: f" {r}</s>"),
    "llama/vicuna": (lambda: llama_spm(False), "vicuna_v1", lambda r: f" {r}</s>"),
    "llama3/vicuna": (llama3_bytelevel, "vicuna_v1", lambda r: f" {r}<|eot_id|>"),
    "llama3/template": (llama3_bytelevel, "template", lambda r: f"{r.strip()}<|eot_id|>"),
    "chatml/template": (chatml, "template", lambda r: f"{r}<|im_end|>"),
    "byt5_slow/vicuna": (byt5, "vicuna_v1", lambda r: f" {r}</s>"),
}
_TOKS: dict = {}


def tokenizer(case):
    if case not in _TOKS:
        _TOKS[case] = CASES[case][0]()
    return _TOKS[case]


def supervised_runs(ids, labels) -> list[tuple[int, int]]:
    """[start, end) token ranges of contiguous supervised labels (each label equal to its id)."""
    runs, i = [], 0
    while i < len(ids):
        if labels[i] == IGNORE_INDEX:
            i += 1
            continue
        j = i
        while j < len(ids) and labels[j] != IGNORE_INDEX:
            assert labels[j] == ids[j]
            j += 1
        runs.append((i, j))
        i = j
    return runs


def decoded(tok, ids, i, j) -> str:
    """The text tokens i..j add in context (decoding a slice alone can drop a leading space)."""
    a, b = tok.decode(ids[:i]), tok.decode(ids[:j])
    assert b.startswith(a)
    return b[len(a):]


def expand(conv):
    return [{**t, "value": t["value"].replace("<image>", IMG)} for t in conv]


@pytest.mark.parametrize("conv_name", list(CONVS))
@pytest.mark.parametrize("case", list(CASES))
def test_supervised_tokens_are_exactly_the_replies(case, conv_name):
    tok, fmt, written = tokenizer(case), CASES[case][1], CASES[case][2]
    conv = CONVS[conv_name]
    enc = encode_conversation(conv, tok, IMG, fmt)
    assert enc.method == ("prefix" if case.startswith("byt5") else "offsets")
    replies = [written(t["value"]) for t in conv if t["from"] == "gpt"]
    runs = supervised_runs(enc.input_ids, enc.labels)
    if case.startswith("byt5"):  # bytes are context-free; its decode() drops whitespace before "</s>"
        assert [enc.input_ids[i:j] for i, j in runs] == [tok(r, add_special_tokens=False)["input_ids"] for r in replies]
    else:
        assert [decoded(tok, enc.input_ids, i, j) for i, j in runs] == replies
    # the ids are the single tokenization of the rendered text, i.e. what generation and the processor see
    text, _ = render_training(conv, fmt, tok, image_expansion=IMG)
    assert enc.input_ids == tokenize_prompt(text, tok)
    # before every reply the ids equal the generation prompt's ids: training and generation cannot drift
    gpt_at = [k for k, t in enumerate(conv) if t["from"] == "gpt"]
    for (i, _), k in zip(runs, gpt_at):
        assert tokenize_prompt(build_prompt(conv[:k], fmt, tok, image_expansion=IMG), tok) == enc.input_ids[:i]
    bos = tok.bos_token_id
    if bos is not None and case != "byt5_slow/vicuna":
        assert enc.input_ids.count(bos) == 1 and enc.input_ids[0] == bos and enc.labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("case", ["llama_legacy/vicuna", "llama/vicuna", "llama3/template", "chatml/template"])
def test_no_sample_is_dropped(case):
    """Many random conversations (2-4 turns, spaces, newlines, digits): every one encodes, labels exact."""
    tok, fmt, written = tokenizer(case), CASES[case][1], CASES[case][2]
    rng = random.Random(0)
    words = ["Paris", "the", "value", "42", "2020", "1871", "cat", "bars", ",", ".", "?", "\n", "  ", "\n\n", "3"]
    for n in range(60):
        turns = rng.choice([2, 4])
        conv = []
        for t in range(turns):
            text = "".join(rng.choice([" ", "", "\n"]) + rng.choice(words) for _ in range(rng.randint(1, 8)))
            if t == 0 and n % 2 == 0:
                text = "<image>\n" + text
            conv.append({"from": "human" if t % 2 == 0 else "gpt", "value": text})
        if turns == 2 and n % 4 == 1:
            conv.append({"from": "human", "value": "more?"})  # 3 turns: a trailing question
        enc = encode_conversation(conv, tok, IMG, fmt)
        replies = [written(t["value"]) for t in conv if t["from"] == "gpt"]
        runs = supervised_runs(enc.input_ids, enc.labels)
        assert [decoded(tok, enc.input_ids, i, j) for i, j in runs] == replies, conv


def test_prefix_fallback_equals_offsets_on_fast_tokenizers():
    for case in ("llama_legacy/vicuna", "llama/vicuna", "llama3/template", "chatml/template"):
        tok, fmt = tokenizer(case), CASES[case][1]
        for conv in CONVS.values():
            a = encode_conversation(conv, tok, IMG, fmt)
            b = encode_conversation(conv, tok, IMG, fmt, method="prefix")
            assert (a.input_ids, a.labels) == (b.input_ids, b.labels), case


class _Proc:
    """A processor with a given tokenizer (text-only samples need nothing else)."""

    def __init__(self, tok):
        self.tokenizer = tok
        self.image_token_id = None


def test_token_across_a_reply_boundary():
    """An added token 'ASSISTANT: Paris' spans prompt and reply: with offsets the sample is kept (the token is
    supervised, every reply character is covered); without offsets it is a counted mismatch or an error."""
    tok = llama_spm(False)
    tok.add_tokens(["ASSISTANT: Paris"])
    conv = CONVS["image_4_turns"][:2]
    enc = encode_conversation(conv, tok, IMG, "vicuna_v1")
    runs = supervised_runs(enc.input_ids, enc.labels)
    assert decoded(tok, enc.input_ids, *runs[0]) == "ASSISTANT: Paris.</s>"
    with pytest.raises(TokenizationMismatchError, match="across the reply boundary"):
        encode_conversation(conv, tok, IMG, "vicuna_v1", method="prefix")

    slow = byt5()  # a real python tokenizer: no offsets, the prefix path; bytes never merge, so it is exact
    rec = Record("m", "general", CONVS["text_only"], None, None, "k", "u")
    enc_slow = SampleEncoder(_Proc(slow), ["general"], 512, "error")(rec)
    runs = supervised_runs(enc_slow.input_ids, enc_slow.labels)
    assert [decoded(slow, enc_slow.input_ids, i, j) for i, j in runs] == [" There are 3 bars.</s>"]
    assert enc_slow.input_ids[-1] == slow.eos_token_id and enc_slow.input_ids.count(slow.eos_token_id) == 1


def test_mismatch_policy_on_a_tokenizer_without_offsets():
    tok = llama_spm(False)
    tok.add_tokens(["ASSISTANT: There"])

    class NoOffsets:  # the same tokenizer seen as a python tokenizer (no offset mapping): the prefix fallback
        def __init__(self, t):
            self.t, self.is_fast = t, False

        def __getattr__(self, name):
            return getattr(self.t, name)

        def __call__(self, *a, **kw):
            return self.t(*a, **kw)

    rec = Record("m", "general", CONVS["text_only"], None, None, "k", "u")
    skip = SampleEncoder(_Proc(NoOffsets(tok)), ["general"], 512, "skip")
    with pytest.raises(SkipSample) as ei:
        skip(rec)
    assert ei.value.reason == "tokenization_mismatch" and skip.mismatches == 1
    with pytest.raises(TokenizationMismatchError, match=r"id m\).*mismatch_policy 'skip'"):
        SampleEncoder(_Proc(NoOffsets(tok)), ["general"], 512, "error")(rec)
    kept = SampleEncoder(_Proc(tok), ["general"], 512, "error")(rec)  # with offsets: exact, kept
    assert [decoded(tok, kept.input_ids, i, j) for i, j in supervised_runs(kept.input_ids, kept.labels)] == \
        ["ASSISTANT: There are 3 bars.</s>"]


def test_build_prompt_formats():
    q = [{"from": "human", "value": "<image>\nWhat is it?"}]
    spm = tokenizer("llama/vicuna")
    assert build_prompt(q, "vicuna_v1", spm, image_expansion="<i><i>") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <i><i>\nWhat is it? ASSISTANT:")
    assert build_prompt(q, "vicuna_v1", None).endswith("USER: <image>\nWhat is it? ASSISTANT:")
    assert build_prompt(q, "vicuna_v1", None, add_generation_prompt=False).endswith("USER: <image>\nWhat is it?")
    l3 = tokenizer("llama3/template")
    text = build_prompt(q, "template", l3)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is it?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert text == l3.apply_chat_template([{"role": "user", "content": q[0]["value"]}], tokenize=False,
                                          add_generation_prompt=True)
    ids = tokenize_prompt(text, l3)  # the template writes the bos: it is not added again
    assert ids.count(l3.bos_token_id) == 1 and ids[0] == l3.bos_token_id
    ids_v = tokenize_prompt(build_prompt(q, "vicuna_v1", l3), l3)  # vicuna text has none: the tokenizer's is added
    assert ids_v.count(l3.bos_token_id) == 1 and ids_v[0] == l3.bos_token_id
    with pytest.raises(ChatTemplateError, match=r"LlamaTokenizer.*has no chat_template.*vicuna_v1"):
        build_prompt(q, "template", spm)
    with pytest.raises(ValueError, match="last message must be a human turn"):
        build_prompt(CONVS["text_only"], "vicuna_v1", spm)
    with pytest.raises(ValueError, match=r"chat_format \('chatml'\) must be one of"):
        build_prompt(q, "chatml", spm)
    with pytest.raises(ValueError, match=r"messages\[1\] has role 'human'"):
        build_prompt(q + q, "vicuna_v1", spm)


def test_template_that_is_not_incremental_is_refused():
    tok = chatml()
    # renders the number of messages first: the text up to a turn is not a prefix of the whole
    tok.chat_template = "{{ messages | length }}" + tok.chat_template
    with pytest.raises(ChatTemplateError, match="does not render conversations incrementally"):
        render_training(CONVS["text_only"], "template", tok)


def test_data_config_chat_fields():
    cfg = DataConfig(urls="x/")
    assert (cfg.chat_format, cfg.mismatch_policy, cfg.storage_timeout_s, cfg.max_skip_fraction) == \
        ("vicuna_v1", "error", 600.0, 0.01)
    with pytest.raises(ValueError) as ei:
        DataConfig(urls="x/", chat_format="chatml", mismatch_policy="keep", storage_timeout_s=0, max_skip_fraction=2)
    for part in ("data.chat_format ('chatml') must be one of vicuna_v1, template", "data.mismatch_policy ('keep')",
                 "data.storage_timeout_s (0) must be > 0", "data.max_skip_fraction (2) must be in [0, 1]"):
        assert part in str(ei.value)
