"""Overlapping compute with writing: a pool of workspaces and block sinks.

The pipeline quantizes block *k+1* while a writer thread copies block *k* into the shard file
and checksums it (``pwrite`` and the torch sums of :class:`~monoquant.sum64.Sum64` release the
GIL, as do torch kernels); with a :class:`KernelHelper` thread
(:func:`monoquant.convert.process_tensor`), two blocks are computed at once. Kernel outputs are
views into a workspace, so each block takes a workspace from a small pool and the sink gives it
back once the block is on its way to disk — compute never overwrites bytes that are still being
written. The kernels' scratch (float32 tiles and the like) comes from
each kernel thread's own workspace (:meth:`~monoquant.numerics.Workspace.with_scratch`), so a
block waiting for the writer holds only its outputs.

Example:
    >>> pool = WorkspacePool(2)
    >>> ws = pool.acquire(); pool.release(ws)
    >>> sink = SyncSink(lambda o, off, t: None)
    >>> sink.submit([], on_done=None); sink.drain()
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from .kernels import ErrorStats, Workspace

if TYPE_CHECKING:  # annotations only: overlap sits below the plan layer
    from .plan import PlannedOutput

Write = Callable[["PlannedOutput", int, torch.Tensor], None]
Item = tuple["PlannedOutput", int, torch.Tensor]


class WorkspacePool:
    """``size`` reusable workspaces; :meth:`acquire` waits until one is free."""

    def __init__(self, size: int = 2):
        self.size = size
        # last in, first out: a run with fewer blocks in flight than ``size`` keeps reusing the
        # same workspaces, and the others never allocate their buffers
        self._free: queue.LifoQueue[Workspace] = queue.LifoQueue()
        for _ in range(size):
            self._free.put(Workspace())

    def acquire(self) -> Workspace:
        return self._free.get()

    def release(self, ws: Workspace) -> None:
        self._free.put(ws)


class BlockTask:
    """One block of a tensor: rows ``a:b`` read into ``ws`` as ``x``, computed by ``fn(task,
    scratch)`` on whichever kernel thread takes it; once :attr:`done` is set, its outputs
    (``result``) or its failure (``error``), and the statistics it measured."""

    __slots__ = ("a", "b", "ctx", "done", "error", "fn", "on_helper", "result", "stats", "ws", "x")

    def __init__(
        self,
        a: int,
        b: int,
        ws: Workspace,
        x: torch.Tensor | None,
        fn: Callable[[BlockTask, Workspace], None],
    ):
        self.a, self.b, self.ws, self.fn = a, b, ws, fn
        self.x = x
        #: what the reading thread needs to hand the block over (its tensor's sink, statistics)
        self.ctx: object = None
        self.result: dict[str, torch.Tensor] | None = None
        self.error: BaseException | None = None
        self.stats: ErrorStats | None = None
        self.done = threading.Event()
        #: taken by :meth:`BlockQueue.serve` (the helper), set under the queue's lock: a task not
        #: taken there and not withdrawn is not being computed by anyone after a failure
        self.on_helper = False

    def run(self, scratch: Workspace) -> None:
        """Compute the block with the kernel thread's ``scratch``."""
        self.fn(self, scratch)

    def fail(self, error: BaseException) -> None:
        """Mark the block failed without computing it (it was not read, or no thread took it)."""
        self.x, self.error = None, error
        self.done.set()


