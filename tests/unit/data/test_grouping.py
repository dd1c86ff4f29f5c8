"""Length grouping (data.group_by_length): the order's structure, and that the loader's promises still hold
(every sample once per epoch, the same global batches on every layout, exact resume mid-window on another
layout), with less padding and, for 'modality', batches of one kind."""

from __future__ import annotations

import json
import random

import pytest

from mole_ds.config import ConfigError
from mole_ds.data import DataConfig, DomainSource, ShardConfig, build_loader, shard_dataset
from mole_ds.data.grouping import dyadic_order, window_order
from mole_ds.demo.length_mix import write_length_mix

N = 96


def write_mix(root, n):
    """n samples, ~40% text-only with long answers, in shards of 12."""
    src = write_length_mix(root / "src", n, seed=1, image_px=32)
    out = root / "shards"
    shard_dataset(ShardConfig([DomainSource("mix", str(src), str(root / "src" / "mix_images"))], str(out),
                              max_samples=12, progress=False))
    return str(out)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return write_mix(tmp_path_factory.mktemp("mix"), N)


@pytest.fixture(scope="module")
def big_mix(tmp_path_factory):
    return write_mix(tmp_path_factory.mktemp("big_mix"), 240)


def cfg(urls, **kw):
    base = dict(urls=urls, batch_size=4, num_workers=0, max_length=512, shuffle_buffer=16, seed=3)
    return DataConfig(**{**base, **kw})


def global_steps(urls, processor, world, **kw):
    """Per step, the ids of every rank's batch (rank order)."""
    per_rank = [list(build_loader(cfg(urls, **kw), processor, rank=r, world_size=world)) for r in range(world)]
    return [[i for b in step for i in b["ids"]] for step in zip(*per_rank)], per_rank


def pad_fraction(batches):
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1 - real / sum(b["attention_mask"].numel() for b in batches)


def test_dyadic_order_keeps_aligned_runs_consecutive():
    for n in list(range(1, 40)) + [64, 96, 100]:
        order = dyadic_order(n, random.Random(n))
        assert sorted(order) == list(range(n))
        # the parts: powers of two, largest first (the binary digits of n); inside each, aligned runs of 2^j
        # are 2^j consecutive ranks
        start = 0
        for bit in reversed(range(n.bit_length())):
            size = 1 << bit
            if not n & size:
                continue
            for j in range(bit + 1):
                for a in range(start, start + size, 1 << j):
                    run = sorted(order[a:a + (1 << j)])
                    assert run == list(range(run[0], run[0] + (1 << j))), (n, j, a)
            start += size


