"""Shard writing: layout, bounds, bad-input reasons, --strict, determinism, resume, datasets sources."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
from PIL import Image

from datagen import load_tool, make_domain
from mole_ds.data import DomainSource, ShardConfig, shard_dataset, verify
from mole_ds.data.sharding import ShardingError

shard_cli = load_tool("shard_data").main


def cfg(tmp_path, domains, **kw):
    kw.setdefault("progress", False)
    return ShardConfig(domains, str(tmp_path / "out"), **kw)


def src(tmp_path, name, path):
    return DomainSource(name, path, str(tmp_path / f"{name}_images"))


def test_layout_and_bounds(tmp_path):
    g = make_domain(tmp_path, "general", 11, fmt="png")
    d = make_domain(tmp_path, "document", 7, fmt="jpg", image_every=1)
    m = shard_dataset(cfg(tmp_path, [src(tmp_path, "general", g), src(tmp_path, "document", d)], max_samples=4))
    names = [s["url"] for s in m["shards"]]
    assert names == ["document-000000.tar", "document-000001.tar",
                     "general-000000.tar", "general-000001.tar", "general-000002.tar"]
    assert m["domains"]["general"]["samples"] == 11 and m["domains"]["document"]["samples"] == 7
    with tarfile.open(tmp_path / "out" / "general-000000.tar") as t:
        members = t.getnames()
        meta = json.loads(t.extractfile(members[0]).read())
        img = t.extractfile(members[1]).read()
    assert members[:3] == ["000000_000000.json", "000000_000000.png", "000000_000001.json"]  # sample 1 text-only
    assert meta == {"id": "general-0", "domain": "general", "image": "sub/general_0.png",
                    "conversations": meta["conversations"]}
    assert img == open(tmp_path / "general_images" / "sub" / "general_0.png", "rb").read()  # bytes as they are
    with tarfile.open(tmp_path / "out" / "document-000000.tar") as t:
        assert t.getnames()[1].endswith(".jpg")
    for s in m["shards"]:
        assert os.path.getsize(tmp_path / "out" / s["url"]) == s["bytes"] and s["samples"] <= 4


def test_max_bytes_bound(tmp_path):
    g = make_domain(tmp_path, "general", 12, image_every=1, size=(64, 64))
    m = shard_dataset(cfg(tmp_path, [src(tmp_path, "general", g)], max_bytes=20 * 1024))
    assert len(m["shards"]) > 1 and sum(s["samples"] for s in m["shards"]) == 12
    assert all(s["bytes"] <= 20 * 1024 for s in m["shards"])


def write_bad_domain(tmp_path):
    """One good sample plus one record per bad-input reason."""
    root = tmp_path / "bad_images"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    (root / "broken.png").write_bytes(open(root / "ok.png", "rb").read()[:30])  # truncated png
    (tmp_path / "secret.png").write_bytes(open(root / "ok.png", "rb").read())
    q = lambda v: [{"from": "human", "value": v}, {"from": "gpt", "value": "fine."}]  # noqa: E731
    recs = [
        {"id": "good", "image": "ok.png", "conversations": q("<image>\nWhat?")},
        {"id": "good", "image": "ok.png", "conversations": q("<image>\nWhat again?")},  # duplicate_id
        {"id": "missing", "image": "nope.png", "conversations": q("<image>\nWhat?")},
        {"id": "broken", "image": "broken.png", "conversations": q("<image>\nWhat?")},
        {"id": "escape", "image": "../secret.png", "conversations": q("<image>\nWhat?")},
        {"id": "noreply", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "role", "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]},
        {"id": "noimg", "conversations": q("<image>\nWhat?")},
        {"id": "noph", "image": "ok.png", "conversations": q("What?")},
        {"conversations": q("no id")},
    ]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(recs))
    return DomainSource("bad", str(p), str(root))


EXPECTED_REASONS = {"duplicate_id": 1, "missing_image": 1, "unreadable_image": 1, "image_path_escapes_root": 1,
                    "no_assistant_turn": 1, "unknown_role": 1, "placeholder_without_image": 1,
                    "image_without_placeholder": 1, "missing_id": 1}


def test_bad_inputs_are_skipped_with_reasons(tmp_path):
    m = shard_dataset(cfg(tmp_path, [write_bad_domain(tmp_path)], workers=2))
    assert m["domains"]["bad"]["samples"] == 1
    assert m["domains"]["bad"]["skipped"] == EXPECTED_REASONS
    by_id = {s["id"]: s["reason"] for s in m["skipped"]}
    assert by_id["escape"] == "image_path_escapes_root" and by_id["broken"] == "unreadable_image"
    assert verify(str(tmp_path / "out"), progress=False).ok


def test_strict_fails(tmp_path, capsys):
    with pytest.raises(ShardingError, match="9 bad input record"):
        shard_dataset(cfg(tmp_path, [write_bad_domain(tmp_path)], strict=True))
    rc = shard_cli(["--domain", f"bad={tmp_path / 'bad.json'}:{tmp_path / 'bad_images'}", "--output",
                    str(tmp_path / "o2"), "--strict", "--no-progress"])
    assert rc == 1 and "image_path_escapes_root" in capsys.readouterr().err
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_shuffle_is_deterministic_and_resume_keeps_shards(tmp_path):
    g = make_domain(tmp_path, "general", 20)
    c = cfg(tmp_path, [src(tmp_path, "general", g)], max_samples=5, shuffle_seed=7)
    m1 = shard_dataset(c)
    with tarfile.open(tmp_path / "out" / "general-000000.tar") as t:
        ids = [json.loads(t.extractfile(n).read())["id"] for n in t.getnames() if n.endswith(".json")]
    assert ids != [f"general-{i}" for i in range(5)]  # shuffled
    # interrupt: drop one shard and mark the manifest incomplete; rerun rewrites only that shard
    victim = tmp_path / "out" / "general-000002.tar"
    victim.unlink()
    keep = tmp_path / "out" / "general-000000.tar"
    os.utime(keep, (1, 1))
    m2 = shard_dataset(c)
    assert os.stat(keep).st_mtime == 1  # kept, not rewritten
    assert victim.exists()
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in m1["shards"]]  # reproducible bytes
    # a different seed changes the plan, so shards are rewritten
    m3 = shard_dataset(cfg(tmp_path, [src(tmp_path, "general", g)], max_samples=5, shuffle_seed=8))
    assert [s["plan"] for s in m3["shards"]] != [s["plan"] for s in m1["shards"]]


def test_datasets_sources(tmp_path, monkeypatch):
    """parquet (embedded image bytes via datasets.Image) and save_to_disk folders."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # keep the user's cache untouched
    import datasets

    g = make_domain(tmp_path, "general", 6)
    recs = json.load(open(g))
    rows = {"id": [], "image": [], "conversations": []}
    for r in recs:
        rows["id"].append(r["id"])
        rows["conversations"].append(r["conversations"])
        rows["image"].append(str(tmp_path / "general_images" / r["image"]) if "image" in r else None)
    # save_to_disk with absolute image paths; parquet with the image bytes embedded
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "g_disk"))
    rows["image"] = [{"bytes": open(p, "rb").read(), "path": None} if p else None for p in rows["image"]]
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "g.parquet"))
    m = shard_dataset(cfg(tmp_path, [DomainSource("pq", str(tmp_path / "g.parquet")),
                                     DomainSource("disk", str(tmp_path / "g_disk"))]))
    assert m["domains"]["pq"]["samples"] == 6 and m["domains"]["disk"]["samples"] == 6
    rep = verify(str(tmp_path / "out"), progress=False)
    assert rep.ok and rep.domain_counts == {"pq": 6, "disk": 6}


@pytest.mark.parametrize("spec,err", [
    ("general", "expected NAME=DATA"),
    ("gen-eral=x.json", "must match"),
])
def test_domain_spec_errors(spec, err):
    with pytest.raises(ValueError, match=err):
        DomainSource.parse(spec)


def test_config_errors_name_field_and_value(tmp_path):
    with pytest.raises(ValueError) as ei:
        ShardConfig([], "ftp://x", max_samples=0, workers=0)
    msg = str(ei.value)
    for part in ("domains ([])", "output ('ftp://x')", "max_samples (0)", "workers (0)"):
        assert part in msg
