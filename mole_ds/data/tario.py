"""WebDataset tar shards: deterministic writing and streaming reading.

Shard layout (the WebDataset convention): members are grouped by key, ``{key}.json`` holds the sample record
({"id", "domain", "conversations", "image"?}) and ``{key}.{ext}`` the image bytes exactly as they were on disk
(``ext`` = the image's real extension).  Text-only samples have only the json member.

Writing is byte-for-byte reproducible (fixed mtime/owner/mode), so a shard's sha256 depends only on its samples.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile pads archives to a multiple of this


class CorruptShardError(IOError):
    """A shard could not be parsed as a tar archive (truncated, garbage); the message names it."""


def member_bytes(size: int) -> int:
    """Bytes a member of `size` bytes occupies in a ustar/pax-free archive (header + padded data)."""
    return _BLOCK + -(-size // _BLOCK) * _BLOCK


def archive_bytes(member_sizes_total: int) -> int:
    """Final size of an archive whose members take `member_sizes_total` bytes (end blocks + record padding)."""
    raw = member_sizes_total + 2 * _BLOCK
    return -(-raw // _RECORD) * _RECORD


class TarShardWriter:
    """Writes one shard to a local file, reproducibly."""

    def __init__(self, path: str):
        self.path = path
        self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: files maps extension ('json', 'png', ...) to bytes; json goes first."""
        for ext in sorted(files, key=lambda e: (e != "json", e)):
            data = files[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()


class HashingReader(io.RawIOBase):
    """Pass-through reader that counts bytes and computes sha256 of everything read."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.nbytes += n
        return n

    def drain(self) -> None:
        """Read to the end (tarfile stops at the end-of-archive blocks, before the record padding)."""
        while self.read(1 << 20):
            pass


def split_key(name: str) -> tuple[str, str]:
    """'dir/abc.0001.json' -> ('dir/abc', '0001.json'): the key ends at the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (head + "/" + stem if head else stem), ext


def iter_tar_samples(stream, url: str) -> Iterator[dict]:
    """Yield {"__key__", "__url__", ext: bytes, ...} per sample from a streaming tar.

    Raises CorruptShardError (naming `url`) if the archive is damaged; samples before the damage are yielded.
    A StorageError of the stream (the object could not be read) passes through unchanged: it says nothing
    about the shard's bytes, so it must never be taken for corruption.
    """
    from mole_ds.data.storage import StorageError

    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
    except StorageError:
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptShardError(f"{url}: not a readable tar ({type(exc).__name__}: {exc})") from exc
    current: dict | None = None
    try:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = split_key(m.name)
            f = tar.extractfile(m)
            data = f.read() if f is not None else b""
            if len(data) != m.size:
                raise CorruptShardError(f"{url}: member {m.name} truncated ({len(data)} of {m.size} bytes)")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = data
    except (CorruptShardError, StorageError):
        raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptShardError(f"{url}: damaged tar after key {current and current['__key__']!r} "
                                f"({type(exc).__name__}: {exc})") from exc
    if current is not None:
        yield current
