"""Peak memory of the running process, as the run reports it.

Three views, because they answer different questions:

* ``peak_rss`` — ``getrusage`` max RSS (includes mapped file pages);
* ``peak_anon`` — the largest ``RssAnon`` seen by a sampler thread (memory that cannot be
  reclaimed: what an OOM killer looks at), with what the run's helper processes
  (:data:`HELPERS`) add to it: their own pages and the memory they share with the run;
* ``cgroup_peak`` — the memory cgroup's max usage (page cache charged to it included) when the
  process runs in its own cgroup (e.g. under ``memcap``), else ``None``.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from pathlib import Path

#: helper processes of this run (:mod:`monoquant.kernelproc`): their own pages count as ours
HELPERS: set[int] = set()


def _status_kb(field: str, pid: int | str = "self", table: str = "status") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/{table}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_cgroups(
    root: str = "/sys/fs/cgroup", table: str = "/proc/self/cgroup"
) -> list[tuple[Path, Path, bool]]:
    """This process's memory cgroups from ``table``: ``(directory, top of its hierarchy, v1?)``
    for the v1 ``memory`` controller (``root/memory/...``) and for v2 (``root/...``, or
    ``root/unified/...`` on a host that mounts v2 beside v1). ``[]`` when ``table`` cannot be read.

    Example:
        >>> memory_cgroups("/cg", "/nonexistent")
        []
    """
    try:
        lines = Path(table).read_text().splitlines()
    except (OSError, ValueError):  # ValueError: not UTF-8
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if "memory" in controllers.split(","):
            top, v1 = Path(root) / "memory", True
        elif controllers == "":
            top, v1 = Path(root), False
            if not (top / "cgroup.controllers").exists():  # a hybrid host mounts v2 beside v1
                top = top / "unified"
        else:
            continue
        out.append((top / rel.lstrip("/"), top, v1))
    return out


def cgroup_peak() -> int | None:
    """Max usage of this process's memory cgroup in bytes (v1 or v2), when the process runs alone
    in its own cgroup (as under ``memcap``); ``None`` otherwise (a shared cgroup's peak says
    nothing about this run)."""
    for d, _top, v1 in memory_cgroups():
        f = d / ("memory.max_usage_in_bytes" if v1 else "memory.peak")
        try:
            procs = {int(x) for x in (d / "cgroup.procs").read_text().split()}
            if procs - _own_tree():
                return None
            return int(f.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def _own_tree() -> set[int]:
    """This process and its descendants (children of children included)."""
    me = os.getpid()
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree = {me}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


#: seconds between two reads of a helper's ``smaps_rollup``: a read walks the child's page
#: tables under its memory lock (15 ms or so during a run here), too slow for every sample
SMAPS_EVERY = 1.0
_private_kb: dict[int, tuple[float, int]] = {}  # pid -> (when read, Private_Dirty KiB)


def _helpers_kb() -> int:
    """What the run's helper processes add to its anonymous memory, in KiB: each child's own
    pages (``Private_Dirty``: the pages it shares copy-on-write with this process are counted
    here already; read at most every :data:`SMAPS_EVERY` seconds, and it grows only while a
    child allocates its scratch, at the start), and this process's shared memory (the output
    slots both map)."""
    if not HELPERS:
        return 0
    kb = _status_kb("RssShmem") or 0
    now = time.monotonic()
    for pid in list(HELPERS):
        when, last = _private_kb.get(pid, (-SMAPS_EVERY, 0))
        if now - when >= SMAPS_EVERY:
            last = _status_kb("Private_Dirty", pid, "smaps_rollup") or last
            _private_kb[pid] = (now, last)
        kb += last
    return kb


def forget_helper(pid: int) -> None:
    """``pid`` has ended: it is no longer sampled."""
    HELPERS.discard(pid)
    _private_kb.pop(pid, None)


class MemWatch:
    """Samples ``RssAnon`` every ``interval`` seconds while active (a context manager)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        kb = _status_kb("RssAnon")
        if kb is not None:
            kb += _helpers_kb()
            self.peak_anon = max(self.peak_anon, kb * 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemWatch:
        self._sample()
        self._thread = threading.Thread(target=self._run, name="monoquant-memwatch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def report(self) -> dict[str, int | None]:
        return {
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_anon": self.peak_anon,
            "cgroup_peak": cgroup_peak(),
        }
