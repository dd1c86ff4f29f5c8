"""Doc functions of the local tasks (lmms-eval loads this file by path through ``!function utils.<name>``).

A doc is one LLaVA-style record of ``data.json``: ``id``, ``image`` (a path relative to this folder, or null
for a text-only sample), ``domain`` (used for per-domain routing statistics), ``conversations`` (the first
human turn is the question, with ``<image>`` where the image goes; the first gpt turn is the answer) and, for
the multiple-choice task, ``choices`` (the answer is one of them).
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from mole_ds.answers import answers_match

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc: dict) -> list:
    if not doc.get("image"):
        return []
    path = HERE / doc["image"]
    if not path.is_file():
        raise FileNotFoundError(f"doc {doc.get('id')}: image {path} does not exist")
    return [Image.open(path).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question as in training, ``<image>`` placeholder included (the model puts the image there)."""
    return doc["conversations"][0]["value"]


def doc_to_target(doc: dict) -> str:
    return doc["conversations"][1]["value"]


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["choices"])


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match after normalisation (lower case, punctuation and a leading article dropped)."""
    return {"exact_match": float(answers_match(results[0], doc_to_target(doc)))}