class BlockQueue:
    """Blocks waiting for a kernel thread, taken first in, first out by whichever thread is free.

    The thread that reads the blocks hands them over with :meth:`add` and computes some itself
    (:meth:`take`); the kernel helper runs :meth:`serve`, which takes blocks as soon as they
    come until :meth:`close`. Neither thread waits for the other between blocks: a block that one
    thread has not started yet goes to the other one when it is free (the blocks are still
    emitted in order by the reading thread, so the output does not depend on which thread
    computed what).

    Example:
        >>> from concurrent.futures import ThreadPoolExecutor
        >>> def double(t, scratch):
        ...     t.result = {"": t.x * 2}
        ...     t.done.set()
        >>> q = BlockQueue()
        >>> tasks = [BlockTask(i, i + 1, Workspace(), torch.tensor([float(i)]), double) for i in range(4)]
        >>> with ThreadPoolExecutor(1) as ex:
        ...     fut = ex.submit(q.serve, lambda t: t.run(Workspace()))
        ...     for t in tasks:
        ...         q.add(t)
        ...     while (t := q.take()) is not None:
        ...         t.run(Workspace())
        ...     q.close()
        ...     fut.result()
        >>> [float(t.result[""]) for t in tasks if t.done.wait()]
        [0.0, 2.0, 4.0, 6.0]
    """

    def __init__(self) -> None:
        self._todo: deque[BlockTask] = deque()
        self._cv = threading.Condition()
        self._closed = False

    def add(self, task: BlockTask) -> None:
        with self._cv:
            self._todo.append(task)
            self._cv.notify()

    def take(self) -> BlockTask | None:
        """The oldest block no thread has started, or ``None``."""
        with self._cv:
            return self._todo.popleft() if self._todo else None

    def waiting(self) -> int:
        """How many blocks no thread has started yet."""
        with self._cv:
            return len(self._todo)

    def withdraw(self, tasks: Iterable[BlockTask]) -> set[int]:
        """Take back those of ``tasks`` no thread has started (after a failure); the ``id`` of
        each one withdrawn. The others are started: wait for their :attr:`BlockTask.done`."""
        with self._cv:
            mine = {id(t) for t in tasks}
            gone = {id(t) for t in self._todo if id(t) in mine}
            self._todo = deque(t for t in self._todo if id(t) not in gone)
            return gone

    def close(self) -> None:
        """No more blocks: :meth:`serve` returns after the block it is computing."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def serve(self, compute: Callable[[BlockTask], None]) -> None:
        """Compute blocks as they come until :meth:`close` (the kernel helper's loop)."""
        while True:
            with self._cv:
                while not self._todo and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                task = self._todo.popleft()
                task.on_helper = True
            compute(task)


class KernelHelper:
    """A second kernel thread, with the scratch workspace of each kernel thread.

    The thread serves :attr:`blocks` (a :class:`BlockQueue`) for the whole run: blocks handed
    over with :meth:`share` are computed as soon as it is free, tensor after tensor, without a
    start or a stop per tensor. ``scratch`` is the calling thread's workspace, ``helper_scratch``
    the helper's: kept for the whole run, so their buffers are allocated (and their pages faulted
    in) once.

    Example:
        >>> def double(t, scratch):
        ...     t.result = {"": t.x * 2}
        ...     t.done.set()
        >>> h = KernelHelper()
        >>> t = BlockTask(0, 1, Workspace(), torch.tensor([3.0]), double)
        >>> h.share(t)
        >>> t.done.wait(5), float(t.result[""])
        (True, 6.0)
        >>> h.shutdown()
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="monoquant-kernel")
        self.scratch = Workspace()
        self.helper_scratch = Workspace()
        self.blocks = BlockQueue()
        self._served: Future[None] | None = None

    def share(self, task: BlockTask) -> None:
        """Hand ``task`` to the helper's queue (the thread starts serving it on first use)."""
        if self._served is None:
            self._served = self._executor.submit(self.blocks.serve, self.compute)
        self.blocks.add(task)

    def compute(self, task: BlockTask) -> None:
        """Compute ``task`` (on the helper's thread)."""
        task.run(self.helper_scratch)

    def shutdown(self) -> None:
        """Stop the thread (after the block it is computing)."""
        self.blocks.close()
        self._executor.shutdown()


class SyncSink:
    """Writes each block at once, on the calling thread.

    ``guard``, when set, is called before every block and may raise to refuse it (a failure
    elsewhere, such as the shard's copy lane); the block's ``on_done`` still runs."""

    def __init__(self, write: Write):
        self.write = write
        self.guard: Callable[[], None] | None = None

    def submit(self, items: list[Item], on_done: Callable[[], None] | None) -> None:
        try:
            if self.guard is not None:
                self.guard()
            for o, off, t in items:
                self.write(o, off, t)
        finally:
            if on_done is not None:
                on_done()

    def drain(self) -> None:
        """Nothing is pending on a synchronous sink."""

    def close(self) -> None:
        """Nothing to stop."""


class ThreadSink:
    """Writes blocks on a background thread, at most ``depth`` blocks behind.

    An error on the writer thread is raised by the next :meth:`submit`, :meth:`drain` or
    :meth:`close` on the calling thread; ``on_done`` callbacks always run, so workspaces
    return to their pool even then. ``guard``: as :class:`SyncSink`'s.
    """

    def __init__(self, write: Write, depth: int = 2):
        self.write = write
        self._q: queue.Queue[tuple[list[Item], Callable[[], None] | None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.guard: Callable[[], None] | None = None
        self._pending = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="monoquant-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            items, on_done = job
            try:
                if self._error is None:
                    for o, off, t in items:
                        self.write(o, off, t)
            except BaseException as e:  # handed to the submitting thread
                self._error = e
            finally:
                if on_done is not None:
                    on_done()
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, items: list[Item], on_done: Callable[[], None] | None) -> None:
        try:
            if self.guard is not None:
                self.guard()
            self._raise()
        except BaseException:  # refused: its workspace still goes back, as the docstring says
            if on_done is not None:
                on_done()
            raise
        with self._cv:
            self._pending += 1
        try:
            self._q.put((items, on_done))
        except BaseException:  # interrupted while the queue was full: never queued, so undo
            with self._cv:
                self._pending -= 1
                self._cv.notify_all()
            if on_done is not None:
                on_done()
            raise

    def drain(self) -> None:
        """Wait until every submitted block is written; raise a writer error."""
        with self._cv:
            while self._pending:
                self._cv.wait()
        self._raise()

    def close(self) -> None:
        """Stop the writer thread (after the pending blocks)."""
        self._q.put(None)
        self._thread.join()


def _cpu_sample() -> tuple[int, int]:
    """(idle + iowait, total) jiffies of all CPUs, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields)


def _own_jiffies() -> float:
    """CPU time this process used so far (all threads), in ``/proc/stat`` jiffies."""
    t = os.times()
    return (t.user + t.system) * os.sysconf("SC_CLK_TCK")


class SpareCoreProbe:
    """:func:`spare_core`, measured while the caller goes on working (planning a run, say).

    The first sample is taken at construction; :meth:`result` takes the second, sleeping only for
    what is left of ``window``. CPU time this process used in between counts as idle, so the
    answer is the one :func:`spare_core` gives by sleeping: whether the *other* processes leave
    about 3/4 of a core idle. This saves the run start-up the 0.1 s of sleep where there is work
    to do meanwhile.

    Example:
        >>> probe = SpareCoreProbe()
        >>> isinstance(probe.result(), bool)
        True
    """

    def __init__(self, window: float = 0.1):
        self.window = window
        self._t0 = time.monotonic()
        try:
            self._first: tuple[int, int, float] | None = (*_cpu_sample(), _own_jiffies())
        except (OSError, ValueError, IndexError):
            self._first = None
        self._answer: bool | None = None

    def result(self) -> bool:
        """True when at least ~3/4 of a CPU core was left idle by other processes over the window
        (False when unknown or with one CPU). The answer is kept: later calls return it at once."""
        if self._answer is None:
            self._answer = self._measure()
        return self._answer

    def _measure(self) -> bool:
        ncpu = os.cpu_count() or 1
        if ncpu < 2 or self._first is None:
            return False
        left = self.window - (time.monotonic() - self._t0)
        if left > 0:
            time.sleep(left)
        try:
            i1, t1 = _cpu_sample()
            own1 = _own_jiffies()
        except (OSError, ValueError, IndexError):
            return False
        i0, t0, own0 = self._first
        if t1 <= t0:
            return False
        free = (i1 - i0) + min(own1 - own0, t1 - t0)  # idle, plus what this process itself used
        return ncpu * free / (t1 - t0) >= 0.75


def spare_core(window: float = 0.1) -> bool:
    """True when at least ~3/4 of a CPU core sat idle over the last ``window`` seconds (from
    ``/proc/stat``); False when unknown. The writer thread only pays where a core is free: on
    two busy cores it made runs slower (see docs/benchmarks.md). Sleeps ``window``; see
    :class:`SpareCoreProbe` to measure while doing something else."""
    return SpareCoreProbe(window).result()
