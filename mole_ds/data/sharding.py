"""Write domains into WebDataset tar shards plus a manifest; resume an interrupted run.

Algorithm of :func:`shard_dataset`:
  1. Load every domain's records; check each one (in ``workers`` processes): conversation shape, image path
     inside the image root, image present and decodable.  Then drop duplicate ids within a domain (first kept).
     Every drop is recorded with its reason; ``strict`` turns any drop into an error.  An id used in two
     domains is kept in both but flagged (a warning naming the id and the domains, in the manifest).
  2. Optionally shuffle each domain with a seed derived from (shuffle_seed, domain) - deterministic.
  3. Plan shards per domain in order: a shard closes at ``max_samples`` samples or before ``max_bytes`` bytes
     (exact tar size).  Each planned shard gets a fingerprint (sha256 of its sample ids).
  4. Shards already in the output's manifest with the same name, fingerprint and size are kept (resume).
  5. The rest are written in parallel (reproducible tar bytes -> local temp file -> upload / atomic rename);
     the manifest is rewritten after each finished shard, so an interrupted run loses at most the shards
     in flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

from tqdm import tqdm

from mole_ds.data import manifest as mf
from mole_ds.data import storage
from mole_ds.data.sources import Checked, DomainSource, check_record, load_records
from mole_ds.data.tario import TarShardWriter, archive_bytes, member_bytes

log = logging.getLogger(__name__)


class ShardingError(RuntimeError):
    """Bad input under --strict, or an unrecoverable write error."""


@dataclass
class ShardConfig:
    """Options of :func:`shard_dataset` (the CLI's flags).

    domains: input domains (see DomainSource).
    output: local folder or s3://bucket/prefix receiving ``{domain}-{index:06d}.tar`` and manifest.json.
    max_samples: samples per shard at most.
    max_bytes: bytes per shard at most (a single larger sample still gets a shard of its own).
    shuffle_seed: None keeps input order; an int shuffles each domain deterministically.
    workers: processes for checking and writing.
    strict: any bad input is an error instead of a counted skip.
    progress: show tqdm bars.
    """

    domains: list[DomainSource]
    output: str
    max_samples: int = 10_000
    max_bytes: int = 1 << 30
    shuffle_seed: int | None = None
    workers: int = 1
    strict: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not self.domains:
            problems.append("domains ([]) must name at least one domain")
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            problems.append(f"domains ({names}) has a repeated name")
        if not self.output:
            problems.append(f"output ({self.output!r}) must be a folder or s3:// prefix")
        elif storage.scheme_of(self.output) not in ("file", "s3"):
            problems.append(f"output ({self.output!r}) must be a local folder or s3://bucket/prefix")
        if self.max_samples < 1:
            problems.append(f"max_samples ({self.max_samples}) must be >= 1")
        if self.max_bytes < 10240:
            problems.append(f"max_bytes ({self.max_bytes}) must be >= 10240 (one tar record)")
        if self.workers < 1:
            problems.append(f"workers ({self.workers}) must be >= 1")
        if problems:
            raise ValueError("ShardConfig: " + "; ".join(problems))


@dataclass
class PlannedShard:
    domain: str
    index: int
    samples: list[dict] = field(default_factory=list)
    nbytes: int = 0

    @property
    def name(self) -> str:
        return mf.shard_name(self.domain, self.index)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([s["id"] for s in self.samples]).encode()).hexdigest()


def _check_chunk(args) -> list[Checked]:
    recs, start, domain, root, data_dir = args
    return [check_record(start + i, r, domain, root, data_dir) for i, r in enumerate(recs)]


def _sample_files(s: dict) -> dict[str, bytes]:
    meta = {k: v for k, v in s.items() if not k.startswith("_")}
    files = {"json": json.dumps(meta, ensure_ascii=False).encode()}
    if "_ext" in s:
        if "_image_bytes" in s:
            files[s["_ext"]] = s["_image_bytes"]
        else:
            with open(s["_image_path"], "rb") as f:
                files[s["_ext"]] = f.read()
    return files


def _sample_tar_bytes(s: dict, image_bytes: int) -> int:
    meta_len = len(json.dumps({k: v for k, v in s.items() if not k.startswith("_")}, ensure_ascii=False).encode())
    return member_bytes(meta_len) + (member_bytes(image_bytes) if "_ext" in s else 0)


def _write_shard(shard: PlannedShard, output: str) -> dict:
    """Write one shard (in a worker process) and return its manifest entry."""
    fd, tmp = tempfile.mkstemp(suffix=".tar")
    os.close(fd)
    try:
        w = TarShardWriter(tmp)
        for i, s in enumerate(shard.samples):
            w.add(f"{shard.index:06d}_{i:06d}", _sample_files(s))
        w.close()
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in storage.iter_chunks(f):
                h.update(chunk)
        nbytes = os.path.getsize(tmp)
        storage.put_file(tmp, storage.join_url(output, shard.name))
    finally:
        os.unlink(tmp)
    return {"url": shard.name, "domain": shard.domain, "index": shard.index, "samples": len(shard.samples),
            "images": sum("_ext" in s for s in shard.samples), "bytes": nbytes, "sha256": h.hexdigest(),
            "plan": shard.fingerprint}


def cross_domain_duplicates(kept: dict[str, list[dict]]) -> list[dict]:
    """Ids used by more than one domain: [{"kind", "id", "domains": [...]}], in id order."""
    where: dict[str, list[str]] = {}
    for d, samples in kept.items():
        for smp in samples:
            where.setdefault(smp["id"], []).append(d)
    return [{"kind": "cross_domain_duplicate_id", "id": i, "domains": ds}
            for i, ds in sorted(where.items()) if len(ds) > 1]


def check_domains(cfg: ShardConfig) -> tuple[dict[str, list[dict]], list[dict]]:
    """Steps 1-2: returns (usable samples per domain, skipped records)."""
    kept: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    pool = ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else None
    try:
        for src in cfg.domains:
            recs = load_records(src)
            chunk = max(1, min(256, len(recs) // (cfg.workers * 4) or 1))
            data_dir = os.path.dirname(os.path.abspath(src.data))
            tasks = [(recs[i : i + chunk], i, src.name, src.image_root, data_dir) for i in range(0, len(recs), chunk)]
            results: list[Checked] = []
            bar = tqdm(total=len(recs), desc=f"check {src.name}", unit="sample", disable=not cfg.progress)
            it = pool.map(_check_chunk, tasks) if pool else map(_check_chunk, tasks)
            for part in it:
                results.extend(part)
                bar.update(len(part))
            bar.close()
            seen: set[str] = set()
            good = []
            for c in sorted(results, key=lambda c: c.index):
                if c.reason is None and c.sample["id"] in seen:
                    c = Checked(c.index, "duplicate_id", f"id {c.sample['id']}")
                if c.reason is not None:
                    rid = recs[c.index].get("id") if isinstance(recs[c.index], dict) else None
                    skipped.append({"domain": src.name, "index": c.index, "id": None if rid is None else str(rid),
                                    "reason": c.reason, "detail": c.detail})
                    continue
                seen.add(c.sample["id"])
                good.append(c.sample)
            if cfg.shuffle_seed is not None:
                random.Random(f"{cfg.shuffle_seed}:{src.name}").shuffle(good)
            kept[src.name] = good
    finally:
        if pool:
            pool.shutdown()
    return kept, skipped


def plan_shards(kept: dict[str, list[dict]], max_samples: int, max_bytes: int) -> list[PlannedShard]:
    """Step 3: cut each domain's sample list into shards bounded by count and exact tar size."""
    plan: list[PlannedShard] = []
    for domain, samples in kept.items():
        cur = PlannedShard(domain, 0)
        for s in samples:
            b = _sample_tar_bytes(s, s.get("_image_nbytes", 0))
            if cur.samples and (len(cur.samples) >= max_samples or archive_bytes(cur.nbytes + b) > max_bytes):
                plan.append(cur)
                cur = PlannedShard(domain, cur.index + 1)
            cur.samples.append(s)
            cur.nbytes += b
        if cur.samples:
            plan.append(cur)
    return plan


def _summary(manifest: dict, kept: dict[str, list[dict]], skipped: list[dict], warnings: list[dict]) -> None:
    domains = {}
    for d, samples in kept.items():
        reasons: dict[str, int] = {}
        for s in skipped:
            if s["domain"] == d:
                reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        shards = [e for e in manifest["shards"] if e["domain"] == d]
        dups = sum(d in w["domains"] for w in warnings if w["kind"] == "cross_domain_duplicate_id")
        domains[d] = {"samples": sum(e["samples"] for e in shards), "planned_samples": len(samples),
                      "shards": len(shards), "bytes": sum(e["bytes"] for e in shards), "skipped": reasons,
                      "cross_domain_duplicate_ids": dups}
    manifest["domains"] = domains
    manifest["skipped"] = skipped
    manifest["warnings"] = warnings


def shard_dataset(cfg: ShardConfig) -> dict:
    """Run steps 1-5 and return the final manifest (also written to ``{output}/manifest.json``)."""
    kept, skipped = check_domains(cfg)
    warnings = cross_domain_duplicates(kept)
    for w in warnings[:10]:
        log.warning("sample id %r is used in domains %s (kept in each; ids should be unique across domains)",
                    w["id"], " and ".join(w["domains"]))
    if len(warnings) > 10:
        log.warning("... %d ids are used in more than one domain in all (listed in the manifest's warnings)",
                    len(warnings))
    if cfg.strict and skipped:
        lines = [f"{s['domain']}[{s['index']}] {s['reason']}: {s['detail']}" for s in skipped[:20]]
        raise ShardingError(f"--strict: {len(skipped)} bad input record(s):\n  " + "\n  ".join(lines))
    plan = plan_shards(kept, cfg.max_samples, cfg.max_bytes)

    storage.ensure_bucket(cfg.output)
    murl = mf.manifest_url_for(cfg.output)
    old = mf.load_manifest(murl) if storage.exists(murl) else mf.empty_manifest()
    old_by_name = {e["url"]: e for e in old["shards"]}
    config = {"max_samples": cfg.max_samples, "max_bytes": cfg.max_bytes, "shuffle_seed": cfg.shuffle_seed,
              "domains": [d.name for d in cfg.domains]}
    manifest = mf.empty_manifest(config)
    todo = []
    for p in plan:  # step 4
        e = old_by_name.get(p.name)
        if e and e.get("plan") == p.fingerprint and storage.size_of(storage.join_url(cfg.output, p.name)) == e["bytes"]:
            manifest["shards"].append({**e, "images": sum("_ext" in smp for smp in p.samples)})
        else:
            todo.append(p)
    if len(todo) < len(plan):
        log.info("resume: keeping %d complete shard(s), writing %d", len(plan) - len(todo), len(todo))
    _summary(manifest, kept, skipped, warnings)

    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="write shards", unit="shard",
               disable=not cfg.progress)
    if cfg.workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            futs = [pool.submit(_write_shard, p, cfg.output) for p in todo]
            for fut in as_completed(futs):
                manifest["shards"].append(fut.result())
                _summary(manifest, kept, skipped, warnings)
                mf.save_manifest(murl, manifest)
                bar.update(1)
    else:
        for p in todo:
            manifest["shards"].append(_write_shard(p, cfg.output))
            _summary(manifest, kept, skipped, warnings)
            mf.save_manifest(murl, manifest)
            bar.update(1)
    bar.close()
    manifest["shards"].sort(key=lambda e: e["url"])
    manifest["complete"] = True
    _summary(manifest, kept, skipped, warnings)
    mf.save_manifest(murl, manifest)
    return manifest
