"""Unknown keys in the DeepSpeed JSON, refused before any rank starts, like unknown run-config keys.

DeepSpeed ignores top-level keys it does not read (a typo such as ``zero_optimisation`` silently means ZeRO
stage 0) and checks unknown keys inside its pydantic sections (``zero_optimization``, ``bf16``...) only when
the engine is built, after every rank has started. So the config is parsed here, in one process, by
DeepSpeed's own ``DeepSpeedConfig`` (the installed version's own schema, no copy of it):

  1. Every dict of the config is wrapped in a recorder that notes which of its keys DeepSpeed reads.
  2. Each top-level section is parsed on its own beside the keys every config needs, so a pydantic error
     (an unknown or invalid key) is attributed to its section with the path inside it.
  3. A key that DeepSpeed never read is unknown: at the top level always; inside a section only when
     DeepSpeed read some other key of that same dict (a dict it passes on whole, such as optimizer.params,
     is free-form and not checked, and so are optimizer.params and scheduler.params).
  4. Each problem names the key path and the value, with the closest known key when one is near.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import logging
from typing import Any

# Keys DeepSpeed reads outside DeepSpeedConfig (so the recorder cannot see them), and our own key.
EXTRA_TOP_LEVEL = ("sequence_parallel_size", "mole_ds")
# Needed by DeepSpeedConfig's batch arithmetic; the world-size check of train_batch_size is ours
# (mole_ds.train.config.check_against_deepspeed), since no process group exists yet.
_BASE = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# Free-form dicts that DeepSpeed hands to another constructor (the optimizer's / scheduler's own arguments).
FREE_FORM = {("optimizer", "params"), ("scheduler", "params")}


class _Keys:
    """dict.keys() stand-in whose membership tests are recorded (DeepSpeed writes ``KEY in d.keys()``)."""

    def __init__(self, rec: "_Recorder") -> None:
        self.rec = rec

    def __contains__(self, k) -> bool:
        self.rec._note(k)
        return dict.__contains__(self.rec, k)

    def __iter__(self):
        return iter(list(dict.keys(self.rec)))

    def __len__(self) -> int:
        return dict.__len__(self.rec)


class _Recorder(dict):
    """Step 1: a dict that records reads per path; nested dicts are wrapped when read."""

    def __init__(self, data: dict, path: tuple, reads: dict) -> None:
        super().__init__(data)
        self.path, self.reads = path, reads
        reads.setdefault(path, set())

    def _note(self, k) -> None:
        self.reads[self.path].add(k)

    def _wrap(self, k, v):
        return _Recorder(v, self.path + (k,), self.reads) if isinstance(v, dict) and not isinstance(v, _Recorder) else v

    def __getitem__(self, k):
        self._note(k)
        v = self._wrap(k, dict.__getitem__(self, k))
        dict.__setitem__(self, k, v)
        return v

    def get(self, k, default=None):
        self._note(k)
        return self[k] if dict.__contains__(self, k) else default

    def __contains__(self, k) -> bool:
        self._note(k)
        return dict.__contains__(self, k)

    def keys(self):
        return _Keys(self)

    def __iter__(self):  # makes **d go through keys()/__getitem__ (recorded) instead of dict's fast path
        return iter(list(dict.keys(self)))

    def items(self):
        return [(k, self[k]) for k in list(dict.keys(self))]

    def values(self):
        return [v for _, v in self.items()]

    def __copy__(self):
        return _Recorder(dict(self), self.path, self.reads)

    def copy(self):
        return self.__copy__()


def _fmt(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse(cfg: dict, reads: dict):
    """DeepSpeedConfig on a recorder of ``cfg``, its log output silenced; returns the exception or None."""
    from deepspeed.runtime.config import DeepSpeedConfig

    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            DeepSpeedConfig(_Recorder(cfg, (), reads))
        return None
    except Exception as exc:  # noqa: BLE001 - every DeepSpeed refusal becomes a named problem
        return exc
    finally:
        logger.setLevel(level)


def _pydantic_problems(section: str, exc) -> list[str]:
    out = []
    for e in exc.errors():
        loc = tuple(e.get("loc", ()))
        if loc and loc[0] == section:
            loc = loc[1:]
        where = _fmt((section,) + loc)
        if e.get("type") == "extra_forbidden":
            out.append(f"{where} ({e.get('input')!r}) is not a DeepSpeed key"
                       f"{_suggest(loc[-1], _section_fields(section)) if len(loc) == 1 else ''}")
        else:
            out.append(f"{where} ({e.get('input')!r}): {e.get('msg')}")
    return out


def _section_fields(section: str) -> list[str]:
    """Field names (and aliases) of the pydantic model DeepSpeed parses ``section`` with, where we know it."""
    try:
        if section == "zero_optimization":
            from deepspeed.runtime.zero.config import DeepSpeedZeroConfig as model
        else:
            return []
    except ImportError:  # pragma: no cover
        return []
    names = []
    for name, f in model.model_fields.items():
        names.append(name)
        if getattr(f, "alias", None):
            names.append(f.alias)
    return names


def check_deepspeed_keys(ds: dict[str, Any]) -> list[str]:
    """Problems with the keys of a DeepSpeed config (without its "mole_ds" part), each naming path and value."""
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover - a DeepSpeed dependency
        ValidationError = ()  # noqa: N806
    base = {k: ds[k] for k in _BASE if k in ds}
    problems: list[str] = []
    # Step 1: which top-level keys does DeepSpeed read at all (the whole config, parsed once)?
    top_reads: dict = {}
    _parse(base, top_reads)
    known_top = set(top_reads.get((), set())) | set(EXTRA_TOP_LEVEL) | set(_BASE) | {"train_batch_size"}
    for key in ds:
        if key not in known_top:
            problems.append(f"{key} ({_short(ds[key])}) is not a DeepSpeed key{_suggest(key, known_top)}")
    # Steps 2-3: each known section on its own.
    for key, value in ds.items():
        if key in _BASE or key not in known_top or key in EXTRA_TOP_LEVEL or key == "train_batch_size":
            continue
        reads: dict = {}
        exc = _parse({**base, key: value}, reads)
        if exc is not None:
            if ValidationError and isinstance(exc, ValidationError):
                problems += _pydantic_problems(key, exc)
            else:
                problems.append(f"{key} ({_short(value)}): DeepSpeed refuses it: {' '.join(str(exc).split())[:300]}")
            continue
        for path, seen in sorted(reads.items(), key=lambda kv: len(kv[0])):
            if not path or path[0] != key or not seen or path in FREE_FORM:
                continue  # the top level, another section, or a dict DeepSpeed passed on whole
            node = _lookup(value, path[1:])
            if not isinstance(node, dict):
                continue
            for k in node:
                if k not in seen:
                    problems.append(f"{_fmt(path + (k,))} ({_short(node[k])}) is not a DeepSpeed key"
                                    f"{_suggest(k, seen)}")
    return problems


def _lookup(d: dict, path: tuple):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


__all__ = ["check_deepspeed_keys"]
