"""Input domains for sharding: parsing ``NAME=DATA[:IMAGE_ROOT]``, loading records, validating samples.

DATA is a LLaVA-format ``.json`` list, a ``.jsonl`` file, or anything the ``datasets`` library loads from local
files (``.parquet``, a ``save_to_disk`` folder).  Records need "id" and "conversations"; "image" is optional and
is either a path relative to IMAGE_ROOT or (from ``datasets``) embedded bytes ({"bytes", "path"}).
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass

from mole_ds.data.conversation import conversation_problem
from mole_ds.data.tario import IMAGE_EXTS

_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")  # no '-': shard names are {domain}-{index:06d}.tar

SKIP_REASONS = (
    "not_an_object", "missing_id", "duplicate_id", "malformed_conversation", "unknown_role", "bad_turn_order", "no_assistant_turn",
    "placeholder_in_reply", "multiple_placeholders", "placeholder_without_image", "image_without_placeholder",
    "image_path_escapes_root", "missing_image", "unreadable_image",
)


@dataclass(frozen=True)
class DomainSource:
    """One input domain.

    name: travels with every sample (letters, digits, '_' and '.'; no '-').
    data: path of the records (.json LLaVA list, .jsonl, .parquet, or a datasets save_to_disk folder).
    image_root: folder that relative image paths are resolved in; images may not escape it.
    """

    name: str
    data: str
    image_root: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not _DOMAIN_NAME.match(self.name or ""):
            problems.append(f"name ({self.name!r}) must match {_DOMAIN_NAME.pattern}")
        if not self.data:
            problems.append(f"data ({self.data!r}) must be a path")
        if problems:
            raise ValueError("DomainSource: " + "; ".join(problems))

    @classmethod
    def parse(cls, spec: str) -> "DomainSource":
        """'general=data/general.json:data/images' -> DomainSource('general', 'data/general.json', 'data/images')."""
        name, eq, rest = spec.partition("=")
        if not eq or not rest:
            raise ValueError(f"--domain {spec!r}: expected NAME=DATA[:IMAGE_ROOT]")
        data, _, root = rest.partition(":")
        return cls(name.strip(), data, root or None)


def load_records(src: DomainSource) -> list:
    """Load a domain's raw records in file order.  Errors name the file (and the line of a .jsonl)."""
    path = src.data
    if not os.path.exists(path):
        raise ValueError(f"domain {src.name!r}: data file {path} does not exist")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"domain {src.name!r}: data file {path} is empty (0 bytes)")
    if path.endswith(".json") and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                recs = json.load(f)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"domain {src.name!r}: {path} is not valid JSON ({exc})") from exc
        if not isinstance(recs, list):
            raise ValueError(f"domain {src.name!r}: {path}: expected a JSON list of samples, got a "
                             f"{type(recs).__name__}")
        return recs
    if path.endswith(".jsonl") and os.path.isfile(path):
        recs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        recs.append(json.loads(line))
                    except ValueError as exc:
                        raise ValueError(f"domain {src.name!r}: {path} line {n} is not valid JSON ({exc})") from exc
        return recs
    import datasets

    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        else:
            fmt = "parquet" if path.endswith(".parquet") else "json"
            ds = datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as exc:  # noqa: BLE001 - any loader failure: name the file
        raise ValueError(f"domain {src.name!r}: {path} could not be loaded ({type(exc).__name__}: {exc})") from exc
    if "image" in ds.column_names and isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # keep the original encoded bytes
    return [dict(r) for r in ds]


def _ext_of_bytes(data: bytes) -> str:
    from PIL import Image

    fmt = (Image.open(io.BytesIO(data)).format or "").lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)


def _check_image_bytes(data: bytes) -> None:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # full decode: catches truncated files that a header check passes


@dataclass
class Checked:
    """Result of checking one record: reason None = usable; then `sample` is what the shard writer needs."""

    index: int
    reason: str | None = None
    detail: str = ""
    sample: dict | None = None
    nbytes: int = 0


def check_record(index: int, rec, domain: str, image_root: str | None, data_dir: str = ".") -> Checked:
    """Validate one record (everything except duplicate ids, which need the whole domain).

    Relative image paths resolve in image_root (or, without one, in data_dir, the data file's folder) and may
    not escape it; absolute paths are only accepted when no image_root is given.
    """
    if not isinstance(rec, dict):
        return Checked(index, "not_an_object", f"record {index} is a {type(rec).__name__}, not an object")
    if rec.get("id") in (None, ""):
        return Checked(index, "missing_id", f"record {index} has no 'id'")
    sid = str(rec["id"])
    img = rec.get("image")
    if isinstance(img, dict) and not img.get("bytes") and not img.get("path"):
        img = None  # datasets' Image feature stores a missing image as {"bytes": None, "path": None}
    has_image = img not in (None, "")
    problem = conversation_problem(rec.get("conversations"), has_image)
    if problem:
        return Checked(index, problem, f"id {sid}")
    sample = {"id": sid, "domain": domain, "conversations": rec["conversations"]}
    nbytes = len(json.dumps(sample))
    if has_image:
        if isinstance(img, dict) and img.get("bytes"):
            data = img["bytes"]
            try:
                _check_image_bytes(data)
                ext = _ext_of_bytes(data)
            except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
                return Checked(index, "unreadable_image", f"id {sid}: {exc}")
            sample["image"] = img.get("path") or f"{sid}.{ext}"
            sample["_image_bytes"], sample["_ext"] = data, ext
            sample["_image_nbytes"] = len(data)
            nbytes += len(data)
        else:
            rel = img["path"] if isinstance(img, dict) else img
            if not isinstance(rel, str):
                return Checked(index, "missing_image", f"id {sid}: image entry {img!r} is not a path")
            if image_root is None and os.path.isabs(rel):
                full = rel  # no image root given: absolute paths (as datasets stores them) are taken as they are
            else:
                root = os.path.realpath(image_root or data_dir)
                full = os.path.realpath(os.path.join(root, rel))
                if os.path.isabs(rel) or os.path.commonpath([root, full]) != root:
                    return Checked(index, "image_path_escapes_root", f"id {sid}: {rel}")
            if not os.path.isfile(full):
                return Checked(index, "missing_image", f"id {sid}: {rel}")
            try:
                with open(full, "rb") as f:
                    data = f.read()
                _check_image_bytes(data)
            except Exception as exc:  # noqa: BLE001
                return Checked(index, "unreadable_image", f"id {sid}: {rel}: {exc}")
            ext = os.path.splitext(rel)[1].lower().lstrip(".")
            if ext not in IMAGE_EXTS:
                ext = _ext_of_bytes(data)
            sample["image"] = rel
            sample["_image_path"], sample["_ext"] = full, ext
            sample["_image_nbytes"] = len(data)
            nbytes += len(data)
    return Checked(index, None, "", sample, nbytes)
