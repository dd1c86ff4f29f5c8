"""A LLaVA-665k-like length mix, drawn locally: text-only multi-turn samples with long answers and image
samples with short answers (the mix that makes padding expensive and length grouping worth it).

LLaVA-1.5's 665k mix pads a 2048-token context with 576-token images; this draws the same shape at a CPU
scale (see ``docs/benchmarks.md``): the caller picks the image size of the tiny processor (64 px with 8 px
patches = 64 image tokens) and max_length (512).  At about 2.3 tokens per word of the tiny tokenizer:

* text-only (``text_fraction``, default 0.4): 1-4 turns; questions of 6-20 words; answers of 10-150 words
  (log-uniform), so a sample spans about 40 to 512+ tokens (the longest are truncated at max_length);
* with an image (the rest): 1-4 turns of a short question (5-12 words) and a short answer (1-5 words).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image

WORDS = ("the of and to in is it you that he was for on are with as they be at one have this from or had by hot "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man "
         "year came show every good me give our under name very through just form sentence great think say help "
         "low line differ turn cause much mean before move right boy old too same tell does set three want air "
         "well also play small end put home read hand port large spell add even land here must big high such").split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def write_length_mix(out: str | Path, n: int, seed: int = 0, text_fraction: float = 0.4, image_px: int = 32,
                     domain: str = "mix") -> Path:
    """Write ``out/<domain>.json`` (LLaVA format) and ``out/<domain>_images/*.png``; returns the JSON path.
    Sample ids are ``f"{domain}-{i}"``; which samples are text-only is drawn with ``text_fraction``."""
    out = Path(out)
    img_dir = out / f"{domain}_images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"length-mix:{seed}")
    recs = []
    for i in range(n):
        turns = rng.randint(1, 4)
        text_only = rng.random() < text_fraction
        conv = []
        for t in range(turns):
            if text_only:
                q = _words(rng, rng.randint(6, 20)) + "?"
                a = _words(rng, _log_uniform(rng, 10, 150)) + "."
            else:
                q = _words(rng, rng.randint(5, 12)) + "?"
                a = _words(rng, rng.randint(1, 5)) + "."
            if t == 0 and not text_only:
                q = "<image>\n" + q
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rec = {"id": f"{domain}-{i}", "conversations": conv}
        if not text_only:
            rel = f"{i}.png"
            Image.new("RGB", (image_px, image_px), (i * 37 % 256, i * 91 % 256, 128)).save(img_dir / rel)
            rec["image"] = rel
        recs.append(rec)
    path = out / f"{domain}.json"
    path.write_text(json.dumps(recs))
    return path
