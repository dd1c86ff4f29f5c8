"""Object-storage access: open, write, list and stat local paths, ``s3://`` and ``http(s)://`` URLs.

Reads stream: an S3 object is read from boto3 ``get_object``'s streaming body (no download to disk), an
HTTP object from urllib's response.  Transient errors are retried with exponential backoff; a failure that
survives the retries raises :class:`StorageError` naming the object.  A read that breaks mid-stream is
resumed with an HTTP Range request from the byte already reached, so one dropped connection does not cost
the whole shard.

S3 endpoint and credentials come from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which boto3 honours on its own.
"""

from __future__ import annotations

import io
import logging
import os
import random
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator

log = logging.getLogger(__name__)


class StorageError(IOError):
    """An object could not be read or written after all retries; the message names the object."""


@dataclass(frozen=True)
class RetryPolicy:
    """How transient storage errors are retried.

    attempts: total tries per operation (>= 1).
    base_delay_s: first backoff; doubles each retry, with up to 50% random jitter.
    max_delay_s: cap on one backoff.
    """

    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def __post_init__(self) -> None:
        problems = []
        if self.attempts < 1:
            problems.append(f"attempts ({self.attempts}) must be >= 1")
        if self.base_delay_s < 0:
            problems.append(f"base_delay_s ({self.base_delay_s}) must be >= 0")
        if self.max_delay_s < self.base_delay_s:
            problems.append(f"max_delay_s ({self.max_delay_s}) must be >= base_delay_s ({self.base_delay_s})")
        if problems:
            raise ValueError("RetryPolicy: " + "; ".join(problems))

    def delay(self, attempt: int) -> float:
        d = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return d * (1.0 + 0.5 * random.random())


DEFAULT_RETRY = RetryPolicy()


def scheme_of(url: str) -> str:
    """'s3', 'http', 'https', or 'file' (local paths and file:// URLs)."""
    if "://" in url:
        return url.split("://", 1)[0].lower()
    return "file"


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def split_s3(url: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 url {url!r} has no bucket")
    return bucket, key


def join_url(base: str, name: str) -> str:
    """Join a relative name onto a directory-like URL or path; absolute names are returned as they are."""
    if "://" in name or name.startswith("/"):
        return name
    if scheme_of(base) == "file":
        return os.path.join(local_path(base), name)
    return base.rstrip("/") + "/" + name


def dirname_url(url: str) -> str:
    if scheme_of(url) == "file":
        return os.path.dirname(local_path(url)) or "."
    return url.rsplit("/", 1)[0]


# --- S3 client ------------------------------------------------------------------------------------------

_S3_CLIENT = None
_S3_PID = None


def s3_client():
    """One boto3 client per process (clients are not fork-safe, so a forked worker makes its own)."""
    global _S3_CLIENT, _S3_PID
    if _S3_CLIENT is None or _S3_PID != os.getpid():
        import boto3
        from botocore.config import Config

        # botocore's own retries are off: ours name the object and also cover mid-stream breaks.
        cfg = Config(retries={"max_attempts": 1, "mode": "standard"}, max_pool_connections=32)
        _S3_CLIENT = boto3.session.Session().client("s3", config=cfg)
        _S3_PID = os.getpid()
    return _S3_CLIENT


def reset_s3_client() -> None:
    """Forget the cached client (tests change AWS_ENDPOINT_URL between sessions)."""
    global _S3_CLIENT
    _S3_CLIENT = None


def _is_permanent(exc: BaseException) -> bool:
    """Errors that retrying cannot fix: missing objects, bad credentials, bad requests."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (400, 401, 403, 404, 416)
    code = getattr(exc, "response", {}) if hasattr(exc, "response") else {}
    if isinstance(code, dict):
        err = code.get("Error", {}).get("Code", "")
        status = code.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if err in ("NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "404", "403") or status in (
            403,
            404,
        ):
            return True
    return False


def with_retries(what: str, fn: Callable, policy: RetryPolicy = DEFAULT_RETRY):
    """Call fn(); retry transient errors with backoff; raise StorageError naming `what` at the end."""
    last: BaseException | None = None
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            last = exc
            if _is_permanent(exc):
                break
            if attempt + 1 < policy.attempts:
                d = policy.delay(attempt)
                log.warning("storage: %s failed (%s: %s); retry %d in %.2fs", what, type(exc).__name__, exc, attempt + 1, d)
                time.sleep(d)
    raise StorageError(f"{what}: {type(last).__name__}: {last}") from last


# --- Reading ------------------------------------------------------------------------------------------


class _ResumingReader(io.RawIOBase):
    """A read-only stream over a remote object that reopens at the current offset when a read fails.

    opener(offset) returns a file-like positioned at `offset` (an HTTP Range request).
    """

    def __init__(self, url: str, opener: Callable[[int], object], policy: RetryPolicy):
        self.url, self._opener, self._policy = url, opener, policy
        self._pos = 0
        self._body = with_retries(f"open {url}", lambda: opener(0), policy)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        for attempt in range(self._policy.attempts):
            try:
                data = self._body.read(len(b))
                n = len(data)
                b[:n] = data
                self._pos += n
                return n
            except Exception as exc:  # noqa: BLE001
                if attempt + 1 >= self._policy.attempts or _is_permanent(exc):
                    raise StorageError(f"read {self.url} at byte {self._pos}: {type(exc).__name__}: {exc}") from exc
                d = self._policy.delay(attempt)
                log.warning("storage: read %s at byte %d failed (%s); reopening in %.2fs", self.url, self._pos, exc, d)
                time.sleep(d)
                try:
                    self._body.close()
                except Exception:  # noqa: BLE001 - the old body is already broken
                    pass
                pos = self._pos
                self._body = with_retries(f"reopen {self.url}", lambda: self._opener(pos), self._policy)
        return 0  # unreachable

    def close(self) -> None:
        try:
            self._body.close()
        finally:
            super().close()


def _s3_opener(url: str):
    bucket, key = split_s3(url)

    def open_at(offset: int):
        kw = {"Bucket": bucket, "Key": key}
        if offset:
            kw["Range"] = f"bytes={offset}-"
        return s3_client().get_object(**kw)["Body"]

    return open_at


def _http_opener(url: str):
    def open_at(offset: int):
        req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        return urllib.request.urlopen(req, timeout=60)

    return open_at


def open_url(url: str, policy: RetryPolicy = DEFAULT_RETRY, bufsize: int = 1 << 20) -> io.BufferedIOBase:
    """Open a local path, file://, s3:// or http(s):// URL for streaming binary reading."""
    s = scheme_of(url)
    if s == "file":
        return with_retries(f"open {url}", lambda: open(local_path(url), "rb", buffering=bufsize), policy)
    if s == "s3":
        return io.BufferedReader(_ResumingReader(url, _s3_opener(url), policy), buffer_size=bufsize)
    if s in ("http", "https"):
        return io.BufferedReader(_ResumingReader(url, _http_opener(url), policy), buffer_size=bufsize)
    raise ValueError(f"unsupported url scheme {s!r} in {url!r} (expected a path, file://, s3:// or http(s)://)")


def read_bytes(url: str, policy: RetryPolicy = DEFAULT_RETRY) -> bytes:
    """Whole object as bytes (small objects: manifests)."""

    def go():
        with open_url(url, policy) as f:
            return f.read()

    return with_retries(f"read {url}", go, policy)


# --- Writing / metadata -----------------------------------------------------------------------------------


def put_file(local: str, url: str, policy: RetryPolicy = DEFAULT_RETRY) -> None:
    """Copy a finished local file to `url` (upload for s3://, atomic rename-in-place for local)."""
    s = scheme_of(url)
    if s == "file":
        dst = local_path(url)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        tmp = dst + ".partial"
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)  # readers never see a half-written shard
        return
    if s == "s3":
        bucket, key = split_s3(url)
        with_retries(f"upload {url}", lambda: s3_client().upload_file(local, bucket, key), policy)
        return
    raise ValueError(f"cannot write to {url!r}: only local paths and s3:// are writable")


