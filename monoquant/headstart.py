"""A head start for a cold input: ask the kernel for the checkpoint's first bytes while torch loads.

``monoquant stream`` spends its first 1.5-2.5 s importing torch, and the disk sits idle meanwhile:
on a cold input (not in the page cache, the usual case for a model larger than memory) the first
blocks are then read while the kernels wait for them. The CLI therefore starts this module's
thread *before* it imports torch (this module imports neither torch nor anything that does). The
thread finds the input files as the reader does (the shards an index names, sorted; else the
directory's ``*.safetensors``) and hands them to the kernel in the order a run reads them, with
``posix_fadvise(POSIX_FADV_WILLNEED)``: first every file's header (the run reads them all before
any data), then the files from there on, in steps of 8 MiB, until a budget is spent. The kernel
reads those ranges into the page cache in the background; the run finds them there.

It is a hint and nothing more:

* **Bounded.** The budget is at most 1 GiB, an eighth of ``MemAvailable`` and a quarter of the
  room under the cgroup's memory limit (inactive page cache counts as room; a 512 MiB cap leaves
  about 126 MiB). Page cache is reclaimable: a budget that turns out too large costs reads, never
  a failure.
* **Inside the input.** Only files the run itself would read: the index must lie inside the
  input, its shard entries pass the reader's containment rule (no absolute paths, no ``..``,
  nothing resolving outside the directory), and only regular files are opened (never a FIFO).
  An unusable index gives no head start (the run then reports it).
* **Never in the way.** Remote inputs (``s3://`` ...), ``--worker`` runs (their shards are not
  the first ones), resumed runs (a non-empty output directory: the first shards may be done),
  ``--dry-run``, mixed precision (it samples every tensor first) and ``MONOQUANT_HEADSTART=0`` get
  none. Nothing here raises or prints, and the output bytes never depend on it.

Example (two shards with 16-byte headers and 3 MiB of data each):
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"):
    ...     with open(os.path.join(d, name), "wb") as f:
    ...         _ = f.write((16).to_bytes(8, "little") + b"{}" + b" " * 14 + b"x" * (3 << 20))
    >>> [os.path.basename(p) for p in input_files(d)]
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    >>> calls = []
    >>> hs = HeadStart(input_files(d), budget=(4 << 20) + 48, step=1 << 20,
    ...                advise=lambda fd, off, n: calls.append((off, n)))
    >>> hs.start().join()
    >>> calls[:2]                   # both headers first
    [(0, 24), (0, 24)]
    >>> [n >> 20 for _, n in calls[2:]], hs.requested == (4 << 20) + 48   # then the data, in order
    ([1, 1, 1, 1], True)
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from .containment import index_entry, is_inside
from .memwatch import memory_cgroups
from .weightfiles import find_index, listed_weight_files, read_index

#: the most bytes a head start asks for
LIMIT = 1 << 30
#: bytes per request
STEP = 8 << 20
#: the most bytes asked for as one file's header
MAX_HEADER = 100 << 20
#: ``0`` (or ``off``, ``false``, ``no``) turns the head start off (benchmarks compare the two)
ENV = "MONOQUANT_HEADSTART"


def input_files(src: str | os.PathLike[str]) -> list[Path]:
    """The local safetensors files of ``src`` in the order a run reads them, as the reader
    finds them (an index first, else the directory's ``*.safetensors``); ``[]`` when there are
    none, when ``src`` is not a local path, or when the index is unusable or lies outside ``src``.
    Files the index names that are missing or resolve outside ``src`` are left out. Never raises."""
    if "://" in str(src):
        return []
    root = Path(src)
    try:
        if root.is_file():
            return [root] if root.suffix == ".safetensors" else []
        if not root.is_dir():
            return []
        index = find_index(root)
        if index is None:
            files = listed_weight_files(root)
        elif index.name.endswith(".safetensors.index.json") and index.is_file():  # never a FIFO
            wmap = read_index(root, index)["weight_map"]
            files = [index_entry(root, s, index.name) for s in sorted(set(wmap.values()))]
        else:
            return []
        if any(p.suffix != ".safetensors" for p in files):
            return []  # torch pickles: no head start
        return [p for p in files if p.is_file() and is_inside(p, root)]
    except Exception:  # a hint: whatever is wrong, the run itself reports it
        return []


def budget(limit: int = LIMIT) -> int:
    """Bytes a head start may ask for now: ``limit``, an eighth of ``MemAvailable`` and a quarter
    of the room under the cgroup's memory limit, whichever is least."""
    b = limit
    avail = _mem_available()
    if avail is not None:
        b = min(b, avail // 8)
    head = _cgroup_headroom()
    if head is not None:
        b = min(b, head // 4)
    return max(0, b)


def off() -> bool:
    """Whether ``MONOQUANT_HEADSTART`` turns the head start off (``0``, ``off``, ``false``, ``no``)."""
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no")


def begin(src: str, dst: str, *, worker: object = None, restart: bool = False) -> HeadStart | None:
    """Start a head start for a ``stream`` of ``src`` into ``dst``, or return ``None`` where it
    would not help (see the module docstring). The files and the budget are found on the thread,
    so this returns at once; it never raises."""
    try:
        if off() or worker is not None or "://" in str(src):
            return None
        if not restart and _has_entries(dst):
            return None  # a resumed job: its first shards may be done
        return HeadStart(lambda: input_files(src)).start()
    except Exception:  # e.g. no thread can be started: run without
        return None


class HeadStart:
    """A daemon thread asking for the input's first bytes: first every file's header (its
    8-byte length and the JSON it gives), then the files from there on, in order, until the
    budget is spent.

    Args:
        files: the files in reading order, or a function returning them (called on the thread).
        budget: the most bytes to ask for, over all files (default: :func:`budget`, on the thread).
        step: bytes per request.
        advise: ``(fd, offset, length)`` -> None, the request (default ``posix_fadvise``
            ``WILLNEED``); tests pass a recorder.
    """

    def __init__(
        self,
        files: list[Path] | Callable[[], list[Path]],
        budget: int | None = None,
        step: int = STEP,
        advise: Callable[[int, int, int], None] | None = None,
    ):
        self.files = files
        self.budget = budget
        self.step = max(1, int(step))
        self._advise = advise or _willneed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.requested = 0  # bytes asked for so far

    def start(self) -> HeadStart:
        self._thread = threading.Thread(target=self._run, name="monoquant-headstart", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stop(self, timeout: float = 0.0) -> None:
        """Ask no more (a request in flight ends by itself; ``timeout``: seconds to wait for it)."""
        self._stop.set()
        self.join(timeout)

    def _run(self) -> None:
        try:
            files = self.files() if callable(self.files) else list(self.files)
            left = budget() if self.budget is None else max(0, int(self.budget))
            fds = [fd for fd in map(_open_regular, files) if fd is not None]
        except Exception:
            return
        try:
            starts = []
            for fd in fds:  # the run reads every header before any data
                n = min(_header_end(fd), left)
                if n > 0 and not self._stop.is_set():
                    self._advise(fd, 0, n)
                    self.requested += n
                    left -= n
                starts.append(n)
            for fd, pos in zip(fds, starts, strict=True):
                size = os.fstat(fd).st_size
                while pos < size and left > 0 and not self._stop.is_set():
                    n = min(self.step, size - pos, left)
                    self._advise(fd, pos, n)
                    pos += n
                    left -= n
                    self.requested += n
        except Exception:
            pass
        finally:
            for fd in fds:
                os.close(fd)


def _open_regular(path: Path) -> int | None:
    """An fd of ``path`` when it is a regular file (never blocks on a FIFO), else ``None``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _header_end(fd: int) -> int:
    """Where a safetensors file's data section starts (8 + its header's length), at most the
    file's size and :data:`MAX_HEADER`."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        return size
    return min(8 + int.from_bytes(head, "little"), size, MAX_HEADER)


def _has_entries(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return any(True for _ in it)
    except OSError:
        return False


def _willneed(fd: int, offset: int, length: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except Exception:
        pass
    return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup", table: str = "/proc/self/cgroup") -> int | None:
    """The least room under a memory limit of this process's cgroup and its ancestors, cgroup v2
    (``memory.max``) or v1 (``memory/…/memory.limit_in_bytes``); ``None`` without a limit. The room
    is the limit less the usage, where inactive page cache (``inactive_file`` in ``memory.stat``)
    counts as room: the kernel reclaims it first, and a capped job that has read much has its
    usage near the limit in page cache alone."""
    try:
        best: int | None = None
        for d, top, v1 in memory_cgroups(root, table):
            room = _room(top, d, v1)
            if room is not None:
                best = room if best is None else min(best, room)
        return best
    except Exception:
        return None


def _room(top: Path, d: Path, v1: bool) -> int | None:
    limit_file, usage_file = (
        ("memory.limit_in_bytes", "memory.usage_in_bytes") if v1 else ("memory.max", "memory.current")
    )
    best: int | None = None
    while True:
        try:
            limit = (d / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # v1 says "no limit" with a huge number
                used = int((d / usage_file).read_text()) - _inactive_file(d / "memory.stat", v1)
                room = max(0, int(limit) - used)
                best = room if best is None else min(best, room)
        except (OSError, ValueError):
            pass
        if d == top or top not in d.parents:
            return best
        d = d.parent


def _inactive_file(stat_file: Path, v1: bool) -> int:
    key = "total_inactive_file" if v1 else "inactive_file"
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
