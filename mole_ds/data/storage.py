"""Object-storage access: open, write, list and stat local paths, ``s3://`` and ``http(s)://`` URLs.

Reads stream: an S3 object is read from boto3 ``get_object``'s streaming body (no download to disk), an
HTTP object from urllib's response.

Errors are classified once, here (:func:`classify`):

* transient: connection refused/reset/closed, timeouts, incomplete reads, HTTP 408/429/5xx, S3 throttling
  (SlowDown, ...) and internal errors.  Retried with capped exponential backoff (jittered) until
  ``RetryPolicy.timeout_s`` (``data.storage_timeout_s``) has passed since the first failure of the operation;
  each wait is one line on stderr naming the object.  Then :class:`StorageError` names the object, how long it
  was unreachable and the last cause.
* permanent: missing or bad credentials, 400/401/403/404/412/416, NoSuchBucket/NoSuchKey/AccessDenied, a
  missing local file, anything unrecognised.  :class:`StorageError` at once, no retry.

There is exactly one retry layer: botocore's own retries are off, and a read that breaks mid-stream is resumed
by the same reader with a Range request from the byte already reached (S3: ``IfMatch`` on the first ETag, so
an object replaced meanwhile is a permanent error, never a spliced stream).  Socket timeouts scale with the
policy (a fifth of ``timeout_s``, between 2 and 60 s for reads) so that a hung server is noticed in time.

S3 endpoint and credentials come from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), which boto3 honours on its own.
"""

from __future__ import annotations

import errno
import http.client
import io
import os
import random
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


class StorageError(IOError):
    """An object could not be read or written; the message names the object and the cause.

    permanent: True for errors that no retry can fix (credentials, missing object), False when transient errors
    lasted past the policy's timeout.
    """

    def __init__(self, message: str, *, url: str | None = None, permanent: bool = False):
        super().__init__(message)
        self.url, self.permanent = url, permanent


@dataclass(frozen=True)
class RetryPolicy:
    """How transient storage errors are retried (one policy per loader; see the module docstring).

    timeout_s: total time transient errors of one operation are retried, from its first failure (a success
        starts the clock again).
    base_delay_s: first backoff; doubles each retry, with up to 50% random jitter.
    max_delay_s: cap on one backoff.
    connect_timeout_s / read_timeout_s: socket timeouts of one request; None = derived from timeout_s
        (connect: a tenth, 1-10 s; read: a fifth, 2-60 s).
    """

    timeout_s: float = 600.0
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    connect_timeout_s: float | None = None
    read_timeout_s: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.timeout_s > 0:
            problems.append(f"timeout_s ({self.timeout_s}) must be > 0")
        if self.base_delay_s < 0:
            problems.append(f"base_delay_s ({self.base_delay_s}) must be >= 0")
        if self.max_delay_s < self.base_delay_s:
            problems.append(f"max_delay_s ({self.max_delay_s}) must be >= base_delay_s ({self.base_delay_s})")
        for name in ("connect_timeout_s", "read_timeout_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                problems.append(f"{name} ({v}) must be > 0")
        if problems:
            raise ValueError("RetryPolicy: " + "; ".join(problems))

    def delay(self, attempt: int) -> float:
        d = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return d * (1.0 + 0.5 * random.random())

    @property
    def connect_timeout(self) -> float:
        return self.connect_timeout_s or min(10.0, max(1.0, self.timeout_s / 10))

    @property
    def read_timeout(self) -> float:
        return self.read_timeout_s or min(60.0, max(2.0, self.timeout_s / 5))


DEFAULT_RETRY = RetryPolicy()


# --- Classification -----------------------------------------------------------------------------------------

TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "PriorRequestNotComplete", "500", "502", "503", "504",
})
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                               errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
                               errno.ENETRESET, errno.EPIPE})


def _botocore_kind(exc: BaseException) -> str | None:
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {}) or {}
        status = (exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0) or 0
        code = str(err.get("Code", ""))
        if code in TRANSIENT_S3_CODES or status >= 500 or status in (408, 429):
            return "transient"
        return "permanent"
    if isinstance(exc, (bx.HTTPClientError, bx.IncompleteReadError, bx.ResponseStreamingError)):
        return "transient"  # EndpointConnectionError, ConnectionClosedError, Read/ConnectTimeoutError, ...
    if isinstance(exc, bx.BotoCoreError):
        return "permanent"  # NoCredentialsError, ParamValidationError, NoRegionError, ...
    return None


def classify(exc: BaseException) -> str:
    """'transient' or 'permanent' (see the module docstring); unrecognised errors are permanent."""
    kind = _botocore_kind(exc)
    if kind:
        return kind
    try:
        import urllib3.exceptions as ux

        if isinstance(exc, (ux.ProtocolError, ux.TimeoutError, ux.NewConnectionError, ux.IncompleteRead)):
            return "transient"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(exc, urllib.error.HTTPError):
        return "transient" if exc.code >= 500 or exc.code in (408, 429) else "permanent"
    if isinstance(exc, urllib.error.URLError):
        return classify(exc.reason) if isinstance(exc.reason, BaseException) else "permanent"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return "permanent"
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, http.client.IncompleteRead,
                        http.client.RemoteDisconnected, http.client.BadStatusLine)):
        return "transient"
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return "transient"
    return "permanent"


