"""Three small visual instruction domains, drawn with PIL:

* ``general``: one coloured shape on a plain background; questions about its colour or shape
  (plus some text-only chat turns, so text-only samples are exercised);
* ``document``: a word rendered as black text on white; the task is to read it;
* ``chart``: a bar chart; questions about how many bars there are or which bar is tallest.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

DOMAINS = ("general", "document", "chart")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "black": (20, 20, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "dog", "sun", "tree", "car", "fish", "book", "door", "king", "rain", "road", "ship", "star", "bird")
TEXT_ONLY = [("What is two plus two?", "four"), ("Name a colour of the sky.", "blue"),
             ("Is water wet?", "yes"), ("What do cats say?", "meow"), ("How many legs has a dog?", "four")]


def _shape(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    colour = rng.choice([c for c in COLOURS if c != "white"])
    shape = rng.choice(SHAPES)
    img = Image.new("RGB", (size, size), COLOURS["white"])
    d = ImageDraw.Draw(img)
    m = rng.randint(size // 8, size // 4)
    box = (m, m, size - m, size - m)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(size // 2, m), (size - m, size - m), (m, size - m)], fill=COLOURS[colour])
    return img, colour, shape


def _document(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    word = rng.choice(WORDS)
    img = Image.new("RGB", (size, size), COLOURS["white"])
    d = ImageDraw.Draw(img)
    d.text((rng.randint(2, size // 4), rng.randint(size // 4, size // 2)), word, fill=(0, 0, 0))
    return img, word


def _chart(rng: random.Random, size: int) -> tuple[Image.Image, int, int]:
    n = rng.randint(2, 5)
    heights = [rng.randint(size // 8, size - 8) for _ in range(n)]
    img = Image.new("RGB", (size, size), COLOURS["white"])
    d = ImageDraw.Draw(img)
    w = (size - 8) // n
    for i, h in enumerate(heights):
        d.rectangle((4 + i * w + 2, size - 4 - h, 4 + (i + 1) * w - 2, size - 4), fill=COLOURS["blue"])
    return img, n, heights.index(max(heights)) + 1


def _conv(q: str, a: str, image: bool) -> list[dict]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + q}, {"from": "gpt", "value": a}]


def generate_domain(domain: str, n: int, out: Path, seed: int, size: int = 64, text_only_every: int = 8) -> Path:
    """Write ``out/<domain>/images/*.png`` and ``out/<domain>.json``; returns the JSON path."""
    rng = random.Random(f"{seed}-{domain}")
    img_dir = out / domain / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        sid = f"{domain}-{seed}-{i:05d}"
        if domain == "general" and text_only_every and i % text_only_every == text_only_every - 1:
            q, a = rng.choice(TEXT_ONLY)
            records.append({"id": sid, "conversations": _conv(q, a, image=False)})
            continue
        if domain == "general":
            img, colour, shape = _shape(rng, size)
            q, a = rng.choice([("What color is the shape?", colour), ("What shape is in the image?", shape)])
        elif domain == "document":
            img, word = _document(rng, size)
            q, a = "Read the word in the document.", word
        elif domain == "chart":
            img, bars, tallest = _chart(rng, size)
            q, a = rng.choice([("How many bars are in the chart?", str(bars)),
                               ("Which bar is the tallest?", f"bar {tallest}")])
        else:
            raise ValueError(f"domain ({domain!r}) must be one of {', '.join(DOMAINS)}")
        name = f"{sid}.png"
        img.save(img_dir / name)
        records.append({"id": sid, "image": name, "conversations": _conv(q, a, image=True)})
    path = out / f"{domain}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def generate_demo(out: str | Path, train_per_domain: int = 96, eval_per_domain: int = 24, seed: int = 0,
                  domains: tuple[str, ...] = DOMAINS) -> dict[str, dict[str, Path]]:
    """Train and eval splits (different seeds, so no overlap) per domain: {split: {domain: json path}}."""
    out = Path(out)
    res: dict[str, dict[str, Path]] = {"train": {}, "eval": {}}
    for split, n, s in (("train", train_per_domain, seed), ("eval", eval_per_domain, seed + 10_000)):
        for d in domains:
            res[split][d] = generate_domain(d, n, out / "raw" / split, s)
    return res
