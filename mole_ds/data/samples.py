"""Turning a raw tar sample ({"__key__", "json": bytes, "png": bytes, ...}) into a checked record.

Read-time skip reasons: 'bad_json' (json member missing or not parseable), 'not_an_object' (valid json that is
not an object), 'missing_key' (no id / domain / conversations), a conversation_problem() reason, 'bad_image'
(image bytes that do not decode).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from mole_ds.data.conversation import conversation_problem
from mole_ds.data.tario import IMAGE_EXTS


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is a short counter name, the message has the detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Record:
    """A parsed sample: its json fields plus the raw image bytes (None for text-only samples)."""

    id: str
    domain: str
    conversations: list
    image_bytes: bytes | None
    image_ext: str | None
    key: str
    url: str


def parse_sample(raw: dict) -> Record:
    """Parse and check one raw sample; raises SkipSample with the reason."""
    where = f"{raw.get('__url__')}#{raw.get('__key__')}"
    if "json" not in raw:
        raise SkipSample("bad_json", f"{where}: no json member")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SkipSample("bad_json", f"{where}: {exc}") from exc
    if not isinstance(meta, dict):
        raise SkipSample("not_an_object", f"{where}: the json is a {type(meta).__name__}, not an object")
    missing = [k for k in ("id", "domain", "conversations") if k not in meta]
    if missing:
        raise SkipSample("missing_key", f"{where}: missing {missing}")
    exts = [e for e in IMAGE_EXTS if e in raw]
    img, ext = (raw[exts[0]], exts[0]) if exts else (None, None)
    problem = conversation_problem(meta["conversations"], img is not None)
    if problem:
        raise SkipSample(problem, where)
    return Record(str(meta["id"]), str(meta["domain"]), meta["conversations"], img, ext, raw["__key__"], raw["__url__"])


def decode_image(rec: Record):
    """PIL RGB image of a record (raises SkipSample('bad_image') on a decoder failure)."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(rec.image_bytes))
        im.load()
        return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure
        raise SkipSample("bad_image", f"{rec.url}#{rec.key}: {exc}") from exc