def test_window_order_blocks_of_neighbouring_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(64)]
    images = [rng.random() < 0.6 for _ in range(64)]
    order = window_order(lengths, images, "modality", 64, random.Random(1))
    assert sorted(order) == list(range(64))
    ranks = sorted(range(64), key=lambda i: (images[i], lengths[i] if images[i] else -lengths[i], i))
    rank_of = {i: r for r, i in enumerate(ranks)}
    for a in range(0, 64, 8):  # a block: 8 consecutive (modality, length) ranks
        r = sorted(rank_of[i] for i in order[a:a + 8])
        assert r == list(range(r[0], r[0] + 8))
    # the same seed gives the same order (every stream agrees); a shorter last window keeps its tail last
    assert window_order(lengths, images, "modality", 64, random.Random(1)) == order
    short = window_order(lengths[:20], images[:20], "length", 64, random.Random(2))
    assert sorted(short) == list(range(20)) and sorted(lengths[i] for i in short[16:]) == sorted(
        sorted(lengths[:20])[r] for r in range(20) if r // 8 == 2)


@pytest.mark.parametrize("mode", ["length", "modality"])
def test_every_sample_once_less_padding_one_kind(big_mix, processor, mode):
    ids = {f"mix-{i}" for i in range(240)}  # 20 shards, 5 per stream
    stats = {}
    for m in ("none", mode):  # 4 streams, 2 samples per stream per step, windows of 64
        steps, per_rank = global_steps(big_mix, processor, 2, num_workers=2, shuffle_buffer=64, group_by_length=m)
        seen = [i for s in steps for i in s]
        assert sorted(seen) == sorted(ids)
        batches = [b for r in per_rank for b in r]
        mixed = sum(0 < int(b["has_image"].sum()) < len(b["ids"]) for b in batches) / len(batches)
        stats[m] = pad_fraction(batches), mixed
    # measured: padding 0.43 (none), 0.08 (length), 0.11 (modality); mixed batches 0.92, 0.43, 0.17
    assert stats[mode][0] < 0.5 * stats["none"][0], stats
    if mode == "modality":
        assert stats[mode][1] <= 0.2 < stats["none"][1], stats


def test_same_global_batches_on_every_layout(mix, processor):
    kw = dict(group_by_length="modality", streams=4)
    ref, _ = global_steps(mix, processor, 1, **kw)  # 1 rank x 4: one sample per stream per step
    for world, b in ((2, 2), (4, 1)):
        got, _ = global_steps(mix, processor, world, **{**kw, "batch_size": b})
        assert [sorted(s) for s in got] == [sorted(s) for s in ref]
    # 1 rank x 2 over 4 streams: rounds of 2 steps (as with gradient accumulation 2) hold the same samples
    got, _ = global_steps(mix, processor, 1, **{**kw, "batch_size": 2})
    assert [sorted(got[2 * t] + got[2 * t + 1]) for t in range(len(ref))] == [sorted(s) for s in ref]
    # 2 streams: 1 rank x 4 takes 2 per stream per step, 1 rank x 2 takes 1; two steps of one = one of the other
    two, _ = global_steps(mix, processor, 1, group_by_length="modality", streams=2)
    one, _ = global_steps(mix, processor, 1, group_by_length="modality", streams=2, batch_size=2)
    assert [sorted(one[2 * t] + one[2 * t + 1]) for t in range(len(two))] == [sorted(s) for s in two]


@pytest.mark.parametrize("stop", [3, 7])
def test_resume_inside_a_window_on_another_layout(mix, processor, stop):
    kw = dict(group_by_length="length", streams=2)
    ref, _ = global_steps(mix, processor, 1, **kw)  # 2 per stream per step: windows of 16 = 8 steps
    loader = build_loader(cfg(mix, **kw), processor, rank=0, world_size=1)
    it = iter(loader)
    head = [next(it)["ids"] for _ in range(stop)]
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    assert any(p["group"]["taken"] for p in state["positions"].values())  # inside a window
    # continue on 2 ranks x 1 (one per stream per step): two of its steps are one of the reference's
    tails = []
    for r in range(2):
        again = build_loader(cfg(mix, **{**kw, "batch_size": 1}), processor, rank=r, world_size=2)
        again.load_state_dict(state)
        tails.append([b["ids"] for b in again])
    tail = [a + b for a, b in zip(*tails)]
    got = head + [tail[2 * t] + tail[2 * t + 1] for t in range(len(tail) // 2)]
    assert [sorted(s) for s in got] == [sorted(s) for s in ref]
    # another grouping cannot continue this epoch's position
    other = build_loader(cfg(mix, **{**kw, "group_by_length": "modality"}), processor, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"data.group_by_length \('modality'\) differs from the checkpoint's "
                                         r"\('length'\) in the middle of epoch 0"):
        other.load_state_dict(state)


def test_mixing_mode_resume(mix, processor):
    kw = dict(group_by_length="modality", domain_weights={"mix": 1.0}, samples_per_epoch=64, batch_size=4,
              shuffle_buffer=32)
    ref = [b["ids"] for b in build_loader(cfg(mix, **kw), processor, rank=0, world_size=1)]
    loader = build_loader(cfg(mix, **kw), processor, rank=0, world_size=1)
    it = iter(loader)
    head = [next(it)["ids"] for _ in range(5)]
    again = build_loader(cfg(mix, **kw), processor, rank=0, world_size=1)
    again.load_state_dict(loader.state_dict())
    assert head + [b["ids"] for b in again] == ref


def test_refusals(mix, processor):
    with pytest.raises(ConfigError) as ei:
        cfg(mix, group_by_length="bucket")
    assert "data.group_by_length ('bucket') must be one of none, length, modality" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        cfg(mix, group_by_length="length", shuffle_buffer=4)
    assert "data.shuffle_buffer (4) must be >= 8 for data.group_by_length ('length')" in str(ei.value)
    # 1 rank x 8 over 2 streams: 4 samples per stream per step need windows of >= 32
    with pytest.raises(ConfigError) as ei:
        build_loader(cfg(mix, group_by_length="modality", batch_size=8, streams=2, shuffle_buffer=24), processor,
                     rank=0, world_size=1)
    msg = str(ei.value)
    assert "data.shuffle_buffer (24) is too small for data.group_by_length ('modality')" in msg
    assert "4 sample(s) per step (global micro-batch 8 = batch size 8 x world size 1, over data.streams 2)" in msg
    assert "set data.shuffle_buffer to at least 32" in msg
    assert cfg(mix, group_by_length="length").for_eval(mix).group_by_length == "none"


def test_step_token_slots_for_metrics():
    """metrics.jsonl's pad_fraction / real_tokens_per_s come from these counts (one process: no all-reduce)."""
    import torch

    from mole_ds.train.metrics import token_slots

    b = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])}
    assert token_slots([b, b]) == (8, 16)
