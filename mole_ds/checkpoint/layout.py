"""The checkpoint layout, in one place: file names, the completion marker, listing tags, verifying them, and
resolving what a user names (a tag, a training output_dir, a consolidated file) to something verified.

A training checkpoint is ``<output_dir>/checkpoints/<tag>/`` holding:

* DeepSpeed's own files (``mp_rank_*_model_states.pt``, ``*zero_pp_rank_<r>_mp_rank_*_{model,optim}_states.pt``;
  read by :mod:`mole_ds.checkpoint.deepspeed_files`);
* ``rng/rank<r>.json``, each rank's RNG state;
* ``mole.safetensors``, every trainable tensor in full (:mod:`mole_ds.checkpoint.consolidated`);
* ``mole_meta.json``, the marker, written last and atomically by rank 0 once every rank finished every file.
  It records the run's layout and each file's size and SHA-256.

Trust rule, the same for every reader (resume, elastic re-slicing, consolidation, export, generate, the eval
plugin): a tag without its marker is never used; a tag is used only if every file matches the manifest. Asked
for "the newest" checkpoint of a run, a reader takes the newest marked tag that verifies and falls back to
the previous one with a warning naming each rejected tag and its problems; a tag (or a file inside one) named
explicitly must verify or is refused with the problems named.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

MARKER = "mole_meta.json"
"""The file that marks a checkpoint tag complete (written last)."""
CONSOLIDATED_NAME = "mole.safetensors"
"""The consolidated file's name, in every checkpoint tag and in every ``tools/export.py`` output."""
CHECKPOINTS_DIR = "checkpoints"
"""The folder of a training output_dir that holds the tags."""
RNG_DIR = "rng"


def tag_name(step: int) -> str:
    """The tag directory name of a checkpoint taken after ``step`` optimizer steps."""
    return f"step{step:08d}"


def rng_file(tag: Path, rank: int) -> Path:
    """Where rank ``rank`` keeps its RNG state inside a tag."""
    return Path(tag) / RNG_DIR / f"rank{rank}.json"


# -- the marker ---------------------------------------------------------------------------------------------
def read_marker(tag: str | Path) -> dict:
    """The marker of a tag (FileNotFoundError naming the tag when there is none)."""
    p = Path(tag) / MARKER
    if not p.is_file():
        raise FileNotFoundError(f"{tag} is not a complete mole_ds checkpoint (no {MARKER})")
    return json.loads(p.read_text())