def describe_error(exc: BaseException) -> str:
    """'ClassName: message' plus a hint for credential errors."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if any(k in low for k in ("credential", "accesskey", "access key", "signature", "accessdenied", "forbidden",
                              "(403)", "token")):
        text += " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and AWS_ENDPOINT_URL)"
    return text


def _say(line: str) -> None:
    print(f"mole_ds.data.storage: {line}", file=sys.stderr, flush=True)


class Retrier:
    """The single retry loop: call :meth:`failed` from an ``except`` (it sleeps, or raises StorageError) and
    :meth:`ok` after a success (which restarts the timeout window)."""

    def __init__(self, what: str, url: str | None, policy: RetryPolicy):
        self.what, self.url, self.policy = what, url, policy
        self.first_failure: float | None = None
        self.attempt = 0

    def ok(self) -> None:
        self.first_failure, self.attempt = None, 0

    def failed(self, exc: BaseException, where: str = "") -> None:
        what = self.what + (f" {where}" if where else "")
        if isinstance(exc, StorageError):
            raise exc
        if classify(exc) == "permanent":
            raise StorageError(f"{what}: {describe_error(exc)} (permanent error, not retried)", url=self.url,
                               permanent=True) from exc
        now = time.monotonic()
        if self.first_failure is None:
            self.first_failure = now
        elapsed = now - self.first_failure
        left = self.policy.timeout_s - elapsed
        if left <= 0:
            raise StorageError(f"{what}: storage unreachable for {elapsed:.1f} s ({self.attempt + 1} attempts; "
                               f"storage_timeout_s {self.policy.timeout_s:g}); last error: {describe_error(exc)}",
                               url=self.url) from exc
        d = min(self.policy.delay(self.attempt), left)
        self.attempt += 1
        _say(f"{what}: {describe_error(exc)}; retry {self.attempt} in {d:.1f} s "
             f"(failing for {elapsed:.0f} of {self.policy.timeout_s:g} s)")
        time.sleep(d)


def call_with_retry(what: str, fn: Callable, policy: RetryPolicy = DEFAULT_RETRY, url: str | None = None):
    """fn() with transient errors retried per policy; StorageError (naming `what`) when it gives up."""
    r = Retrier(what, url, policy)
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified by Retrier
            r.failed(exc)


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

_S3_CLIENTS: dict = {}


def s3_client(policy: RetryPolicy = DEFAULT_RETRY):
    """One boto3 client per (process, socket timeouts): clients are not fork-safe, so a forked worker makes
    its own.  botocore's own retries are off: :class:`Retrier` is the only retry layer."""
    key = (os.getpid(), policy.connect_timeout, policy.read_timeout)
    c = _S3_CLIENTS.get(key)
    if c is None:
        import boto3
        from botocore.config import Config

        cfg = Config(retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=32,
                     connect_timeout=policy.connect_timeout, read_timeout=policy.read_timeout)
        c = _S3_CLIENTS[key] = boto3.session.Session().client("s3", config=cfg)
    return c


def reset_s3_client() -> None:
    """Forget cached clients (tests change AWS_ENDPOINT_URL between sessions)."""
    _S3_CLIENTS.clear()


# --- Reading ------------------------------------------------------------------------------------------


class _ResumingReader(io.RawIOBase):
    """A read-only stream over a remote object that reopens at the current offset when a read fails.

    opener(offset) returns a file-like positioned at `offset` (an HTTP Range request).  Opening and reading
    share one :class:`Retrier`, so an outage is timed from its first failure whatever step hits it.
    """

    def __init__(self, url: str, opener: Callable[[int], object], policy: RetryPolicy):
        self.url, self._opener = url, opener
        self._pos = 0
        self._retry = Retrier(f"read {url}", url, policy)
        self._body = None
        while self._body is None:
            try:
                self._body = opener(0)
            except Exception as exc:  # noqa: BLE001 - classified by Retrier
                self._retry.failed(exc)
        self._retry.ok()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while True:
            try:
                if self._body is None:
                    self._body = self._opener(self._pos)
                data = self._body.read(len(b))
            except Exception as exc:  # noqa: BLE001 - classified by Retrier
                self._drop_body()
                self._retry.failed(exc, f"at byte {self._pos}")
                continue
            self._retry.ok()
            n = len(data)
            b[:n] = data
            self._pos += n
            return n

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - the old body is already broken
                pass

    def close(self) -> None:
        try:
            self._drop_body()
        finally:
            super().close()


def _s3_opener(url: str, policy: RetryPolicy):
    bucket, key = split_s3(url)
    etag: list[str] = []

    def open_at(offset: int):
        kw = {"Bucket": bucket, "Key": key}
        if offset:
            kw["Range"] = f"bytes={offset}-"
        if etag:
            kw["IfMatch"] = etag[0]  # the same object version as the bytes already read
        resp = s3_client(policy).get_object(**kw)
        if not etag and resp.get("ETag"):
            etag.append(resp["ETag"])
        return resp["Body"]

    return open_at


