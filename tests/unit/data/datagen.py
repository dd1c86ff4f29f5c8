"""Generated test data for the data tests (images made with PIL, no downloads), and CLI loading helpers."""

from __future__ import annotations

import importlib.util
import json
import os

from PIL import Image

from mole_ds.runtime import free_port  # noqa: F401  (the data tests' port helper: mole_ds's one copy)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def use_s3_endpoint(monkeypatch, endpoint: str) -> None:
    """Point boto3 (and mole_ds.data.storage's cached clients) at a local S3 server with test credentials."""
    from mole_ds.data import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage.reset_s3_client()


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_domain(root, name: str, n: int, image_every: int = 2, fmt: str = "png", size=(40, 30)) -> str:
    """Write a LLaVA-format json with n samples (every `image_every`-th text-only... rest with an image).

    Returns the json path; images live in root/name_images/.  Sample ids are f"{name}-{i}".
    """
    img_dir = os.path.join(root, f"{name}_images")
    os.makedirs(img_dir, exist_ok=True)
    recs = []
    for i in range(n):
        has_img = image_every and i % image_every == 0
        q = f"What is shown in picture number {i}?"
        rec = {"id": f"{name}-{i}", "conversations": [
            {"from": "human", "value": ("<image>\n" if has_img else "") + q},
            {"from": "gpt", "value": f"It is a {name} image with the value {i}."},
        ]}
        if has_img:
            rel = f"sub/{name}_{i}.{fmt}"
            os.makedirs(os.path.join(img_dir, "sub"), exist_ok=True)
            Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, 128)).save(os.path.join(img_dir, rel))
            rec["image"] = rel
        recs.append(rec)
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump(recs, f)
    return path
