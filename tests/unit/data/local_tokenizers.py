"""Tokenizers of the kinds real checkpoints ship, built locally from a tiny corpus (no download).

* ``llama_spm(legacy)``: transformers' LlamaTokenizer (Metaspace "\u2581" pre-tokenizer, byte fallback, bos), the
  layout of Llama-1/2 / Vicuna / llava-1.5 tokenizers; legacy=True prepends "\u2581" after every special token,
  legacy=False (current Llama tokenizers) only at the start of the text.
* ``llama3_bytelevel()``: a byte-level BPE with Llama-3's pre-tokenizer regex, <|begin_of_text|> as bos,
  <|eot_id|> as eos and Llama-3's chat_template (which writes the bos itself).
* ``chatml()``: a byte-level BPE with no bos and a chatml chat_template (<|im_start|> / <|im_end|>).
* ``byt5()``: a python ("slow") tokenizer without offsets that appends eos (exercises the prefix fallback).
"""

from __future__ import annotations

import functools
import json

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: system user assistant",
    "What is in the image? Describe the chart. The value increases from 2010 to 2020. Paris. Rome, which has "
    "been the capital since 1871. What is the capital of France? And of Italy? Answer in one word.",
    "How many bars are there? There are 3 bars. The tallest bar is the second one. Read the word: cat.",
    "0 1 2 3 4 5 6 7 8 9 10 42 100 1871 2020 . , ; : ! ? ' \" ( ) - / % $ & \n \n\n",
] * 3

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _spm_vocab() -> tuple[dict, list]:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    m = json.loads(tok.to_str())["model"]
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
    return m["vocab"], merges


def llama_spm(legacy: bool):
    """A Llama (sentencepiece-layout) tokenizer: bos prepended, "</s>" eos, "<image>" and "<pad>" added."""
    from transformers import LlamaTokenizer

    vocab, merges = _spm_vocab()
    tok = LlamaTokenizer(vocab=dict(vocab), merges=list(merges), legacy=legacy, add_bos_token=True,
                         add_eos_token=False)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def _bytelevel(specials: list[str], llama3_split: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if llama3_split:  # Llama-3's split regex (digits in groups of 1-3), then byte-level without its own regex
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def llama3_bytelevel():
    """Like Llama-3: byte-level BPE, <|begin_of_text|> bos added by the post-processor, <|eot_id|> end-of-turn."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|pad|>", "<image>"]
    tok = _bytelevel(specials, llama3_split=True)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 0)])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>", extra_special_tokens={"image_token": "<image>"},
                                   chat_template=LLAMA3_TEMPLATE)


def chatml():
    """A Qwen-like tokenizer: byte-level BPE, no bos, chatml template with <|im_end|> end-of-turn."""
    from transformers import PreTrainedTokenizerFast

    tok = _bytelevel(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], llama3_split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"image_token": "<image>"}, chat_template=CHATML_TEMPLATE)


def byt5():
    """A python tokenizer (no offset mapping) that appends "</s>": the prefix fallback's case."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()
