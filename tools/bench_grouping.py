#!/usr/bin/env python
"""Padding and real-token throughput of ``data.group_by_length`` none / length / modality on a LLaVA-665k-like
length mix drawn locally (mole_ds.demo.length_mix: ~40% text-only multi-turn with long answers, ~60% with an
image and short answers).  Nothing is downloaded.

    python tools/bench_grouping.py [--samples 2000] [--rounds 3] [--json docs/results/bench_grouping.json]

CPU scale: LLaVA-1.5 trains 576-token images in a 2048-token context; this uses 64-token images (64 px, 8 px
patches) in max_length 512.  Layout: 2 ranks x micro-batch 8 over 4 streams (world size x 2 workers, the
default layout of 2 ranks with 2 DataLoader workers), so a rank's micro-batch is 4 samples from each of 2
streams; shuffle_buffer 256.  The loaders of both ranks run in this process (the layout, not the processes,
decides the batches).

* pad_fraction: pad slots / all slots of every micro-batch of the epoch, both ranks (what metrics.jsonl's
  ``pad_fraction`` is per step).
* real_tokens_per_s: forward + backward + AdamW step of a tiny LLaVA (2 layers, hidden 128, a 64 px / 8 px CLIP
  tower) on rank 0's first ``--steps`` batches, already collated (data loading excluded), one thread; real
  (attention-mask) tokens / time.  Modes alternate within each round; the median over rounds is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("none", "length", "modality")


def make_shards(root: Path, n: int, image_px: int) -> str:
    from mole_ds.data import DomainSource, ShardConfig, shard_dataset
    from mole_ds.demo.length_mix import write_length_mix

    src = write_length_mix(root / "src", n, seed=0, image_px=image_px)
    out = root / "shards"
    shard_dataset(ShardConfig([DomainSource("mix", str(src), str(root / "src" / "mix_images"))], str(out),
                              max_samples=50, progress=False))
    return str(out / "manifest.json")


def epoch_batches(urls: str, processor, mode: str, a) -> list[list[dict]]:
    """Every rank's batches of one epoch: [rank][step]."""
    from mole_ds.data import DataConfig, build_loader

    cfg = DataConfig(urls=urls, batch_size=a.batch, num_workers=0, max_length=a.max_length, streams=a.streams,
                     shuffle_buffer=a.shuffle_buffer, seed=0, group_by_length=mode)
    return [list(build_loader(cfg, processor, rank=r, world_size=a.world)) for r in range(a.world)]


def padding(batches: list[dict]) -> dict:
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["attention_mask"].numel() for b in batches)
    mixed = sum(0 < int(b["has_image"].sum()) < len(b["ids"]) for b in batches)
    return {"pad_fraction": 1 - real / slots, "real_tokens": real, "token_slots": slots,
            "mixed_modality_batches": mixed / len(batches), "micro_batches": len(batches),
            "mean_T": statistics.mean(b["input_ids"].shape[1] for b in batches)}


def build_model(processor, image_px: int):
    import torch

    from mole_ds.models.tiny import build_tiny_llava

    tok = processor.tokenizer
    model = build_tiny_llava(seed=0, vocab_size=len(tok), image_token_id=processor.image_token_id,
                             image_size=image_px, patch_size=8, pad_token_id=tok.pad_token_id, hidden_size=128,
                             intermediate_size=256, max_position_embeddings=1024).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def time_steps(model, opt, batches: list[dict]) -> float:
    from mole_ds.data import model_inputs

    t0 = time.perf_counter()
    for b in batches:
        out = model(**model_inputs(b))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--shuffle-buffer", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--image-px", type=int, default=64, help="image size (8 px patches: (px/8)^2 image tokens)")
    ap.add_argument("--steps", type=int, default=40, help="training steps timed per mode and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import logging

    import torch

    from mole_ds.models import build_tiny_processor

    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    processor = build_tiny_processor(image_size=a.image_px, patch_size=8)
    with tempfile.TemporaryDirectory(prefix="bench_grouping_") as tmp:
        urls = make_shards(Path(tmp), a.samples, a.image_px)
        per_mode = {m: epoch_batches(urls, processor, m, a) for m in MODES}
    rows = {m: padding([b for r in per_mode[m] for b in r]) for m in MODES}
    for m in MODES:
        seen = sorted(i for r in per_mode[m] for b in r for i in b["ids"])
        rows[m]["every_sample_once"] = seen == sorted(f"mix-{i}" for i in range(a.samples))

    model, opt = build_model(processor, a.image_px)
    train = {m: per_mode[m][0][: a.steps] for m in MODES}
    time_steps(model, opt, train["none"][:3])  # warm-up
    runs = {m: [] for m in MODES}
    for r in range(a.rounds):
        for m in (MODES if r % 2 == 0 else MODES[::-1]):
            dt = time_steps(model, opt, train[m])
            real = sum(int(b["attention_mask"].sum()) for b in train[m])
            slots = sum(b["attention_mask"].numel() for b in train[m])
            runs[m].append({"s": dt, "real_tokens_per_s": real / dt, "slots_per_s": slots / dt})
            print(f"round {r} {m:9s} {dt:6.2f} s  real tokens/s {real / dt:8.0f}", flush=True)
    for m in MODES:
        rows[m]["real_tokens_per_s"] = statistics.median(x["real_tokens_per_s"] for x in runs[m])
        rows[m]["slot_tokens_per_s"] = statistics.median(x["slots_per_s"] for x in runs[m])
        rows[m]["train_pad_fraction"] = padding(train[m])["pad_fraction"]
    base = rows["none"]["real_tokens_per_s"]

    print(f"\n{a.samples} samples (LLaVA-like mix), {a.world} ranks x {a.batch}, {a.streams} streams, "
          f"shuffle_buffer {a.shuffle_buffer}, max_length {a.max_length}, {(a.image_px // 8) ** 2} image tokens")
    print(f"{'group_by_length':>15} | {'pad fraction':>12} | {'mixed batches':>13} | {'mean T':>6} | "
          f"{'real tok/s':>10} | {'vs none':>7}")
    for m in MODES:
        x = rows[m]
        print(f"{m:>15} | {x['pad_fraction']:12.3f} | {x['mixed_modality_batches']:13.3f} | {x['mean_T']:6.0f} | "
              f"{x['real_tokens_per_s']:10.0f} | {x['real_tokens_per_s'] / base:6.2f}x")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "what": "data.group_by_length on a LLaVA-665k-like length mix (mole_ds.demo.length_mix): padding over "
                    "one epoch of both ranks' micro-batches; real (attention-mask) tokens/s of forward+backward+"
                    "AdamW of a tiny LLaVA (2 layers, hidden 128) on rank 0's first batches, 1 thread, median of "
                    "alternating rounds",
            "args": vars(a), "cpu_count": os.cpu_count(), "torch_threads": 1, "rows": rows, "runs": runs},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