def write_bytes(url: str, data: bytes, policy: RetryPolicy = DEFAULT_RETRY) -> None:
    s = scheme_of(url)
    if s == "file":
        dst = local_path(url)
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        tmp = dst + ".partial"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dst)
        return
    if s == "s3":
        bucket, key = split_s3(url)
        with_retries(f"write {url}", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data), policy)
        return
    raise ValueError(f"cannot write to {url!r}: only local paths and s3:// are writable")


def size_of(url: str, policy: RetryPolicy = DEFAULT_RETRY) -> int | None:
    """Object size in bytes, or None if it does not exist."""
    s = scheme_of(url)
    if s == "file":
        p = local_path(url)
        return os.path.getsize(p) if os.path.exists(p) else None
    if s == "s3":
        bucket, key = split_s3(url)

        def head():
            try:
                return s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
            except Exception as exc:  # noqa: BLE001
                if _is_permanent(exc):
                    return None
                raise

        return with_retries(f"stat {url}", head, policy)
    if s in ("http", "https"):

        def head_http():
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
                    return int(r.headers.get("Content-Length", 0))
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                raise

        return with_retries(f"stat {url}", head_http, policy)
    raise ValueError(f"unsupported url scheme in {url!r}")


def exists(url: str) -> bool:
    return size_of(url) is not None


def ensure_bucket(url: str) -> None:
    """Create the bucket of an s3:// URL if missing (convenient for local S3 servers; no-op otherwise)."""
    if scheme_of(url) != "s3":
        return
    bucket, _ = split_s3(url)
    c = s3_client()
    try:
        c.head_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - create below; a real permission problem surfaces there
        c.create_bucket(Bucket=bucket)


def register_webdataset_schemes() -> None:
    """Let plain ``webdataset.WebDataset("s3://...")`` use this module's streaming reader too."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")

    def gopen_s3(url, mode="rb", bufsize=8192, **kw):
        if mode[0] != "r":
            raise ValueError(f"{url}: only reading is supported")
        return open_url(url)

    gopen.gopen_schemes["s3"] = gopen_s3


def iter_chunks(f, size: int = 1 << 20) -> Iterator[bytes]:
    while True:
        b = f.read(size)
        if not b:
            return
        yield b
