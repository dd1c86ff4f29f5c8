"""Markers (pytest.ini): ``dist`` on every test that starts ranks (DeepSpeed launcher, torchrun, ranks started
by hand, a tool that launches training), ``gpu`` on tests that need CUDA (skipped without it), ``slow`` on tests
past ~30 s. Everything under tests/dist/ is ``dist`` (applied here, whatever the module says); a rank-starting
test elsewhere carries the marker itself. ``make test-fast`` runs ``-m "not dist and not gpu"``."""
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DIST_DIR = Path(__file__).resolve().parent / "dist"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DIST_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.dist)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
