"""The run config: typed sections read from YAML/JSON plus ``--section.field value`` overrides.

Unknown keys and wrong types are errors naming the key and the value; cross-checks against the DeepSpeed
config (micro-batch, ZeRO stage, ep_size vs world size) happen in :func:`check_against_deepspeed` before any
work starts. Each section's fields carry a docstring; :func:`fields_help` prints them (``launchers/train.py
--help``). The sections are the schemas of their layers where one exists: ``mole`` is
:class:`mole_ds.config.MoLEConfig`, ``data`` is :class:`mole_ds.data.DataOptions` plus the source lists.

Why the YAML/CLI reading below is ~60 hand-written lines rather than tyro, jsonargparse or simple_parsing
(all on PyPI, none installed): the config is read in three layers (the DeepSpeed file's "mole_ds" key, then
``--config``, then ``--section.key value``) and every refusal must list all problems at once, each naming the
field and value, with exit 2 (tests pin the messages); these libraries report the first error in their own
words and exit, so an adapter for the layering and the message format would cost about as much code as the
coercion it replaces, plus a dependency on every rank's launch path. The field docstrings are read with ast.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, MoLEConfig, check_ep_size
from ..data.config import DataOptions


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


@dataclass(kw_only=True)
class DataSection(DataOptions):
    """The run's data: the data layer's schema (:class:`mole_ds.data.DataOptions`: its fields, defaults and
    rules) plus the run's source lists; the trainer's loaders get ``DataConfig(urls, batch_size, **options())``."""

    train: list[str] = field(default_factory=list)
    """Shard URLs, brace patterns or manifest.json paths (local, http(s)://, s3://)."""
    eval: list[str] = field(default_factory=list)
    """Held-out shards, evaluated per domain."""

    def problems(self) -> list[str]:
        p = super().problems()
        if not self.train:
            p.append("data.train ([]) must name at least one shard source (URLs, a folder of shards or a "
                     "manifest.json)")
        for sec in ("train", "eval"):
            for url in getattr(self, sec) or []:
                if "://" not in url and not Path(url).exists():
                    p.append(f"data.{sec} ({url!r}) does not exist (a local manifest.json, folder of shards or .tar)")
        return p


@dataclass
class TrainSection:
    max_steps: int = 100
    """Optimizer steps of the whole run (the schedule spans these)."""
    run_steps: int = 0
    """At most this many steps in this invocation, then checkpoint and exit (0 = until max_steps); for jobs
    with a time slot, resumed with checkpoint.resume auto."""
    lr: float = 2e-4
    """Peak learning rate (AdamW), reached after warmup_steps."""
    projector_lr: float = 0.0
    """Peak learning rate of the multimodal projector (LLaVA's --mm_projector_lr, e.g. 2e-5 beside a LoRA lr of
    2e-4); 0 = lr. Needs mole.train_projector. Same warmup and cosine shape as lr."""
    router_lr: float = 0.0
    """Peak learning rate of the MoLE routers; 0 = lr. Same warmup and cosine shape as lr."""
    gradient_checkpointing: bool = False
    """Activation checkpointing of every decoder layer of the LLM: a layer keeps only its input through the
    forward and runs again during backward (about 1/3 more compute; activation memory falls from ~34 x hidden
    bytes per token and layer to ~2 x hidden plus one layer's working set). MoLE-aware: routing statistics,
    aux loss and all-to-all byte counts come from the real forward; the recompute's all-to-all bytes are
    reported as a2a_bytes_recompute."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr over this many steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    weight_decay: float = 0.0
    """AdamW weight decay of the trained parameters."""
    log_every: int = 1
    """Write a metrics record (and a progress line) every N steps."""
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
    """Where checkpoints/, metrics.jsonl, routing.png and summary.json are written."""
    seed: int = 0
    """Seed of the model's initialisation (the embedded tiny base, the LoRA/router weights) and of dropout."""
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
    """Complete checkpoints kept in output_dir/checkpoints (older ones are deleted; 0 = keep all)."""
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


SECTION_TYPES = {"model": ModelSection, "mole": MoLEConfig, "data": DataSection, "train": TrainSection,
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
    cls = SECTION_TYPES[name]
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
    merged: dict[str, dict[str, Any]] = {k: {} for k in SECTION_TYPES}

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
    sections, problems = {}, []
    for name, vals in merged.items():  # every section's problems, not only the first section's
        try:
            sections[name] = _build_section(name, vals)
        except ConfigError as exc:
            problems += exc.problems
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return RunConfig(**sections)


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
            raise ValueError(f"override {item} must look like --section.key value (sections: {', '.join(SECTION_TYPES)})")
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
    ("model", "tiny_layers", 1, True), ("model", "tiny_hidden", 8, True),
]


def check_values(cfg: RunConfig) -> list[str]:
    """Every out-of-range value of the run config, each naming the field and the value (``mole`` checks itself
    when built; ``data`` has its layer's rules, :meth:`DataSection.problems`)."""
    p: list[str] = []
    for sec, name, lo, inclusive in _RANGES:
        v = getattr(getattr(cfg, sec), name)
        if isinstance(v, float) and not math.isfinite(v):
            p.append(f"{sec}.{name} ({v}) must be a finite number")
        elif v < lo or (v == lo and not inclusive):
            p.append(f"{sec}.{name} ({v}) must be {'>=' if inclusive else '>'} {lo}")
    if not 0.0 <= cfg.train.min_lr_ratio <= 1.0:
        p.append(f"train.min_lr_ratio ({cfg.train.min_lr_ratio}) must be in [0, 1]")
    p += cfg.data.problems()
    if cfg.train.collective_timeout_s <= cfg.data.storage_timeout_s:
        p.append(f"train.collective_timeout_s ({cfg.train.collective_timeout_s:g}) must exceed data.storage_timeout_s "
                 f"({cfg.data.storage_timeout_s:g}): a rank may wait that long on storage while its peers wait for it")
    if cfg.checkpoint.resume not in ("none", "auto") and not Path(cfg.checkpoint.resume).is_dir():
        p.append(f"checkpoint.resume ({cfg.checkpoint.resume!r}) must be none, auto or an existing checkpoint directory")
    if cfg.model.path and not (Path(cfg.model.path) / "config.json").is_file():
        p.append(f"model.path ({cfg.model.path!r}) is not a local transformers model directory (no config.json); "
                 "nothing is downloaded")
    if cfg.model.dtype not in ("auto", "bf16", "fp32"):
        p.append(f"model.dtype ({cfg.model.dtype!r}) must be auto, bf16 or fp32")
    for name in ("projector_lr", "router_lr"):
        v = getattr(cfg.train, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            p.append(f"train.{name} ({v}) must be a finite number >= 0 (0 = train.lr)")
    if cfg.train.projector_lr and not cfg.mole.train_projector and not cfg.model.train_base:
        p.append(f"train.projector_lr ({cfg.train.projector_lr:g}) needs mole.train_projector (false): the projector "
                 "is frozen")
    if cfg.train.router_lr and cfg.model.train_base:
        p.append(f"train.router_lr ({cfg.train.router_lr:g}): model.train_base (true) trains no routers")
    if cfg.train.warmup_steps > cfg.train.max_steps:
        p.append(f"train.warmup_steps ({cfg.train.warmup_steps}) must be <= train.max_steps ({cfg.train.max_steps})")
    return p


def check_against_deepspeed(cfg: RunConfig, ds: dict[str, Any], world_size: int) -> list[str]:
    """Every inconsistency between the run config, the DeepSpeed config and the world, named with values."""
    p: list[str] = []
    ep = cfg.mole.ep_size
    if isinstance(ep, int):  # 'auto' is resolved at start-up, from the real world size
        p += check_ep_size(ep, world_size)
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
    if cfg.data.group_by_length != "none" and isinstance(mb, int) and mb >= 1 and not any("streams" in x for x in p):
        # the loader's own refusal, before any rank starts (the same function decides)
        from ..data.grouping import grouping_problem
        from ..data.pipeline import Layout, default_streams

        streams = cfg.data.streams or default_streams(world_size, mb, max(1, cfg.data.num_workers))
        c = Layout(streams, world_size, mb, 0).c
        why = grouping_problem(cfg.data.group_by_length, cfg.data.shuffle_buffer, c,
                               f"global micro-batch {mb * world_size} = train_micro_batch_size_per_gpu {mb} x world "
                               f"size {world_size}, over data.streams {streams}")
        if why:
            p.append(why)
    if cfg.model.train_base and stage == 3:
        p.append("model.train_base (true) needs zero_optimization.stage 0, 1 or 2 (got 3)")
    if cfg.model.train_base and isinstance(ep, int) and ep > 1:
        p.append(f"model.train_base (true) trains no experts: mole.ep_size ({ep}) must be 1")
    return p


def check_data_fits(cfg: RunConfig, processor) -> list[str]:
    """What needs the processor: data.max_length against the shortest sample of the run's local sources, with
    the processor's image-token expansion (remote sources: the loader raises the same refusal)."""
    from ..data.loader import check_sources

    p = check_sources(cfg.data, cfg.data.train, processor, "data.train")
    return p + [x for x in check_sources(cfg.data, cfg.data.eval, processor, "data.eval") if x not in p]


# -- help ---------------------------------------------------------------------------------------------------

def field_docs(cls: type) -> dict[str, str]:
    """{field: attribute docstring} of a dataclass and its dataclass bases (the string literal right after each
    field, read from the source with ast)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def fields_help(width: int = 110) -> str:
    """Every run-config field, by section: ``--section.name  type  (default: value)`` and its docstring."""
    out = []
    for name, cls in SECTION_TYPES.items():
        out.append(f"{name}:  ({cls.__module__}.{cls.__qualname__})")
        docs = field_docs(cls)
        own = cls.__dict__.get("__annotations__", {})  # a section's own fields first, then its layer's schema
        for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
            tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            out.append(f"  --{name}.{f.name}  {tp}  (default: {json.dumps(_default(f))})")
            doc = " ".join(docs.get(f.name, "(undocumented)").split())
            out += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
        out.append("")
    return "\n".join(out)
