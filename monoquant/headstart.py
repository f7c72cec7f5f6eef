"""A head start for a cold input: ask the kernel for the checkpoint's first bytes while torch loads.

``monoquant stream`` spends its first 1.5-2.5 s importing torch, and the disk sits idle meanwhile:
on a cold input (not in the page cache, the usual case for a model larger than memory) the first
blocks are then read while the kernels wait for them. The CLI therefore starts this module's
thread *before* it imports torch (this module imports neither torch nor anything that does). The
thread hands the input files to the kernel in the order a run reads them (the shards named by the
index, sorted as the reader sorts them, each from its first byte) with
``posix_fadvise(POSIX_FADV_WILLNEED)``, in steps of 8 MiB, until a budget is spent. The kernel
reads those ranges into the page cache in the background; the run finds them there.

It is a hint and nothing more:

* **Bounded.** The budget is at most 1 GiB, an eighth of ``MemAvailable`` and a quarter of the
  headroom left under the cgroup's memory limit (a 512 MiB cap leaves about 128 MiB). Page cache
  is reclaimable: a budget that turns out too large costs reads, never a failure.
* **Inside the input.** Only files the run itself would read: an index's shard entries pass the
  same containment rule as the reader's (no absolute paths, no ``..``, nothing resolving outside
  the directory); a bad index gives no head start (the run then reports it).
* **Never in the way.** Remote inputs (``s3://`` ...), ``--worker`` runs (their shards are not
  the first ones), resumed runs (a non-empty output directory: the first shards may be done) and
  ``MONOQUANT_HEADSTART=0`` get none. Every error is swallowed: the output bytes never depend on
  it.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"):
    ...     with open(os.path.join(d, name), "wb") as f:
    ...         _ = f.write(b"x" * (3 << 20))
    >>> [os.path.basename(p) for p in input_files(d)]
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    >>> calls = []
    >>> hs = HeadStart(input_files(d), budget=4 << 20, step=1 << 20,
    ...                advise=lambda fd, off, n: calls.append((off, n)))
    >>> hs.start().join()
    >>> hs.requested, calls[:4]     # 3 MiB of the first file, then 1 MiB of the second
    (4194304, [(0, 1048576), (1048576, 1048576), (2097152, 1048576), (0, 1048576)])
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .containment import index_entry, is_inside
from .errors import MonoquantError

#: the most bytes a head start asks for
LIMIT = 1 << 30
#: bytes per request
STEP = 8 << 20
#: set to ``0`` to turn the head start off (benchmarks compare the two)
ENV = "MONOQUANT_HEADSTART"


def input_files(src: str | os.PathLike[str]) -> list[Path]:
    """The local safetensors files of ``src`` in the order a run reads them; ``[]`` when there
    are none, when ``src`` is not a local path or when its index is unusable."""
    root = Path(src)
    if "://" in str(src):
        return []
    try:
        if root.is_file():
            return [root] if root.suffix == ".safetensors" else []
        if not root.is_dir():
            return []
        index = sorted(root.glob("*.safetensors.index.json"))
        if index:
            wmap = json.loads(index[0].read_text()).get("weight_map")
            if not isinstance(wmap, dict):
                return []
            files = [index_entry(root, str(s), index[0].name) for s in sorted(set(wmap.values()))]
        else:
            files = sorted(p for p in root.iterdir() if p.suffix == ".safetensors")
        return [p for p in files if p.is_file() and is_inside(p, root)]
    except (OSError, ValueError, AttributeError, MonoquantError):
        return []


def budget(limit: int = LIMIT) -> int:
    """Bytes a head start may ask for now: ``limit``, an eighth of ``MemAvailable`` and a quarter
    of the cgroup headroom, whichever is least."""
    b = limit
    avail = _mem_available()
    if avail is not None:
        b = min(b, avail // 8)
    head = _cgroup_headroom()
    if head is not None:
        b = min(b, head // 4)
    return max(0, b)


def begin(src: str, dst: str, *, worker: object = None, restart: bool = False) -> HeadStart | None:
    """Start a head start for a ``stream`` of ``src`` into ``dst``, or return ``None`` where it
    would not help (see the module docstring)."""
    if os.environ.get(ENV, "1") == "0" or worker is not None:
        return None
    if not restart and _has_entries(dst):
        return None  # a resumed job: its first shards may be done
    files = input_files(src)
    n = budget() if files else 0
    if n <= 0:
        return None
    return HeadStart(files, n).start()


class HeadStart:
    """A daemon thread asking for the first ``budget`` bytes of ``files``, in order.

    Args:
        files: the files, in reading order.
        budget: the most bytes to ask for, over all files.
        step: bytes per request.
        advise: ``(fd, offset, length)`` -> None, the request (default ``posix_fadvise``
            ``WILLNEED``); tests pass a recorder.
    """

    def __init__(
        self,
        files: list[Path],
        budget: int,
        step: int = STEP,
        advise: Callable[[int, int, int], None] | None = None,
    ):
        self.files = list(files)
        self.budget = max(0, int(budget))
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

    def stop(self, timeout: float = 1.0) -> None:
        """Ask no more; returns once the request in flight is done (or after ``timeout`` s)."""
        self._stop.set()
        self.join(timeout)

    def _run(self) -> None:
        for path in self.files:
            if self._stop.is_set() or self.requested >= self.budget:
                return
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size = os.fstat(fd).st_size
                pos = 0
                while pos < size and self.requested < self.budget and not self._stop.is_set():
                    n = min(self.step, size - pos, self.budget - self.requested)
                    self._advise(fd, pos, n)
                    pos += n
                    self.requested += n
            except OSError:
                pass
            finally:
                os.close(fd)


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
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom(root: str = "/sys/fs/cgroup", table: str = "/proc/self/cgroup") -> int | None:
    """The least room under a memory limit (limit - usage) of this process's cgroup and its
    ancestors, cgroup v2 (``memory.max``) or v1 (``memory/…/memory.limit_in_bytes``); ``None``
    without a limit."""
    try:
        with open(table) as f:
            lines = [ln.strip().split(":", 2) for ln in f if ln.count(":") >= 2]
    except OSError:
        return None
    best: int | None = None
    for _hid, ctrls, rel in lines:
        if ctrls == "":  # v2
            top, files = Path(root), ("memory.max", "memory.current")
            if not (top / "cgroup.controllers").exists():  # a hybrid host mounts v2 beside v1
                top = top / "unified"
        elif "memory" in ctrls.split(","):  # v1
            top, files = Path(root) / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        room = _room(top, top / rel.lstrip("/"), *files)
        if room is not None:
            best = room if best is None else min(best, room)
    return best


def _room(top: Path, d: Path, limit_file: str, usage_file: str) -> int | None:
    best: int | None = None
    while True:
        try:
            limit = (d / limit_file).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:  # v1 says "no limit" with a huge number
                room = max(0, int(limit) - int((d / usage_file).read_text()))
                best = room if best is None else min(best, room)
        except (OSError, ValueError):
            pass
        if d == top or top not in d.parents:
            return best
        d = d.parent