def write_marker(tag: str | Path, marker: dict) -> Path:
    """Write the marker atomically (temporary file, fsync, rename) with the manifest of every other file."""
    tag = Path(tag)
    marker = {**marker, "complete": True, "files": file_manifest(tag)}
    tmp = tag / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(marker, indent=1))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(tag / MARKER)
    return tag / MARKER


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(tag: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under a checkpoint tag except the marker."""
    out = {}
    for p in sorted(Path(tag).rglob("*")):
        if p.is_file() and p.name not in (MARKER, MARKER + ".tmp"):
            out[p.relative_to(tag).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    return out


# -- verification and listing -------------------------------------------------------------------------------
def verify_checkpoint(tag: str | Path, hashes: bool = True) -> list[str]:
    """Every problem of a checkpoint tag against its marker's manifest (missing marker, missing, truncated or
    altered file), each naming the file and the values; [] when it can be trusted. Tags written before the
    manifest existed are checked for the marker only."""
    tag = Path(tag)
    if not (tag / MARKER).is_file():
        return [f"{tag}: no {MARKER} (the save did not finish)"]
    try:
        meta = json.loads((tag / MARKER).read_text())
    except json.JSONDecodeError as exc:
        return [f"{tag / MARKER}: not valid JSON ({exc})"]
    problems = []
    for rel, want in (meta.get("files") or {}).items():
        p = tag / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or altered)")
        elif hashes and _sha256(p) != want["sha256"]:
            problems.append(f"{p}: SHA-256 differs from the manifest's (altered or corrupt)")
    return problems


def _marked_step(tag: Path) -> int:
    try:
        return int(json.loads((tag / MARKER).read_text()).get("step", -1))
    except (json.JSONDecodeError, OSError, ValueError):
        return -1


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Marked checkpoint tags under ``root``, oldest first (marked = every rank finished; not yet verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file()), key=_marked_step)


def is_tag(path: str | Path) -> bool:
    """Whether ``path`` is a marked checkpoint tag directory."""
    return (Path(path) / MARKER).is_file()


def newest_verified(root: str | Path, need: str | None = None) -> Path | None:
    """The newest marked tag under ``root`` that verifies (and holds the file ``need``, when given), falling
    back to older ones with a warning on stderr per rejected tag; None when there is none."""
    for tag in reversed(complete_checkpoints(root)):
        problems = verify_checkpoint(tag)
        if not problems and need is not None and not (tag / need).is_file():
            problems = [f"{tag / need}: missing (not recorded in this checkpoint)"]
        if not problems:
            return tag
        print(f"[mole_ds] WARNING: not using checkpoint {tag}, it fails verification:\n  " + "\n  ".join(problems)
              + "\n  trying the previous checkpoint", file=sys.stderr, flush=True)
    return None


def require_verified(tag: str | Path, what: str) -> Path:
    """``tag`` if it is a marked tag that verifies; else ValueError naming ``what`` (the field or argument that
    named it) and every problem."""
    tag = Path(tag)
    if not is_tag(tag):
        raise ValueError(f"{what} ({str(tag)!r}) is not a complete mole_ds checkpoint (no {MARKER})")
    problems = verify_checkpoint(tag)
    if problems:
        raise ValueError(f"{what} ({str(tag)!r}) fails verification:\n  " + "\n  ".join(problems))
    return tag


# -- resolving what a user names ------------------------------------------------------------------------------
def find_resume(resume: str, root: str | Path) -> Path | None:
    """The ``checkpoint.resume`` rule: 'none' -> None; 'auto' -> the newest verified tag under ``root`` (older
    ones loudly when newer fail; None when there is none); else the named tag, which must verify."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_verified(root)
    return require_verified(resume, "checkpoint.resume")


def _run_roots(src: Path) -> list[Path]:
    return [r for r in (src / CHECKPOINTS_DIR, src) if r.is_dir()]


def resolve_tag(src: str | Path) -> Path:
    """A verified checkpoint tag from what a user gives: a tag directory (must verify), or a training
    output_dir / its ``checkpoints/`` folder (its newest verified tag, falling back loudly)."""
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if is_tag(src):
        return require_verified(src, "checkpoint")
    for root in _run_roots(src):
        tag = newest_verified(root)
        if tag is not None:
            return tag
    raise FileNotFoundError(f"{src}: no verified mole_ds checkpoint tag (a directory with {MARKER}) in it or in "
                            f"its {CHECKPOINTS_DIR}/ folder")


def resolve_consolidated(path: str | Path) -> Path:
    """The consolidated ``mole.safetensors`` that ``path`` names, verified where a checkpoint holds it.

    ``path`` may be the file itself (any name ending in .safetensors; inside a checkpoint tag the tag must
    verify), a directory holding ``mole.safetensors`` (a checkpoint tag, which must verify, or a
    ``tools/export.py`` output), or a training ``output_dir`` (or its ``checkpoints/`` folder): then the newest
    verified checkpoint that has the file, older ones loudly when newer fail. Raises FileNotFoundError /
    ValueError naming the path and the problems."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{p} is not a .safetensors file (give a consolidated {CONSOLIDATED_NAME}, a checkpoint "
                             "tag directory or a training output_dir)")
        if is_tag(p.parent):
            require_verified(p.parent, "checkpoint")
        return p
    if (p / CONSOLIDATED_NAME).is_file():
        if is_tag(p):
            require_verified(p, "checkpoint")
        return p / CONSOLIDATED_NAME
    roots = _run_roots(p)
    if not any(complete_checkpoints(r) for r in roots):
        raise ValueError(f"{p} holds no {CONSOLIDATED_NAME} and no complete checkpoint (a tag directory with "
                         f"{MARKER}) under {roots[0]}")
    for root in roots:
        tag = newest_verified(root, need=CONSOLIDATED_NAME)
        if tag is not None:
            return tag / CONSOLIDATED_NAME
    raise ValueError(f"{p}: no checkpoint under {roots[0]} both verifies and holds a {CONSOLIDATED_NAME} "
                     f"(checked {', '.join(t.name for r in roots for t in complete_checkpoints(r))})")
