"""The shard manifest (``manifest.json``) and shard-URL resolution.

A manifest lives next to its shards.  Shard ``url`` entries are names relative to the manifest's location
(so a dataset can be copied or moved as a folder/prefix), absolute URLs are kept as they are.

Format (json)::

    {"version": 1, "complete": true, "config": {...},
     "shards":  [{"url": "general-000000.tar", "domain": "general", "index": 0, "samples": 100, "images": 90,
                  "bytes": 123456, "sha256": "...", "plan": "<sha256 of the sample ids>"}, ...],
     "domains": {"general": {"samples": 100, "shards": 1, "skipped": {"missing_image": 2}}},
     "skipped": [{"domain": "general", "id": "x1", "reason": "missing_image", "detail": "..."}],
     "warnings": [{"kind": "cross_domain_duplicate_id", "id": "x7", "domains": ["general", "medical"]}]}

``images`` (samples with an image) is absent in manifests written before it existed; readers treat that as
"may have images".
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

from mole_ds.data import storage

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_SHARD_NAME = re.compile(r"^(?P<domain>.+)-(?P<index>\d{6})\.tar$")


@dataclass(frozen=True)
class ShardInfo:
    """One shard to read: its full URL, domain, sample count and image-sample count (None = unknown)."""

    url: str
    domain: str | None = None
    samples: int | None = None
    sha256: str | None = None
    bytes: int | None = None
    images: int | None = None


def shard_name(domain: str, index: int) -> str:
    return f"{domain}-{index:06d}.tar"


def domain_from_name(url: str) -> str | None:
    m = _SHARD_NAME.match(url.rsplit("/", 1)[-1])
    return m.group("domain") if m else None


def empty_manifest(config: dict | None = None) -> dict:
    return {"version": MANIFEST_VERSION, "complete": False, "config": config or {}, "shards": [], "domains": {},
            "skipped": [], "warnings": []}


def load_manifest(url: str, policy: storage.RetryPolicy = storage.DEFAULT_RETRY) -> dict:
    """Read and check a manifest; errors name the URL (a missing manifest is a permanent StorageError)."""
    try:
        raw = storage.read_bytes(url, policy)
    except storage.StorageError as exc:
        raise storage.StorageError(f"manifest {url} could not be read: {exc}", url=url,
                                   permanent=exc.permanent) from exc
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {url} is not valid json: {exc}") from exc
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION or not isinstance(m.get("shards"), list):
        raise ValueError(f"manifest {url}: expected a version-{MANIFEST_VERSION} manifest with a 'shards' list")
    return m


def save_manifest(url: str, manifest: dict) -> None:
    storage.write_bytes(url, json.dumps(manifest, indent=1, sort_keys=True).encode())


def manifest_url_for(output: str) -> str:
    return storage.join_url(output, MANIFEST_NAME)


def shards_of_manifest(manifest: dict, manifest_url: str) -> list[ShardInfo]:
    base = storage.dirname_url(manifest_url)
    return [
        ShardInfo(storage.join_url(base, s["url"]), s.get("domain"), s.get("samples"), s.get("sha256"), s.get("bytes"),
                  s.get("images"))
        for s in sorted(manifest["shards"], key=lambda s: s["url"])
    ]


def _braceexpand(pattern: str) -> list[str]:
    import braceexpand  # a webdataset dependency

    return list(braceexpand.braceexpand(pattern))


def expand_urls(urls: str | list[str], policy: storage.RetryPolicy = storage.DEFAULT_RETRY) -> list[ShardInfo]:
    """Resolve shard sources into ShardInfo, in a stable order.

    Each item may be: a manifest (``*.json``: local, s3:// or http(s)://), a local folder or an s3:// prefix
    ending in "/" (its manifest.json; for a local folder without one, its ``*.tar`` files), a brace pattern
    (``s3://b/general-{000000..000009}.tar``), or a single shard URL.  A comma-free list of such items may
    also be passed as a Python list.
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[ShardInfo] = []
    for item in items:
        for u in _braceexpand(item):
            if u.endswith(".json"):
                out.extend(shards_of_manifest(load_manifest(u, policy), u))
            elif storage.scheme_of(u) == "file" and os.path.isdir(storage.local_path(u)):
                mp = os.path.join(storage.local_path(u), MANIFEST_NAME)
                if os.path.exists(mp):
                    out.extend(shards_of_manifest(load_manifest(mp, policy), mp))
                else:
                    out.extend(ShardInfo(p, domain_from_name(p)) for p in sorted(glob.glob(os.path.join(storage.local_path(u), "*.tar"))))
            elif u.endswith("/"):
                mu = u + MANIFEST_NAME
                out.extend(shards_of_manifest(load_manifest(mu, policy), mu))
            else:
                out.append(ShardInfo(u, domain_from_name(u)))
    seen = set()
    uniq = []
    for s in out:
        if s.url not in seen:
            seen.add(s.url)
            uniq.append(s)
    return uniq
