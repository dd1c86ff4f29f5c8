"""Fixtures for the data tests: a real S3-speaking HTTP server (moto server mode) and generated datasets."""

from __future__ import annotations

import os
import uuid

import pytest
from datagen import use_s3_endpoint

from mole_ds.runtime import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def s3_server():
    """Start moto's threaded S3 server on 127.0.0.1 for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 at the local server; yields a fresh bucket URL prefix 's3://<bucket>'."""
    from mole_ds.data import storage

    use_s3_endpoint(monkeypatch, s3_server)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    storage.reset_s3_client()


@pytest.fixture(scope="session")
def processor():
    from mole_ds.models import build_tiny_processor

    return build_tiny_processor(image_size=32, patch_size=8)
