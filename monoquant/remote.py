"""Checkpoints in object storage, read by byte ranges: no local copy of the input.

``s3://bucket/model/`` (and whatever else fsspec serves: ``gs://`` with gcsfs, ``hf://`` with
huggingface_hub, ``https://`` from servers that honour range requests) opens like a local
checkpoint directory or file: :func:`monoquant.reader.open_checkpoint` turns such a URL into a
:class:`RemotePath`, which answers the few questions the reader asks of a path (listing, size,
small reads), and :class:`RangeReader` serves tensor rows from a bounded read-ahead window of
byte-range requests. Nothing of the input is written to local disk.

Needs the ``remote`` extra (``pip install 'monoquant[remote]'``: fsspec and s3fs); without it a
remote URL fails with one line saying so. Credentials come the usual way for each backend (for
S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, instance
roles) and never appear in messages, plans or outputs: every URL shown goes through
:func:`scrub`.

Failures: transient ones (connection reset, timeout, throttling) are retried with exponential
back-off (:func:`with_retries`); permanent ones (missing object, access denied, object changed
while read, object shorter than its header says) become one :class:`CheckpointError` line naming
the object. Each object's identity (size and ETag, or the backend's equivalent) is taken when the
checkpoint is opened; reads are pinned to it (S3 sends ``If-Match``), and :func:`pin_inputs`
records it in the job state so that a resumed run never mixes two versions of the input.

Example:
    >>> scrub("https://user:secret@host.example/m/model.safetensors?X-Amz-Signature=abc")
    'https://host.example/m/model.safetensors'
    >>> is_remote("s3://bucket/model/"), is_remote("ckpt/"), is_remote("file:///tmp/x")
    (True, False, False)
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .errors import CheckpointError, OutputError, PlanMismatchError

T = TypeVar("T")

EXTRA_HINT = "pip install 'monoquant[remote]'"
#: bytes per range request of the read-ahead window (env ``MONOQUANT_REMOTE_CHUNK``)
CHUNK_BYTES = 8 << 20
#: chunks requested ahead of the reader, concurrently (env ``MONOQUANT_REMOTE_AHEAD``)
AHEAD_CHUNKS = 4
#: attempts per request before a transient error is final (env ``MONOQUANT_REMOTE_RETRIES``)
RETRIES = 5
BACKOFF_S = 0.5
BACKOFF_MAX_S = 8.0
IDENTITY_FILE = "inputs.json"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


# ---- URLs ---------------------------------------------------------------------------------------
def is_remote(path: object) -> bool:
    """True for a URL monoquant reads through fsspec (any ``scheme://`` except ``file://``)."""
    if isinstance(path, RemotePath):
        return True
    if not isinstance(path, str):
        return False  # a pathlib.Path is always local
    m = _SCHEME.match(path)
    return m is not None and m.group(1).lower() not in ("file", "local")


def scrub(url: str) -> str:
    """``url`` without user info, query string and fragment (where tokens and signatures live).

    >>> scrub("s3://bucket/model/x.safetensors")
    's3://bucket/model/x.safetensors'
    >>> scrub("hf://user:hf_TOKEN@org/repo/model.safetensors")
    'hf://org/repo/model.safetensors'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<url>"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def scrub_text(text: str) -> str:
    """Every URL inside ``text`` scrubbed (for library error texts quoted in a message)."""
    return _URL_IN_TEXT.sub(lambda m: scrub(m.group(0)), text)


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise CheckpointError(f"{name}={raw!r}: expected an integer") from None
    if v < minimum:
        raise CheckpointError(f"{name}={raw!r}: must be at least {minimum}")
    return v


# ---- errors and retries -----------------------------------------------------------------------------
def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = scrub_text(text)[:160]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _is_changed(e: BaseException) -> bool:
    return type(e).__name__ == "FileExpired" or (
        isinstance(e, OSError) and e.errno == errno.EINVAL and "pre-condition" in str(e)
    )


def permanent_error(e: BaseException, url: str) -> CheckpointError | None:
    """The one-line error for a failure that retrying cannot fix, or ``None`` (transient)."""
    if isinstance(e, CheckpointError):
        return e
    if _is_changed(e):
        return changed_error(url)
    if isinstance(e, FileNotFoundError):
        return MissingObjectError(
            f"{url}: no such object; check the URL, and that the credentials in use may list it"
        )
    if isinstance(e, PermissionError):
        return CheckpointError(
            f"{url}: access denied; check the credentials for this backend (for S3: AWS_ACCESS_KEY_ID / "
            "AWS_PROFILE, AWS_ENDPOINT_URL) and that they may read the object"
        )
    if isinstance(e, (ValueError, TypeError, NotImplementedError, KeyError, AttributeError)):
        return CheckpointError(f"{url}: cannot read ({_reason(e)})")
    return None


def with_retries(fn: Callable[[], T], url: str, *, sleep: Callable[[float], None] | None = None) -> T:
    """Call ``fn``; retry transient failures with exponential back-off (0.5 s, 1 s, 2 s, ... up to
    8 s, ``MONOQUANT_REMOTE_RETRIES`` attempts in all); raise one :class:`CheckpointError` naming
    ``url`` on a permanent failure or when the attempts run out.

    >>> calls = []
    >>> def flaky():
    ...     calls.append(1)
    ...     if len(calls) < 3:
    ...         raise ConnectionResetError("reset by peer")
    ...     return b"ok"
    >>> with_retries(flaky, "s3://b/k", sleep=lambda s: None), len(calls)
    (b'ok', 3)
    """
    attempts = _env_int("MONOQUANT_REMOTE_RETRIES", RETRIES, 1)
    delay = BACKOFF_S
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            final = permanent_error(e, url)
            if final is not None:
                raise final from None
            if attempt == attempts:
                raise CheckpointError(
                    f"{url}: cannot read after {attempts} attempts ({_reason(e)}); check the network and the "
                    "endpoint, then rerun the same command to resume"
                ) from None
            (sleep or time.sleep)(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
    raise AssertionError("unreachable")  # pragma: no cover


# ---- the file system of a URL -----------------------------------------------------------------------
def _filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec file system, path within it)`` for ``url``; one clear line when the extra (or the
    backend's package) is missing."""
    shown = scrub(url)
    try:
        import fsspec
    except ImportError:
        raise CheckpointError(
            f"{shown}: reading from object storage needs the remote extra: {EXTRA_HINT}"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise CheckpointError(
            f"{shown}: this backend needs a package that is not installed ({_reason(e)}); {EXTRA_HINT} "
            "covers "
            "s3://, add gcsfs for gs:// or huggingface_hub for hf://"
        ) from None
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{shown}: not a URL fsspec can open ({_reason(e)})") from None
    except Exception as e:
        raise permanent_error(e, shown) or CheckpointError(f"{shown}: cannot open ({_reason(e)})") from None
    with contextlib.suppress(Exception):
        fs.invalidate_cache()  # listings and sizes as they are now, not as cached by an earlier call
    return fs, path


class MissingObjectError(CheckpointError):
    """A remote object or prefix does not exist."""


def changed_error(url: str) -> CheckpointError:
    return CheckpointError(
        f"{url}: the object changed while it was being read (its ETag differs from the one planned with); "
        "rerun with --restart once the upload is finished"
    )


class _Stat(NamedTuple):
    st_size: int


def identity_of(info: dict[str, Any]) -> str | None:
    """The version tag of an object's listing entry: ETag (S3, HTTP), generation (GCS), blob id
    (Hugging Face), ...; ``None`` when the backend gives none (then size alone identifies it)."""
    for key in (
        "ETag",
        "etag",
        "generation",
        "blob_id",
        "md5Hash",
        "VersionId",
        "mtime",
        "LastModified",
        "last_modified",
    ):
        v = info.get(key)
        if v not in (None, ""):
            return str(v)
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and lfs.get("sha256"):
        return str(lfs["sha256"])
    return None


class RemotePath:
    """A file or "directory" (prefix) in object storage, with the subset of :class:`pathlib.Path`
    that opening a checkpoint uses (``name``, ``suffix``, ``/``, ``exists``, ``is_file``, ``glob``,
    ``rglob``, ``read_text``, ``stat``, ``open``). ``str()`` is the scrubbed URL.

    Example:
        >>> p = RemotePath.from_url("s3://bucket/model/")                         # doctest: +SKIP
        >>> [c.name for c in p.glob("*.safetensors")]                               # doctest: +SKIP
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """

    __slots__ = ("_info", "fs", "path")

    def __init__(self, fs: Any, path: str, info: dict[str, Any] | None = None):
        self.fs = fs
        self.path = path.rstrip("/") or path
        self._info = info

    @classmethod
    def from_url(cls, url: str | os.PathLike[str]) -> RemotePath:
        fs, path = _filesystem(str(url))
        return cls(fs, path)

    # -- naming
    @property
    def url(self) -> str:
        return scrub(self.fs.unstrip_protocol(self.path))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.fs is self.fs and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __lt__(self, other: RemotePath) -> bool:
        return self.path < other.path

    @property
    def _key(self) -> str:
        return self.path.split("?", 1)[0].split("#", 1)[0].rstrip("/")

    @property
    def name(self) -> str:
        return self._key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> RemotePath:
        head = self._key.rsplit("/", 1)[0] if "/" in self._key else self._key
        return RemotePath(self.fs, head)

    def __truediv__(self, name: str) -> RemotePath:
        if name.startswith("/") or ".." in name.split("/") or "://" in name:
            raise CheckpointError(
                f"{self}: {name!r} points outside the checkpoint; the index is corrupt or malicious"
            )
        return RemotePath(self.fs, f"{self._key}/{name}")

    def relative_to(self, other: RemotePath) -> PurePosixPath:
        base = other._key + "/"
        if not self._key.startswith(base):
            raise ValueError(f"{self} is not inside {other}")
        return PurePosixPath(self._key[len(base) :])

    # -- metadata
    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = with_retries(lambda: self.fs.info(self.path), self.url)
        return self._info

    def exists(self) -> bool:
        try:
            self.info()
        except MissingObjectError:
            return False
        return True

    def is_file(self) -> bool:
        return self.exists() and self.info().get("type") == "file"

    def is_dir(self) -> bool:
        return self.exists() and self.info().get("type") == "directory"

    @property
    def size(self) -> int:
        return int(self.info().get("size") or 0)

    @property
    def etag(self) -> str | None:
        return identity_of(self.info())

    def stat(self) -> _Stat:
        return _Stat(self.size)

    def iterdir(self) -> Iterator[RemotePath]:
        entries = with_retries(lambda: self.fs.ls(self.path, detail=True), self.url)
        for d in sorted(entries, key=lambda d: d["name"]):
            name = str(d["name"]).rstrip("/")
            if name != self.path:
                yield RemotePath(self.fs, name, d)

    def glob(self, pattern: str) -> list[RemotePath]:
        """Direct children whose name matches ``pattern`` (no ``/`` in patterns)."""
        return [p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)]

    def rglob(self, pattern: str) -> list[RemotePath]:
        """Every object below this prefix whose name matches ``pattern``."""
        found = with_retries(lambda: self.fs.find(self.path, withdirs=False, detail=True), self.url)
        return sorted(
            RemotePath(self.fs, str(d["name"]), d)
            for d in found.values()
            if fnmatch.fnmatchcase(str(d["name"]).rsplit("/", 1)[-1], pattern)
        )

    # -- small reads
    def read_range(self, start: int, stop: int) -> bytes:
        """Bytes ``[start, stop)`` of the object (one request, retried)."""
        if stop <= start:
            return b""
        data = with_retries(lambda: self.fs.cat_file(self.path, start=start, end=stop), self.url)
        if len(data) != stop - start:
            raise CheckpointError(
                f"{self.url}: got {len(data)} of bytes {start}..{stop}; the object is truncated or changed"
            )
        return data

    def read_bytes(self) -> bytes:
        return self.read_range(0, self.size)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb") -> _ObjectFile:
        if mode != "rb":
            raise OutputError(f"{self}: monoquant never writes to the input")
        return _ObjectFile(self)


class _ObjectFile:
    """A read-only, sequential file over an object, one range request per ``read`` (for headers
    and side files: ``shutil.copyfileobj`` copies in bounded pieces)."""

    def __init__(self, rp: RemotePath):
        self.rp, self.pos = rp, 0

    def read(self, n: int = -1) -> bytes:
        end = self.rp.size if n is None or n < 0 else min(self.pos + n, self.rp.size)
        data = self.rp.read_range(self.pos, end)
        self.pos = end
        return data

    def __enter__(self) -> _ObjectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def copy_file(src: Path | RemotePath, dst: Path) -> None:
    """Copy a side file (local or remote) to local ``dst`` in pieces of 1 MiB."""
    import shutil

    if not isinstance(src, RemotePath):
        shutil.copyfile(src, dst)
        return
    with src.open("rb") as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)


