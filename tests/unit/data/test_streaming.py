"""Streaming: read-time faults, rank/worker splitting, equal steps, resume, mixing weights."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import pytest

from mole_ds.data.skips import DataStreamError

from datagen import make_domain
from mole_ds.data import DataConfig, DomainSource, ShardConfig, build_loader, shard_dataset, verify
from mole_ds.data.manifest import load_manifest, save_manifest


def make_shards(tmp_path, sizes: dict[str, int], max_samples=6, image_every=2, out="out"):
    domains = [DomainSource(n, make_domain(tmp_path, n, k, image_every=image_every), str(tmp_path / f"{n}_images"))
               for n, k in sizes.items()]
    shard_dataset(ShardConfig(domains, str(tmp_path / out), max_samples=max_samples, progress=False))
    return str(tmp_path / out)


def run_epoch(urls, processor, rank=0, world=1, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 2)
    kw.setdefault("max_length", 256)
    kw.setdefault("shuffle_buffer", 5)
    loader = build_loader(DataConfig(urls=urls, **kw), processor, rank=rank, world_size=world)
    batches = list(loader)
    return loader, batches


def ids_of(batches):
    return [i for b in batches for i in b["ids"]]


def add_raw_shard(out, name, members, samples):
    """Write a hand-made shard and list it in the manifest (counts as stated)."""
    path = os.path.join(out, name)
    with tarfile.open(path, "w") as t:
        for n, data in members:
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    m = load_manifest(os.path.join(out, "manifest.json"))
    m["shards"].append({"url": name, "domain": name.split("-")[0], "samples": samples})
    save_manifest(os.path.join(out, "manifest.json"), m)
    return path


def test_exact_epoch_two_ranks_two_workers_local(tmp_path, processor):
    out = make_shards(tmp_path, {"general": 24, "document": 12, "medical": 12})  # 8 shards x 6
    seen, steps = [], []
    for rank in range(2):
        loader, batches = run_epoch(out, processor, rank, 2)
        steps.append(len(batches))
        assert len(batches) == len(loader)
        seen += ids_of(batches)
        assert loader.stats.get("repeated", 0) == 0
    assert steps == [6, 6]
    assert sorted(seen) == sorted([f"general-{i}" for i in range(24)] + [f"document-{i}" for i in range(12)]
                                  + [f"medical-{i}" for i in range(12)])
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "labels", "pixel_values", "has_image", "domain_ids", "domains",
                      "ids"}
    assert b["pixel_values"].shape[0] == int(b["has_image"].sum())
    names = loader.domain_names
    assert [names[i] for i in b["domain_ids"].tolist()] == b["domains"] == [i.split("-")[0] for i in b["ids"]]


def test_uneven_shards_equal_steps_and_full_coverage(tmp_path, processor):
    out = make_shards(tmp_path, {"general": 17, "medical": 5}, max_samples=4)  # 5+2 shards of 1..4
    all_ids = {f"general-{i}" for i in range(17)} | {f"medical-{i}" for i in range(5)}
    seen, steps = [], []
    for rank in range(2):
        _, batches = run_epoch(out, processor, rank, 2, batch_size=3)
        steps.append(len(batches))
        seen += ids_of(batches)
    assert steps[0] == steps[1]
    assert set(seen) == all_ids  # everything at least once; the rest are repeats padding the smaller slots
    assert len(seen) == steps[0] * 2 * 3


def test_fewer_shards_than_slots_still_disjoint(tmp_path, processor):
    out = make_shards(tmp_path, {"general": 12}, max_samples=12)  # 1 shard, 4 slots
    seen = []
    for rank in range(2):
        _, batches = run_epoch(out, processor, rank, 2, batch_size=3)
        seen += ids_of(batches)
    assert sorted(seen) == sorted(f"general-{i}" for i in range(12))


def test_read_time_faults_are_counted_and_others_continue(tmp_path, processor):
    out = make_shards(tmp_path, {"general": 12}, max_samples=6)
    good = open(os.path.join(out, "general-000000.tar"), "rb").read()
    sample = lambda k, meta: (f"{k}.json", json.dumps(meta).encode() if isinstance(meta, dict) else meta)  # noqa
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok."}]
    add_raw_shard(out, "general-000100.tar", [
        sample("a", b"{not json"),
        sample("b", {"id": "b", "domain": "general"}),  # no conversations
        sample("c", {"id": "c", "domain": "general", "conversations": conv}),
        ("d.json", json.dumps({"id": "d", "domain": "general", "image": "d.png", "conversations": [
            {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok."}]}).encode()),
        ("d.png", b"\x89PNG garbage"),
    ], samples=4)
    trunc = os.path.join(out, "general-000101.tar")  # a real truncated file: cut inside the 3rd member
    open(trunc, "wb").write(good[: 512 * 5 + 100])
    m = load_manifest(os.path.join(out, "manifest.json"))
    m["shards"].append({"url": "general-000101.tar", "domain": "general", "samples": 6})
    save_manifest(os.path.join(out, "manifest.json"), m)

    # 9 of 22 samples lost: far above the default data.max_skip_fraction (1%), which stops the stream by name.
    with pytest.raises(DataStreamError, match=r"samples skipped .*max_skip_fraction") as err:
        run_epoch(out, processor, 0, 1, batch_size=2, num_workers=1)
    assert "bad_json 1" in str(err.value) and "corrupt_shard 1" in str(err.value)
    loader, batches = run_epoch(out, processor, 0, 1, batch_size=2, num_workers=1, max_skip_fraction=1.0)
    st = loader.stats
    assert st["bad_json"] == 1 and st["missing_key"] == 1 and st["bad_image"] == 1
    assert st["corrupt_shard"] == 1 and 1 <= st["samples_lost"] <= 6  # of the 6 the manifest promised
    seen = set(ids_of(batches))
    assert {f"general-{i}" for i in range(12)} | {"c"} <= seen  # the good shards and the good sample survive

    rep = verify(out, progress=False)
    text = "\n".join(rep.problems)
    assert not rep.ok
    assert "general-000101.tar" in text and "bad_json" in text and "missing_key" in text and "bad_image" in text


def test_resume_mid_epoch_gives_exactly_the_unseen_samples(tmp_path, processor):
    out = make_shards(tmp_path, {"general": 20, "medical": 12}, max_samples=4)
    kw = dict(batch_size=3, num_workers=2, max_length=256, shuffle_buffer=6, seed=3)
    ref_loader, ref = run_epoch(out, processor, 1, 2, **kw)
    ref_ids = ids_of(ref)
    for stop in (1, 4):
        loader = build_loader(DataConfig(urls=out, **kw), processor, rank=1, world_size=2)
        it = iter(loader)
        head = [next(it) for _ in range(stop)]
        state = json.loads(json.dumps(loader.state_dict()))  # survives a json checkpoint
        del it
        assert state["samples_consumed"] == stop * 3 * 2  # over both ranks
        again = build_loader(DataConfig(urls=out, **kw), processor, rank=1, world_size=2)
        again.load_state_dict(state)
        tail = list(again)
        assert ids_of(head) + ids_of(tail) == ref_ids
        assert again.epoch == 1
    # 12 samples per stream consumed: a batch of 5 per stream cannot continue mid-epoch, another seed never
    wrong = build_loader(DataConfig(urls=out, **{**kw, "batch_size": 5}), processor, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"after 12 samples per stream; this layout takes 5 per stream per step"):
        wrong.load_state_dict(state)
    wrong = build_loader(DataConfig(urls=out, **{**kw, "seed": 4}), processor, rank=1, world_size=2)
    with pytest.raises(ValueError, match=r"seed \(checkpoint 3, now 4\)"):
        wrong.load_state_dict(state)


def test_mixing_weights_and_resume(tmp_path, processor):
    out = make_shards(tmp_path, {"general": 40, "document": 30, "medical": 20}, max_samples=10, image_every=0)
    weights = {"general": 0.5, "document": 0.3, "medical": 0.2}
    kw = dict(batch_size=20, num_workers=0, shuffle_buffer=10, domain_weights=weights, samples_per_epoch=1200,
              max_length=128)
    loader, batches = run_epoch(out, processor, 0, 1, **kw)
    assert len(batches) == 60
    c = Counter(d for b in batches for d in b["domains"])
    n = sum(c.values())
    for d, w in weights.items():  # binomial sd <= 0.015 at n=1200; 4 sd tolerance
        assert abs(c[d] / n - w) < 0.06, (d, c[d] / n)
    # samples_per_epoch is over all ranks: on 2 ranks each takes half the steps (same global batches)
    other, ob = run_epoch(out, processor, 1, 2, **{**kw, "batch_size": 10})
    assert len(ob) == len(other) == 60
    # resume inside the mixing stream
    it_loader = build_loader(DataConfig(urls=out, **kw), processor, rank=0, world_size=1)
    it = iter(it_loader)
    head = [next(it) for _ in range(7)]
    again = build_loader(DataConfig(urls=out, **kw), processor, rank=0, world_size=1)
    again.load_state_dict(it_loader.state_dict())
    assert ids_of(head) + ids_of(list(again)) == ids_of(batches)


def test_data_config_errors():
    with pytest.raises(ValueError) as ei:
        DataConfig(urls="", batch_size=0, mismatch_policy="drop", domain_weights={"a": -1})
    msg = str(ei.value)
    for part in ("data.urls ('')", "data.batch_size (0)", "data.mismatch_policy ('drop')",
                 "data.domain_weights.a (-1) must be a number >= 0"):
        assert part in msg
    with pytest.raises(ValueError, match=r"data.samples_per_epoch \(100\) is only for mixing mode"):
        DataConfig(urls="x/", samples_per_epoch=100)


def test_one_schema_with_one_set_of_defaults():
    """The run config's data section is the data layer's schema: the same fields, defaults and rules."""
    import dataclasses

    from mole_ds.data import DataOptions
    from mole_ds.train.config import DataSection

    opts = {f.name: f for f in dataclasses.fields(DataOptions)}
    for cls in (DataConfig, DataSection):
        mine = {f.name: f for f in dataclasses.fields(cls)}
        assert set(opts) <= set(mine)
        for name, f in opts.items():
            assert mine[name].default == f.default and mine[name].default_factory == f.default_factory, (cls, name)
    d = DataOptions()
    assert (d.max_length, d.num_workers, d.shuffle_buffer, d.streams, d.domain_weights) == (512, 0, 256, 0, {})
    assert DataSection(max_length=4, train=["x"]).problems()[0] == "data.max_length (4) must be >= 8"
    cfg = DataConfig(urls="t/", batch_size=2, seed=5, domain_weights={"a": 1.0}, samples_per_epoch=10, streams=4)
    ev = cfg.for_eval("e/")
    assert (ev.urls, ev.seed, ev.shuffle_shards, ev.shuffle_buffer, ev.domain_weights, ev.samples_per_epoch,
            ev.streams, ev.batch_size) == ("e/", 12, False, 0, {}, 0, 0, 2)


def test_stream_layout_rules():
    from mole_ds.data.pipeline import Layout, check_layout

    assert check_layout(4, 2, 2) is None and check_layout(8, 2, 2) is None and check_layout(2, 2, 4) is None
    assert "per-rank batch size (3) must be a multiple of the streams per rank (2" in check_layout(4, 2, 3)
    assert "multiple of the world size (3)" in check_layout(4, 3, 2)
    assert "multiple of the global micro-batch (4" in check_layout(6, 2, 2)
    # 8 streams, 2 ranks x 2 per step: two groups of 4; rank 1 reads streams 2, 3 then 6, 7
    lay = Layout(8, 2, 2, rank=1)
    assert (lay.k, lay.c) == (2, 1) and lay.streams_of(0) == [2, 3] and lay.streams_of(1) == [6, 7]
    lay = Layout(4, 2, 4, rank=1)  # 2 samples from each of its 2 streams per step
    assert (lay.k, lay.c) == (1, 2) and lay.mine == [2, 3]
