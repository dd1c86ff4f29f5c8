"""End to end against a real S3-speaking HTTP server (moto server mode on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mole_ds.data.skips import skipped_samples

from datagen import REPO, make_domain
from mole_ds.data import DataConfig, StorageError, build_loader, open_url, storage
from mole_ds.data.storage import RetryPolicy


def test_shard_verify_stream_on_s3(tmp_path, s3_env, processor):
    sizes = {"general": 24, "document": 12, "medical": 12}
    args = [sys.executable, os.path.join(REPO, "tools", "shard_data.py"), "--output", f"{s3_env}/v1",
            "--max-samples", "6", "--workers", "2", "--shuffle-seed", "1", "--no-progress"]
    for n, k in sizes.items():
        args += ["--domain", f"{n}={make_domain(tmp_path, n, k)}:{tmp_path / f'{n}_images'}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 8 shard(s)" in r.stdout

    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "shard_data.py"), "--verify",
                        f"{s3_env}/v1/manifest.json", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "general                      24" in r.stdout and "OK" in r.stdout

    # stream: 2 simulated ranks x 2 workers, every sample exactly once
    seen, steps = [], []
    for rank in range(2):
        loader = build_loader(DataConfig(urls=f"{s3_env}/v1/", batch_size=4, num_workers=2, max_length=256,
                                         shuffle_buffer=4), processor, rank=rank, world_size=2)
        batches = list(loader)
        steps.append(len(batches))
        seen += [i for b in batches for i in b["ids"]]
        assert skipped_samples(loader.stats) == 0 and loader.stats["samples_read"] > 0
    assert steps == [6, 6]
    expected = [f"{n}-{i}" for n, k in sizes.items() for i in range(k)]
    assert sorted(seen) == sorted(expected)

    # a mid-epoch resize from s3: 2 ranks take 2 steps, the merged position continues on 1 rank (same batches)
    from mole_ds.data import merge_states

    def loaders(world, batch):
        return [build_loader(DataConfig(urls=f"{s3_env}/v1/", batch_size=batch, num_workers=1, max_length=256,
                                        shuffle_buffer=4, streams=4), processor, rank=r, world_size=world)
                for r in range(world)]

    two = loaders(2, 2)
    full = [[b["ids"] for b in ld] for ld in loaders(2, 2)]
    full = [a + b for a, b in zip(*full)]  # global batches of the uninterrupted run
    its = [iter(ld) for ld in two]
    head = [a["ids"] + b["ids"] for a, b in zip(*[[next(it) for _ in range(2)] for it in its])]
    state = json.loads(json.dumps(merge_states([ld.state_dict() for ld in two])))
    one = loaders(1, 4)[0]
    one.load_state_dict(state)
    assert head + [b["ids"] for b in one] == full and len(full) == 12

    # corrupt one object in the bucket: --verify names it and fails
    bucket, _ = storage.split_s3(s3_env + "/x")
    storage.s3_client().put_object(Bucket=bucket, Key="v1/medical-000001.tar", Body=b"garbage" * 100)
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "shard_data.py"), "--verify", f"{s3_env}/v1/",
                        "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "medical-000001.tar" in r.stdout


class FlakyBody:
    """A streaming body that breaks after `after` bytes (a dropped connection)."""

    def __init__(self, body, after):
        self.body, self.left = body, after

    def read(self, n=-1):
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer")
        data = self.body.read(min(n, self.left) if n and n > 0 else self.left)
        self.left -= len(data)
        return data

    def close(self):
        self.body.close()


def test_transient_errors_are_retried_and_reads_resume(s3_env, monkeypatch):
    payload = os.urandom(300_000)
    bucket, _ = storage.split_s3(s3_env + "/x")
    fast = RetryPolicy(timeout_s=2.0, base_delay_s=0.01, max_delay_s=0.05)
    client = storage.s3_client(fast)  # one client per policy: the one open_url(policy=fast) uses
    client.put_object(Bucket=bucket, Key="blob.bin", Body=payload)
    real = client.get_object
    calls = []

    def flaky(**kw):  # 1st call: server error; 2nd: body breaks mid-stream; then the real thing
        calls.append(kw.get("Range"))
        if len(calls) == 1:
            raise ConnectionError("transient")
        out = real(**kw)
        if len(calls) == 2:
            out["Body"] = FlakyBody(out["Body"], 100_000)
        return out

    monkeypatch.setattr(client, "get_object", flaky)
    with open_url(f"{s3_env}/blob.bin", policy=fast) as f:
        assert f.read() == payload
    assert calls[0] is None and calls[2] == "bytes=100000-"  # reopened where it broke

    calls.clear()

    def down(**kw):
        calls.append(1)
        raise ConnectionError("down")

    monkeypatch.setattr(client, "get_object", down)
    with pytest.raises(StorageError, match=r"blob\.bin"):
        open_url(f"{s3_env}/blob.bin", policy=fast)
    assert len(calls) > 3  # the outage was retried until storage_timeout_s, then named
    calls.clear()
    monkeypatch.setattr(client, "get_object", lambda **kw: (calls.append(1), real(**kw))[1])
    with pytest.raises(StorageError, match="missing.bin"):  # permanent: no retries, object named
        open_url(f"{s3_env}/missing.bin", policy=fast)
    assert len(calls) <= 1


def test_webdataset_scheme_registration(s3_env, tmp_path):
    import webdataset as wds

    from mole_ds.data import register_webdataset_schemes
    from mole_ds.data.sharding import ShardConfig, shard_dataset
    from mole_ds.data.sources import DomainSource

    p = make_domain(tmp_path, "general", 5)
    shard_dataset(ShardConfig([DomainSource("general", p, str(tmp_path / "general_images"))], f"{s3_env}/w",
                              progress=False))
    register_webdataset_schemes()
    ds = wds.WebDataset(f"{s3_env}/w/general-000000.tar", shardshuffle=False)
    ids = [json.loads(s["json"])["id"] for s in ds]
    assert ids == [f"general-{i}" for i in range(5)]
