"""Verify written shards: stream each one back, check counts / sizes / sha256 against the manifest, parse
every sample and decode every image.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from mole_ds.data import manifest as mf
from mole_ds.data import storage
from mole_ds.data.samples import SkipSample, decode_image, parse_sample
from mole_ds.data.tario import CorruptShardError, HashingReader, iter_tar_samples


@dataclass
class VerifyReport:
    """domain_counts: good samples per domain; problems: one line per problem (empty = all good)."""

    shards: int = 0
    samples: int = 0
    domain_counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _resolve(target: str) -> tuple[list[mf.ShardInfo], dict | None]:
    if target.endswith(".json"):
        m = mf.load_manifest(target)
        return mf.shards_of_manifest(m, target), m
    murl = target + mf.MANIFEST_NAME if target.endswith("/") else storage.join_url(target, mf.MANIFEST_NAME)
    if storage.scheme_of(target) != "file" or storage.exists(murl):
        m = mf.load_manifest(murl)
        return mf.shards_of_manifest(m, murl), m
    return mf.expand_urls(target), None


def verify_shard(info: mf.ShardInfo) -> tuple[dict[str, int], list[str]]:
    counts: dict[str, int] = {}
    problems: list[str] = []
    n = 0
    try:
        with storage.open_url(info.url) as f:
            hr = HashingReader(f)
            for raw in iter_tar_samples(hr, info.url):
                n += 1
                try:
                    rec = parse_sample(raw)
                    if rec.image_bytes is not None:
                        decode_image(rec)
                except SkipSample as exc:
                    problems.append(f"{info.url}: sample {raw['__key__']}: {exc}")
                    continue
                if info.domain and rec.domain != info.domain:
                    problems.append(f"{info.url}: sample {rec.id} has domain {rec.domain!r}, shard says {info.domain!r}")
                counts[rec.domain] = counts.get(rec.domain, 0) + 1
            hr.drain()
    except (CorruptShardError, storage.StorageError, OSError) as exc:
        return counts, problems + [f"{info.url}: {exc}"]
    if info.samples is not None and n != info.samples:
        problems.append(f"{info.url}: {n} samples, manifest says {info.samples}")
    if info.bytes is not None and hr.nbytes != info.bytes:
        problems.append(f"{info.url}: {hr.nbytes} bytes, manifest says {info.bytes}")
    if info.sha256 is not None and hr.sha.hexdigest() != info.sha256:
        problems.append(f"{info.url}: sha256 {hr.sha.hexdigest()[:12]}..., manifest says {info.sha256[:12]}...")
    return counts, problems


def verify(target: str, workers: int = 4, progress: bool = True) -> VerifyReport:
    """Verify a manifest URL, an output folder / s3 prefix (its manifest.json), or shard URLs/patterns."""
    shards, manifest = _resolve(target)
    rep = VerifyReport(shards=len(shards))
    if manifest is not None and not manifest.get("complete", False):
        rep.problems.append("manifest is not marked complete (interrupted sharding run?)")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for counts, problems in tqdm(pool.map(verify_shard, shards), total=len(shards), desc="verify",
                                     unit="shard", disable=not progress):
            for d, c in counts.items():
                rep.domain_counts[d] = rep.domain_counts.get(d, 0) + c
            rep.problems.extend(problems)
    rep.samples = sum(rep.domain_counts.values())
    if manifest is not None:
        for d, info in manifest.get("domains", {}).items():
            if rep.domain_counts.get(d, 0) != info.get("samples", 0):
                rep.problems.append(f"domain {d}: read {rep.domain_counts.get(d, 0)} good samples, manifest says "
                                    f"{info.get('samples', 0)}")
    return rep
