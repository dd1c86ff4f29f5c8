"""The run config: typed sections read from YAML/JSON plus ``--section.field value`` overrides.

Unknown keys and wrong types are errors naming the key and the value; cross-checks against the DeepSpeed
config (micro-batch, ZeRO stage, ep_size vs world size) happen in :func:`check_against_deepspeed` before any
work starts.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import MoLEConfig


@dataclass
class ModelSection:
    path: str | None = None
    """A local transformers LLaVA (or LLaMA) directory; empty = the embedded tiny LLaVA built locally."""
    dtype: str = "auto"
    """'auto' (bf16 when the DeepSpeed config enables it, else fp32), 'bf16' or 'fp32'."""
    tiny_layers: int = 2
    """Embedded default only: decoder layers of the tiny LLM."""
    tiny_hidden: int = 64
    """Embedded default only: hidden size of the tiny LLM."""
    train_base: bool = False
    """Train the whole LLM and projector instead of patching MoLE (vision tower frozen); each checkpoint then
    holds a transformers directory ``model/``. Used to pretrain a small base; ZeRO stage 0-2 only."""


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)
    """Shard URLs, brace patterns or manifest.json paths (local, http(s)://, s3://)."""
    eval: list[str] = field(default_factory=list)
    """Held-out shards, evaluated per domain."""
    domain_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight per domain (empty = proportional to the data)."""
    max_length: int = 512
    """Tokens per sample after image-token expansion; longer samples are truncated."""
    num_workers: int = 0
    """DataLoader workers per rank."""
    shuffle_buffer: int = 256
    samples_per_epoch: int = 0
    """Mixing mode (domain_weights set): samples per epoch over all ranks; 0 = derived from the shard manifest."""
    streams: int = 0
    """Streams, the unit of reading and of the resume position (docs/data.md). With a global micro-batch
    g = micro-batch x world size >= streams, each rank owns streams / world size of them and every step takes
    g / streams samples from each; with g < streams, each step reads one group of g streams (streams / g steps per
    round, as with gradient accumulation). A checkpoint resumes exactly (mid-epoch too) on any world size and
    micro-batch that fit the same streams, e.g. 16 streams for 1-16 ranks with micro-batch x accumulation x
    ranks = 16 or a multiple. 0 = world size x num_workers (reduced to divide the micro-batch). Each stream has its
    own shuffle buffer (shuffle_buffer raw samples) and open shard, so buffer memory grows with streams per rank."""
    seed: int = 0
    chat_format: str = "vicuna_v1"
    """Prompt format: 'vicuna_v1' (LLaVA-1.5's training format) or 'template' (the tokenizer's chat_template)."""
    mismatch_policy: str = "error"
    """A sample whose labels cannot be derived exactly: 'error' stops the run, 'skip' counts and drops it."""
    storage_timeout_s: float = 600.0
    """Transient storage errors (connection, timeout, 5xx, throttling) are retried this long, then the run stops
    naming the shard; permanent ones (credentials, 403, missing key) stop it at once."""
    max_skip_fraction: float = 0.01
    """Skipped samples / samples read above which the run stops; the end-of-run summary warns loudly above it."""


@dataclass
class TrainSection:
    max_steps: int = 100
    """Optimizer steps of the whole run (the schedule spans these)."""
    run_steps: int = 0
    """At most this many steps in this invocation, then checkpoint and exit (0 = until max_steps); for jobs
    with a time slot, resumed with checkpoint.resume auto."""
    lr: float = 2e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    weight_decay: float = 0.0
    log_every: int = 1
    eval_every: int = 0
    """0 = evaluate only at the end."""
    eval_batches: int = 0
    """Held-out batches per rank per evaluation (0 = the whole held-out set)."""
    log_sample_ids: bool = False
    """Record the sample ids of every step's global batch (all ranks, rank order) in metrics.jsonl, as records of
    kind "samples": an audit of what the run trained on (one gather per step)."""
    eval_exact_match_tokens: int = 16
    """Per-domain exact match of greedy answers at each evaluation, decoding up to this many tokens (short-answer
    data); 0 = loss only. Decoding is synced across ranks (and kept in step under ZeRO-3 when some ranks have
    text-only batches)."""
    output_dir: str = "runs/mole"
    seed: int = 0
    collective_timeout_s: float = 1800.0
    """A collective that waits longer than this for a peer fails on every rank that waits (a hung or
    unreachable peer); a dead peer is noticed at once. Must exceed data.storage_timeout_s, since a rank may
    wait that long on storage while its peers wait for it."""
    stop_grace_s: float = 120.0
    """After SIGINT/SIGTERM a rank that has not reached the next step boundary within this many seconds (or
    3x its longest step so far, if longer) exits with status 1: a peer is stuck or gone."""


@dataclass
class CheckpointSection:
    every: int = 0
    """Save every N steps (0 = only at the end and on shutdown)."""
    keep: int = 2
    resume: str = "none"
    """'none', 'auto' (latest complete checkpoint in output_dir/checkpoints) or a checkpoint directory."""


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    mole: MoLEConfig = field(default_factory=MoLEConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_TYPES = {"model": ModelSection, "mole": MoLEConfig, "data": DataSection, "train": TrainSection,
                  "checkpoint": CheckpointSection}


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise naming the key and the value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for alt in inner:
            try:
                return _coerce(where, value, alt)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ValueError(f"{where} ({value!r}) must be a list")
        return [_coerce(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            try:
                value = dict(kv.split("=", 1) for kv in value.split(",") if kv) if "=" in value else json.loads(value)
            except ValueError as exc:
                raise ValueError(f"{where} ({value!r}) must be a mapping like a=0.5,b=0.5") from exc
        if not isinstance(value, dict):
            raise ValueError(f"{where} ({value!r}) must be a mapping")
        return {str(k): _coerce(f"{where}.{k}", v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where} ({value!r}) must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{where} ({value!r}) must be an integer")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} ({value!r}) must be an integer") from None
        if not f.is_integer():
            raise ValueError(f"{where} ({value!r}) must be an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} ({value!r}) must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} ({value!r}) must be a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} ({value!r}) must be a string")
        return str(value)
    return value


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = _SECTION_TYPES[name]
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) in section '{name}': {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def load_run_config(path: str | None = None, overrides: list[str] | None = None,
                    base: dict[str, Any] | None = None) -> RunConfig:
    """Read a run config: ``base`` (e.g. the DeepSpeed file's "mole" key as {"mole": ...}), then the file,
    then ``--section.key value`` / ``section.key=value`` overrides, each layer replacing the last."""
    merged: dict[str, dict[str, Any]] = {k: {} for k in _SECTION_TYPES}

    def merge(src: dict[str, Any], origin: str) -> None:
        for sec, vals in src.items():
            if sec not in merged:
                raise ValueError(f"unknown section '{sec}' in {origin}; known: {', '.join(merged)}")
            if not isinstance(vals, dict):
                raise ValueError(f"section '{sec}' in {origin} must be a mapping, got {vals!r}")
            merged[sec].update(vals)

    if base:
        merge(base, "the DeepSpeed config")
    if path:
        if not Path(path).is_file():
            raise ValueError(f"--config ({path}) does not exist")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"--config ({path}) is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(data, dict):
            raise ValueError(f"run config {path} must be a mapping of sections")
        merge(data, path)
    merge(_parse_overrides(overrides or []), "command-line overrides")
    return RunConfig(**{name: _build_section(name, vals) for name, vals in merged.items()})


def _parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(items):
        item = items[i]
        key = item[2:] if item.startswith("--") else item
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ValueError(f"override {item} has no value")
            value = items[i + 1]
            i += 2
        if "." not in key:
            raise ValueError(f"override {item} must look like --section.key value (sections: {', '.join(_SECTION_TYPES)})")
        sec, k = key.split(".", 1)
        out.setdefault(sec, {})[k.replace("-", "_")] = yaml.safe_load(value) if value != "" else ""
    return out


# (section, field, lowest allowed value, whether the lowest value itself is allowed)
_RANGES = [
    ("train", "max_steps", 1, True), ("train", "run_steps", 0, True), ("train", "lr", 0, False),
    ("train", "warmup_steps", 0, True), ("train", "weight_decay", 0, True), ("train", "log_every", 1, True),
    ("train", "eval_every", 0, True), ("train", "eval_batches", 0, True),
    ("train", "eval_exact_match_tokens", 0, True),
    ("train", "collective_timeout_s", 0, False), ("train", "stop_grace_s", 0, False),
    ("checkpoint", "every", 0, True), ("checkpoint", "keep", 0, True),
    ("data", "max_length", 8, True), ("data", "num_workers", 0, True), ("data", "shuffle_buffer", 0, True),
    ("data", "samples_per_epoch", 0, True), ("data", "streams", 0, True),
    ("data", "storage_timeout_s", 0, False),
    ("model", "tiny_layers", 1, True), ("model", "tiny_hidden", 8, True),
]


def check_values(cfg: RunConfig) -> list[str]:
    """Every out-of-range value of the run config, each naming the field and the value (``mole`` checks itself
    when built)."""
    import math

    p: list[str] = []
    for sec, name, lo, inclusive in _RANGES:
        v = getattr(getattr(cfg, sec), name)
        if isinstance(v, float) and not math.isfinite(v):
            p.append(f"{sec}.{name} ({v}) must be a finite number")
        elif v < lo or (v == lo and not inclusive):
            p.append(f"{sec}.{name} ({v}) must be {'>=' if inclusive else '>'} {lo}")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio ({cfg.train.min_lr_ratio}) must be in [0, 1]")
    from ..data.chat import CHAT_FORMATS
    from ..data.config import MISMATCH_POLICIES

    if cfg.data.chat_format not in CHAT_FORMATS:
        p.append(f"data.chat_format ({cfg.data.chat_format!r}) must be one of {', '.join(CHAT_FORMATS)}")
    if cfg.data.mismatch_policy not in MISMATCH_POLICIES:
        p.append(f"data.mismatch_policy ({cfg.data.mismatch_policy!r}) must be one of {', '.join(MISMATCH_POLICIES)}")
    if not 0.0 <= cfg.data.max_skip_fraction <= 1.0:
        p.append(f"data.max_skip_fraction ({cfg.data.max_skip_fraction}) must be in [0, 1]")
    for d, w in cfg.data.domain_weights.items():
        if w < 0:
            p.append(f"data.domain_weights.{d} ({w}) must be >= 0")
    if cfg.data.domain_weights and sum(cfg.data.domain_weights.values()) <= 0:
        p.append(f"data.domain_weights ({cfg.data.domain_weights}) must have a positive sum")
    if cfg.train.collective_timeout_s <= cfg.data.storage_timeout_s:
        p.append(f"train.collective_timeout_s ({cfg.train.collective_timeout_s:g}) must exceed data.storage_timeout_s "
                 f"({cfg.data.storage_timeout_s:g}): a rank may wait that long on storage while its peers wait for it")
    for sec in ("train", "eval"):
        for url in getattr(cfg.data, sec) or []:
            if "://" not in url and not Path(url).exists():
                p.append(f"data.{sec} ({url!r}) does not exist (a local manifest.json, folder of shards or .tar)")
    if cfg.checkpoint.resume not in ("none", "auto") and not Path(cfg.checkpoint.resume).is_dir():
        p.append(f"checkpoint.resume ({cfg.checkpoint.resume!r}) must be none, auto or an existing checkpoint directory")
    if cfg.model.dtype not in ("auto", "bf16", "fp32"):
        p.append(f"model.dtype ({cfg.model.dtype!r}) must be auto, bf16 or fp32")
    if cfg.train.warmup_steps > cfg.train.max_steps:
        p.append(f"train.warmup_steps ({cfg.train.warmup_steps}) must be <= train.max_steps ({cfg.train.max_steps})")
    return p


def check_against_deepspeed(cfg: RunConfig, ds: dict[str, Any], world_size: int) -> list[str]:
    """Every inconsistency between the run config, the DeepSpeed config and the world, named with values."""
    p: list[str] = []
    ep = cfg.mole.ep_size
    if isinstance(ep, int) and ep > world_size:
        p.append(f"mole.ep_size ({ep}) must be <= world size ({world_size})")
    elif isinstance(ep, int) and world_size % ep:
        p.append(f"world size ({world_size}) must be divisible by mole.ep_size ({ep})")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        p.append(f"zero_optimization.stage ({stage}) must be 0, 1, 2 or 3")
    if ds.get("fp16", {}).get("enabled"):
        p.append("fp16.enabled (true) is not supported: use bf16 (or fp32 on CPU)")
    mb = ds.get("train_micro_batch_size_per_gpu")
    if not isinstance(mb, int) or mb < 1:
        p.append(f"train_micro_batch_size_per_gpu ({mb!r}) must be a positive integer")
    ga = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(ga, int) or ga < 1:
        p.append(f"gradient_accumulation_steps ({ga!r}) must be a positive integer")
    tb = ds.get("train_batch_size")
    if isinstance(tb, int) and isinstance(mb, int) and isinstance(ga, int) and tb != mb * ga * world_size:
        p.append(f"train_batch_size ({tb}) must equal micro-batch ({mb}) x grad accumulation ({ga}) x world ({world_size})")
    if cfg.data.streams and isinstance(mb, int) and mb >= 1:
        from ..data.pipeline import check_layout

        why = check_layout(cfg.data.streams, world_size, mb)
        if why:
            p.append(why.replace("per-rank batch size", "per-rank batch size (train_micro_batch_size_per_gpu)"))
    if cfg.model.train_base and stage == 3:
        p.append("model.train_base (true) needs zero_optimization.stage 0, 1 or 2 (got 3)")
    if cfg.model.train_base and isinstance(ep, int) and ep > 1:
        p.append(f"model.train_base (true) trains no experts: mole.ep_size ({ep}) must be 1")
    return p
