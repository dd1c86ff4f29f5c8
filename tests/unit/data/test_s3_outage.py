"""Storage faults against a real S3 server in its own process (moto_server), paused with SIGSTOP as a real
outage pauses a service: a transient outage is waited out and every sample is still seen exactly once; an
outage longer than data.storage_timeout_s stops the stream naming the shard; a permanent error (a missing
bucket) fails at once. Nothing is skipped silently."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from datagen import free_port, make_domain, use_s3_endpoint
from mole_ds.data import DataConfig, StorageError, build_loader, storage
from mole_ds.data.sharding import ShardConfig, shard_dataset
from mole_ds.data.skips import skipped_samples
from mole_ds.data.sources import DomainSource

OUTAGE_S = 15


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A moto S3 server process on 127.0.0.1 with one bucket of shards: 3 domains x 12 samples, 2 per shard."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert exe, "moto_server is installed with moto[server] (a dev dependency)"
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start within 30 s")
    use_s3_endpoint(monkeypatch, f"http://127.0.0.1:{port}")
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    domains = [DomainSource(n, make_domain(tmp_path, n, 12), str(tmp_path / f"{n}_images"))
               for n in ("general", "document", "chart")]
    shard_dataset(ShardConfig(domains, f"s3://{bucket}/shards", max_samples=2, progress=False))
    yield {"proc": proc, "url": f"s3://{bucket}/shards/", "bucket": bucket}
    os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait()
    storage.reset_s3_client()


def _loader(url: str, processor, timeout_s: float):
    return build_loader(DataConfig(urls=url, batch_size=2, num_workers=1, max_length=256, shuffle_buffer=0,
                                   storage_timeout_s=timeout_s), processor, rank=0, world_size=1)


def test_a_transient_outage_is_waited_out_and_nothing_is_skipped(server, processor):
    loader = _loader(server["url"], processor, timeout_s=120)
    it = iter(loader)
    ids = list(next(it)["ids"])
    os.kill(server["proc"].pid, signal.SIGSTOP)  # the service stops answering mid-epoch
    t0 = time.time()
    threading.Timer(OUTAGE_S, os.kill, (server["proc"].pid, signal.SIGCONT)).start()
    for batch in it:
        ids += batch["ids"]
    waited = time.time() - t0
    assert sorted(ids) == sorted(f"{d}-{i}" for d in ("general", "document", "chart") for i in range(12))
    assert skipped_samples(loader.stats) == 0 and not loader.stats.get("corrupt_shard")
    assert waited >= OUTAGE_S - 1, f"the epoch ended {waited:.1f} s after the outage began: it was not hit"


def test_an_outage_past_storage_timeout_stops_naming_the_shard(server, processor):
    loader = _loader(server["url"], processor, timeout_s=3)
    it = iter(loader)
    next(it)
    os.kill(server["proc"].pid, signal.SIGSTOP)  # never comes back during this test
    with pytest.raises(StorageError) as err:
        for _ in it:
            pass
    text = str(err.value)
    assert server["bucket"] in text and ".tar" in text, text
    assert skipped_samples(loader.stats) == 0 and not loader.stats.get("corrupt_shard")


def test_a_permanent_error_fails_at_once(server, processor):
    t0 = time.time()
    with pytest.raises(StorageError, match=r"no-such-bucket-[0-9a-f]+"):
        _loader(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/shards/", processor, timeout_s=600)
    assert time.time() - t0 < 10  # permanent: no retries for storage_timeout_s (600 s here)
