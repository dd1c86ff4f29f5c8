"""The answer metric, written once: normalised exact match of answer strings and its per-domain tally.

Training's held-out exact match (``mole_ds.inference.scoring.exact_match_batch``), the lmms-eval tasks
(``mole_ds/eval/tasks``) and the studies all score answers here, so a number means the same everywhere.
Pure string functions: no model, no torch.
"""
from __future__ import annotations

import re
import string
from typing import Sequence

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed, a leading article dropped (SQuAD-style)."""
    t = _PUNCT.sub(" ", text.lower())
    words = t.split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def answers_match(prediction: str, reference: str) -> bool:
    """Exact match after :func:`normalise_answer` of both strings."""
    return normalise_answer(prediction) == normalise_answer(reference)


def rate_by_domain(correct: Sequence[bool], domains: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{domain: (correct, total)} - sum these over held-out batches (and ranks) before dividing."""
    out: dict[str, list[int]] = {}
    for ok, d in zip(correct, domains):
        c = out.setdefault(d, [0, 0])
        c[0] += int(ok)
        c[1] += 1
    return {d: (c, t) for d, (c, t) in out.items()}


__all__ = ["answers_match", "normalise_answer", "rate_by_domain"]
