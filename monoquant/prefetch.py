"""Bounded read-ahead of the input: keep the next bytes of the file being read in memory while the
kernel works on the current block.

A cold input is otherwise read and quantized in turns: each block's first touch waits for the disk,
and the kernel waits with it. :class:`ReadAhead` runs one background thread per reader that asks
the kernel for the bytes just ahead of the reader's position, never more than ``budget`` bytes
beyond it (so memory stays bounded, whatever the file size):

* ``populate`` (mmap reader, Linux >= 5.14): ``madvise(MADV_POPULATE_READ)`` on the mapping. The
  thread waits for the disk and maps the pages, so the kernel's first touch of the block neither
  waits nor page-faults. The mapped pages count in the process's RSS (file pages, reclaimable) and
  are unmapped by the reader's ``release`` once consumed.
* ``willneed`` (pread reader, or where ``populate`` is refused): ``posix_fadvise(WILLNEED)``: the
  kernel starts reading the range into the page cache and the call returns.

The system calls release the GIL (``ctypes`` / ``os``), so the thread runs beside the kernel's torch
ops. A hint never changes what is read: output bytes are the same with or without read-ahead.

Example:
    >>> import os, tempfile
    >>> f = tempfile.NamedTemporaryFile(); f.write(b"x" * (1 << 20)); f.flush()
    1048576
    >>> fd = os.open(f.name, os.O_RDONLY)
    >>> ra = ReadAhead(budget=256 << 10, step=64 << 10)
    >>> ra.attach(fd, 1 << 20)
    >>> ra.consumed(0)                     # the reader handed out nothing yet: read 256 KiB ahead
    >>> ra.wait_idle(), ra.ahead()
    (True, 262144)
    >>> ra.close(); os.close(fd)
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading

#: bytes kept in flight ahead of the reader (per reader: ``--jobs N`` has N of them)
DEFAULT_BUDGET = 64 * 1024 * 1024
#: the read-ahead of ``monoquant.stream``'s readers: 8 blocks of 4 MiB (see docs/benchmarks.md)
READAHEAD_BYTES = 32 * 1024 * 1024
#: bytes asked for per system call
DEFAULT_STEP = 8 * 1024 * 1024
MADV_POPULATE_READ = 22  # Linux 5.14+

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc: fadvise only
    _libc = None


def mapping_address(mm: mmap.mmap) -> int:
    """The address of an mmap's first byte (the buffer export is released at once, so the map
    can still be closed)."""
    c = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(c)
    finally:
        del c


class ReadAhead:
    """Reads ahead of one reader in one file at a time, at most ``budget`` bytes beyond it.

    Args:
        budget: the most bytes requested beyond the reader's position (the memory bound).
        step: bytes per request.
        method: ``"auto"`` (``populate`` on a mapping, else ``willneed``), ``"populate"`` or
            ``"willneed"``.

    :meth:`attach` a file (an fd, its size, and the address of its mapping for ``populate``),
    report the reader's position with :meth:`consumed` after handing out each block,
    :meth:`detach` before closing the fd or unmapping (it waits for a request in flight), and
    :meth:`close` at the end.
    """

    def __init__(self, budget: int = DEFAULT_BUDGET, step: int = DEFAULT_STEP, method: str = "auto"):
        if budget < 0 or step <= 0:
            raise ValueError(f"ReadAhead: budget {budget} and step {step} must be >= 0 and > 0")
        if method not in ("auto", "populate", "willneed"):
            raise ValueError(f"ReadAhead: unknown method {method!r}")
        self.budget = budget
        self.step = min(step, budget) if budget else step
        self.method = method
        self._cv = threading.Condition()
        self._fd = -1
        self._size = 0
        self._addr = 0
        self._pos = 0  # the reader's position (end of the last block handed out)
        self._issued = 0  # bytes before this offset have been requested
        self._busy = False  # a request is in flight (outside the lock)
        self._gen = 0  # bumped by attach/detach: a request of an older file is not counted
        self._stop = False
        self._thread: threading.Thread | None = None
        self.requests = 0  # requests made (for tests and benchmarks)
        self.max_ahead = 0  # the largest (requested end - reader position) seen

    # ---- reader side -------------------------------------------------------------------------
    def attach(self, fd: int, size: int, addr: int = 0) -> None:
        """Start reading ahead in the file ``fd`` of ``size`` bytes (mapped at ``addr``, or 0)."""
        if self.budget == 0:
            return
        with self._cv:
            self._wait_not_busy()
            self._fd, self._size, self._addr = fd, size, addr
            self._pos = self._issued = 0
            self._gen += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="monoquant-readahead", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def consumed(self, pos: int) -> None:
        """The reader has handed out the bytes before ``pos``: keep ``[pos, pos + budget)`` coming."""
        with self._cv:
            if self._fd < 0:
                return
            self._pos = pos
            if self._issued < pos:  # the reader jumped ahead: do not read what it skipped
                self._issued = pos
            if self._issued < min(self._size, pos + self.budget):
                self._cv.notify_all()

    def detach(self) -> None:
        """Stop reading ahead in the current file; returns once no request on it is in flight."""
        with self._cv:
            self._wait_not_busy()
            self._fd, self._addr, self._size = -1, 0, 0
            self._gen += 1

    def close(self) -> None:
        """Detach and end the thread."""
        self.detach()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def ahead(self) -> int:
        """Bytes requested beyond the reader's position now."""
        with self._cv:
            return max(0, self._issued - self._pos) if self._fd >= 0 else 0

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until everything the budget allows has been requested (tests, benchmarks)."""
        with self._cv:
            return self._cv.wait_for(lambda: self._fd < 0 or (not self._busy and not self._want()), timeout)

    # ---- the thread --------------------------------------------------------------------------
    def _wait_not_busy(self) -> None:
        while self._busy:
            self._cv.wait()

    def _want(self) -> bool:
        return self._fd >= 0 and self._issued < min(self._size, self._pos + self.budget)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._want():
                    self._cv.wait()
                if self._stop:
                    return
                lo = self._issued
                hi = min(self._size, self._pos + self.budget, lo + self.step)
                fd, addr, gen = self._fd, self._addr, self._gen
                self._issued = hi
                self.max_ahead = max(self.max_ahead, hi - self._pos)
                self._busy = True
            try:
                self._request(fd, addr, lo, hi)
            finally:
                with self._cv:
                    self._busy = False
                    if gen == self._gen:
                        self.requests += 1
                    self._cv.notify_all()

    def _request(self, fd: int, addr: int, lo: int, hi: int) -> None:
        if addr and self.method != "willneed" and _libc is not None:
            page = mmap.PAGESIZE
            a = lo // page * page
            if _libc.madvise(ctypes.c_void_p(addr + a), hi - a, MADV_POPULATE_READ) == 0:
                return
            if self.method == "populate":
                return  # refused (old kernel, file shrank): the reader faults the pages in itself
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
