"""A multi-domain instruction set whose domains conflict, drawn with PIL (the conflict study's data).

Every image shows 1-3 copies of one shape (circle, square, triangle) in one colour (red, green, blue, yellow).
Every conflict domain asks the *same* questions ("What is shown in the image?", ...) but expects a different
answer convention, and the domain is told apart only by the image's background:

===========  ==========  ===========================================
domain       background  answer to "What is shown in the image?"
===========  ==========  ===========================================
``colour``   white       the colour of the shapes ("red")
``shape``    mid grey    the kind of shape ("circle")
``count``    black       how many shapes, as a word ("two")
===========  ==========  ===========================================

So a single LoRA trained on the mix must learn to read the background before answering, while a LoRA per
domain never has to: the set is built for the conflict the MoLE paper describes (one question, several
domain-dependent skills). The ``caption`` split (any background, "Describe the image." -> "two red circles")
is the general image-text data a small base is pretrained on so that it knows the words and the visual
features but none of the conventions.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

CONFLICT_DOMAINS = ("colour", "shape", "count")
BACKGROUNDS = {"colour": (245, 245, 245), "shape": (128, 128, 128), "count": (15, 15, 15)}
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("zero", "one", "two", "three")
QUESTIONS = ("What is shown in the image?", "What do you see?", "Answer about the picture.")
CAPTION_QUESTION = "Describe the image."


def draw(colour: str, shape: str, count: int, background: tuple[int, int, int], rng: random.Random,
         size: int = 64) -> Image.Image:
    """``count`` shapes side by side in equal cells (with a little jitter) on ``background``."""
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    cell = size // count
    for i in range(count):
        s = int(cell * rng.uniform(0.55, 0.8)) if count > 1 else int(size * rng.uniform(0.45, 0.7))
        x0 = i * cell + rng.randint(0, max(0, cell - s))
        y0 = rng.randint(0, size - s)
        box = (x0, y0, x0 + s, y0 + s)
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(x0 + s // 2, y0), (x0 + s, y0 + s), (x0, y0 + s)], fill=fill)
    return img


def answer(domain: str, colour: str, shape: str, count: int) -> str:
    """The reference answer under ``domain``'s convention."""
    if domain == "colour":
        return colour
    if domain == "shape":
        return shape
    if domain == "count":
        return COUNT_WORDS[count]
    raise ValueError(f"domain ({domain!r}) must be one of {', '.join(CONFLICT_DOMAINS)}")


def caption(colour: str, shape: str, count: int) -> str:
    return f"{COUNT_WORDS[count]} {colour} {shape}{'s' if count > 1 else ''}"


def generate_split(domain: str, n: int, out: Path, seed: int, size: int = 64) -> Path:
    """Write ``out/<domain>/images/*.png`` and ``out/<domain>.json`` (LLaVA format); returns the JSON path.

    ``domain`` is one of CONFLICT_DOMAINS or ``caption`` (the pretraining split: random background,
    full-description answers)."""
    if domain not in CONFLICT_DOMAINS + ("caption",):
        raise ValueError(f"domain ({domain!r}) must be one of {', '.join(CONFLICT_DOMAINS + ('caption',))}")
    rng = random.Random(f"conflict-{seed}-{domain}")
    img_dir = out / domain / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3)
        if domain == "caption":
            bg = BACKGROUNDS[rng.choice(CONFLICT_DOMAINS)]
            q, a = CAPTION_QUESTION, caption(colour, shape, count)
        else:
            bg = BACKGROUNDS[domain]
            q, a = rng.choice(QUESTIONS), answer(domain, colour, shape, count)
        sid = f"{domain}-{seed}-{i:05d}"
        draw(colour, shape, count, bg, rng, size).save(img_dir / f"{sid}.png")
        records.append({"id": sid, "image": f"{sid}.png",
                        "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
                        "meta": {"colour": colour, "shape": shape, "count": count}})
    path = out / f"{domain}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def generate_conflict(out: str | Path, train_per_domain: int = 300, eval_per_domain: int = 60,
                      caption_train: int = 900, caption_eval: int = 60, seed: int = 0,
                      domains: tuple[str, ...] = CONFLICT_DOMAINS) -> dict[str, dict[str, Path]]:
    """{split: {domain: json}} for splits ``train`` / ``eval`` (conflict domains, disjoint seeds) and
    ``pretrain`` / ``pretrain_eval`` (the caption split)."""
    out = Path(out)
    res: dict[str, dict[str, Path]] = {"train": {}, "eval": {}, "pretrain": {}, "pretrain_eval": {}}
    for d in domains:
        res["train"][d] = generate_split(d, train_per_domain, out / "raw" / "train", seed)
        res["eval"][d] = generate_split(d, eval_per_domain, out / "raw" / "eval", seed + 10_000)
    res["pretrain"]["caption"] = generate_split("caption", caption_train, out / "raw" / "pretrain", seed + 20_000)
    res["pretrain_eval"]["caption"] = generate_split("caption", caption_eval, out / "raw" / "pretrain_eval",
                                                     seed + 30_000)
    return res