# ---- tensor data: bounded read-ahead ----------------------------------------------------------------
class RangeReader:
    """Byte ranges of one object, served from a window of fixed-size chunks fetched ahead of the
    reader, concurrently: at most ``(chunks spanned by one read + ahead)`` chunks are held, so
    memory stays bounded whatever the object's size (defaults: 8 MiB chunks, 4 ahead).

    Every request is pinned to the identity taken when the checkpoint was opened (S3 sends
    ``If-Match: <ETag>``); a changed object fails with one line instead of mixing versions.

    Example:
        >>> rd = RangeReader(RemotePath.from_url("s3://bucket/m/model.safetensors"))  # doctest: +SKIP
        >>> buf = bytearray(16); rd.read_into(memoryview(buf), 0); rd.close()       # doctest: +SKIP
    """

    def __init__(self, rp: RemotePath, chunk: int | None = None, ahead: int | None = None):
        self.rp = rp
        self.size = rp.size
        self.pinned = rp.etag
        self.chunk = chunk or _env_int("MONOQUANT_REMOTE_CHUNK", CHUNK_BYTES, 4096)
        self.ahead = ahead if ahead is not None else _env_int("MONOQUANT_REMOTE_AHEAD", AHEAD_CHUNKS, 0)
        self._pool = ThreadPoolExecutor(max_workers=max(self.ahead, 1), thread_name_prefix="monoquant-fetch")
        self._chunks: dict[int, Future[bytes]] = {}
        self._local = threading.local()
        self._files: list[Any] = []
        self._flock = threading.Lock()
        self.requests = 0

    def _file(self) -> Any:
        f = getattr(self._local, "f", None)
        if f is None:
            f = with_retries(
                lambda: self.rp.fs.open(self.rp.path, "rb", cache_type="none", block_size=self.chunk),
                self.rp.url,
            )
            seen = identity_of(getattr(f, "details", None) or {})
            if self.pinned is not None and seen is not None and seen != self.pinned:
                f.close()
                raise changed_error(self.rp.url)
            self._local.f = f
            with self._flock:
                self._files.append(f)
        return f

    def _fetch(self, k: int) -> bytes:
        start = k * self.chunk
        stop = min(start + self.chunk, self.size)

        def once() -> bytes:
            f = self._file()
            f.seek(start)
            return f.read(stop - start)

        data = with_retries(once, self.rp.url)
        with self._flock:
            self.requests += 1
        if len(data) != stop - start:
            raise CheckpointError(
                f"{self.rp.url}: got {len(data)} of {stop - start} bytes at offset {start}; the object is "
                "truncated "
                "or was replaced while being read; rerun with --restart once it is complete"
            )
        return data

    def _get(self, k: int) -> Future[bytes]:
        fut = self._chunks.get(k)
        if fut is None:
            fut = self._chunks[k] = self._pool.submit(self._fetch, k)
        return fut

    def read_into(self, out: memoryview, offset: int) -> None:
        """Fill ``out`` with the object's bytes from ``offset`` on."""
        n = len(out)
        end = offset + n
        if n == 0:
            return
        if offset < 0 or end > self.size:
            raise CheckpointError(
                f"{self.rp.url}: bytes {offset}..{end} lie beyond the end of the object ({self.size} bytes); "
                "it is truncated"
            )
        first, last = offset // self.chunk, (end - 1) // self.chunk
        n_chunks = -(-self.size // self.chunk)
        horizon = min(last + self.ahead, n_chunks - 1)
        for k in list(self._chunks):
            if k < first or k > horizon:
                self._chunks.pop(k).cancel()
        for k in range(first, horizon + 1):
            self._get(k)
        pos = 0
        for k in range(first, last + 1):
            data = memoryview(self._chunks[k].result())
            lo = max(offset, k * self.chunk) - k * self.chunk
            hi = min(end, (k + 1) * self.chunk) - k * self.chunk
            out[pos : pos + hi - lo] = data[lo:hi]
            pos += hi - lo

    def close(self) -> None:
        for fut in self._chunks.values():
            fut.cancel()
        self._chunks.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for f in self._files:
            with contextlib.suppress(Exception):
                f.close()
        self._files.clear()


# ---- output and job state -----------------------------------------------------------------------------
def refuse_remote_output(dst: object) -> None:
    """monoquant writes its output locally (it is several times smaller than the input)."""
    if isinstance(dst, str) and is_remote(dst):
        raise OutputError(
            f"{scrub(dst)}: the output must be a local directory; write it locally and upload it afterwards "
            "(see docs/remote.md)"
        )


def input_identity(files: list[Any]) -> dict[str, list[Any]]:
    """``{url: [size, etag]}`` of the remote weight files of a checkpoint (empty for local input)."""
    return {str(f): [f.size, f.etag] for f in files if isinstance(f, RemotePath)}


def pin_inputs(state_dir: Path, files: list[Any]) -> None:
    """Record the remote input's identity in the job state, or check it against the one recorded by
    an earlier (interrupted) run: a rerun must not finish a job from a different version of the input.

    Raises:
        PlanMismatchError: an object changed since the earlier run (names it; ``--restart``).
    """
    ident = input_identity(files)
    if not ident:
        return
    path = state_dir / IDENTITY_FILE
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict):
        for url, now in ident.items():
            was = old.get(url)
            if was is not None and was != now:
                raise PlanMismatchError(
                    f"{url}: changed since the interrupted run started (size/ETag {was[0]}/{was[1]} -> "
                    f"{now[0]}/{now[1]}); add --restart to quantize the new version from the start"
                )
        if all(url in old for url in ident):
            return
    from .atomicfile import atomic_write

    atomic_write(path, (json.dumps(ident, indent=1, sort_keys=True) + "\n").encode(), state_dir)