def _http_opener(url: str, policy: RetryPolicy):
    def open_at(offset: int):
        req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        resp = urllib.request.urlopen(req, timeout=policy.read_timeout)
        if offset and getattr(resp, "status", 206) == 200:  # the server ignored Range: skip what we have
            left = offset
            while left:
                chunk = resp.read(min(left, 1 << 20))
                if not chunk:
                    raise http.client.IncompleteRead(b"", left)
                left -= len(chunk)
        return resp

    return open_at


def open_url(url: str, policy: RetryPolicy = DEFAULT_RETRY, bufsize: int = 1 << 20) -> io.BufferedIOBase:
    """Open a local path, file://, s3:// or http(s):// URL for streaming binary reading.

    Raises StorageError (naming the URL and the cause) at once for permanent errors, after policy.timeout_s
    for transient ones.
    """
    s = scheme_of(url)
    if s == "file":
        return call_with_retry(f"open {url}", lambda: open(local_path(url), "rb", buffering=bufsize), policy, url)
    if s == "s3":
        return io.BufferedReader(_ResumingReader(url, _s3_opener(url, policy), policy), buffer_size=bufsize)
    if s in ("http", "https"):
        return io.BufferedReader(_ResumingReader(url, _http_opener(url, policy), policy), buffer_size=bufsize)
    raise ValueError(f"unsupported url scheme {s!r} in {url!r} (expected a path, file://, s3:// or http(s)://)")


def read_bytes(url: str, policy: RetryPolicy = DEFAULT_RETRY) -> bytes:
    """Whole object as bytes (small objects: manifests).  One retry layer: the reader's."""
    with open_url(url, policy) as f:
        return f.read()


# --- Writing / metadata -----------------------------------------------------------------------------------


def _replace_local(dst: str, write) -> None:
    """Write ``dst`` through ``write(tmp)`` on a temporary name, then rename: readers never see half a file."""
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = dst + ".partial"
    write(tmp)
    os.replace(tmp, dst)


def put_file(local: str, url: str, policy: RetryPolicy = DEFAULT_RETRY) -> None:
    """Copy a finished local file to `url` (upload for s3://, atomic rename-in-place for local)."""
    s = scheme_of(url)
    if s == "file":
        _replace_local(local_path(url), lambda tmp: shutil.copyfile(local, tmp))
        return
    if s == "s3":
        bucket, key = split_s3(url)
        call_with_retry(f"upload {url}", lambda: s3_client(policy).upload_file(local, bucket, key), policy, url)
        return
    raise ValueError(f"cannot write to {url!r}: only local paths and s3:// are writable")


def write_bytes(url: str, data: bytes, policy: RetryPolicy = DEFAULT_RETRY) -> None:
    s = scheme_of(url)
    if s == "file":
        _replace_local(local_path(url), lambda tmp: Path(tmp).write_bytes(data))
        return
    if s == "s3":
        bucket, key = split_s3(url)
        call_with_retry(f"write {url}", lambda: s3_client(policy).put_object(Bucket=bucket, Key=key, Body=data),
                        policy, url)
        return
    raise ValueError(f"cannot write to {url!r}: only local paths and s3:// are writable")


def _is_not_found(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code == 404
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = str((resp.get("Error") or {}).get("Code", ""))
        status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode", 0)
        return code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound") or status == 404
    return False


def size_of(url: str, policy: RetryPolicy = DEFAULT_RETRY) -> int | None:
    """Object size in bytes, or None if it does not exist (other errors raise StorageError)."""
    s = scheme_of(url)
    if s == "file":
        p = local_path(url)
        return os.path.getsize(p) if os.path.exists(p) else None
    if s == "s3":
        bucket, key = split_s3(url)

        def head():
            try:
                return s3_client(policy).head_object(Bucket=bucket, Key=key)["ContentLength"]
            except Exception as exc:  # noqa: BLE001
                if _is_not_found(exc):
                    return None
                raise

        return call_with_retry(f"stat {url}", head, policy, url)
    if s in ("http", "https"):

        def head_http():
            try:
                req = urllib.request.Request(url, method="HEAD")
                with urllib.request.urlopen(req, timeout=policy.read_timeout) as r:
                    return int(r.headers.get("Content-Length", 0))
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    return None
                raise

        return call_with_retry(f"stat {url}", head_http, policy, url)
    raise ValueError(f"unsupported url scheme in {url!r}")


def exists(url: str, policy: RetryPolicy = DEFAULT_RETRY) -> bool:
    return size_of(url, policy) is not None


def ensure_bucket(url: str, policy: RetryPolicy = DEFAULT_RETRY) -> None:
    """Create the bucket of an s3:// URL if missing (convenient for local S3 servers; no-op otherwise)."""
    if scheme_of(url) != "s3":
        return
    bucket, _ = split_s3(url)

    def go():
        c = s3_client(policy)
        try:
            c.head_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001
            if not _is_not_found(exc):
                raise
            c.create_bucket(Bucket=bucket)

    call_with_retry(f"check bucket s3://{bucket}", go, policy, url)


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
