"""The kernel helper in a process of its own: a second core without a shared GIL.

With overlap on, two threads compute blocks (:class:`~monoquant.overlap.KernelHelper`). Every
torch call releases the GIL and takes it back, and with two busy threads each release wakes the
other one: on a 2-core VM a warm int8 run spent 5-7 % of its CPU time in the kernel's scheduler
(futex wake-ups, context switches), and two kernel threads did 1.35 times the work of one where
two processes do 1.7 times (``scripts/two_cores.py``). :class:`ProcessHelper` keeps the helper's
queue and its place in :class:`~monoquant.convert.BlockLine`, but a thread of it only hands each
block to a forked child process and waits (without the GIL) for the answer:

* **Input without a copy.** A block's rows are a byte range of a safetensors file; the child maps
  the same file itself (checked to be the same file: device and inode of the reader's open file)
  and reads the rows from the page cache, as the reader does.
* **Output without a copy.** The child encodes the codes straight into a slot of a shared
  anonymous mapping, one slot per workspace of the pool; the smaller outputs (scales, zero
  points) are copied in beside them. The block's outputs are views of that slot, valid until the
  writer gives the workspace back to the pool, exactly like a thread's outputs in the workspace.
* **The same bytes and figures.** The child runs the same kernel on the same rows, with the
  block's statistics sent back as their sums and merged in block order, as before.
* **Anything unusual is computed here.** A block whose input is not a mapped safetensors file
  (``--backend pread``, torch pickles, object storage), whose outputs do not fit its slot, or
  whose kernel raises in the child is computed on this side by the same thread, like the thread
  helper would: errors are raised the way the thread helper raises them. If the child dies, or
  does not answer within :data:`BLOCK_SECONDS` (it is then killed), the run goes on the same way
  (threads), and its bytes do not change.
* **It dies with the run.** The child ignores Ctrl-C (this process unwinds and closes the pipe,
  and the child exits when it reads the end), closes every inherited file descriptor but its
  pipe (it holds no lock of the job), and gets SIGKILL when this process dies
  (``PR_SET_PDEATHSIG``).

The ``monoquant`` command uses it on Linux with the mmap reader and one torch thread per kernel
(:func:`process_helper_allowed`); ``MONOQUANT_KERNEL_PROCESS=0`` turns it off. The Python API
forks only with ``MONOQUANT_KERNEL_PROCESS=1``: the caller's process is not ours to fork.

Example:
    >>> import torch
    >>> from monoquant.overlap import BlockTask
    >>> from monoquant.numerics import Workspace
    >>> def double(t, scratch):
    ...     t.result = {"": t.x * 2}
    ...     t.done.set()
    >>> h = ProcessHelper(slots=2, slot_bytes=1 << 16)
    >>> t = BlockTask(0, 1, Workspace(), torch.tensor([3.0]), double)  # no BlockJob: computed here
    >>> h.share(t)
    >>> t.done.wait(5), float(t.result[""])
    (True, 6.0)
    >>> h.shutdown()
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe
from typing import Any

import torch

from .kernels import ErrorStats, Workspace, get_kernel
from .memwatch import HELPERS, forget_helper
from .overlap import BlockTask, KernelHelper
from .schemes import Scheme

#: outputs in a slot start at multiples of this
ALIGN = 64
#: seconds to wait for the child's first word, then for any one block: past them it is taken
#: for hung (a lock it inherited held, say), killed, and the run goes on with threads
READY_SECONDS = 30.0
BLOCK_SECONDS = 120.0
#: the environment variable that turns the process on (``1``: the command sets it) or off (``0``)
ENV = "MONOQUANT_KERNEL_PROCESS"
_PR_SET_PDEATHSIG = 1


@dataclass
class BlockJob:
    """How to compute the blocks of one tensor in the helper process: the kernel's arguments,
    and where the tensor's rows lie (``path``, ``offset`` of its data, ``cols`` per row) in a file
    whose ``ident`` (device, inode) the reader has open. ``ident`` is ``None`` until the first
    block is read (and stays so when the input is not a mapped file: blocks are then computed
    here)."""

    scheme: Scheme
    tensor_scale: torch.Tensor | None
    clamp_fp16: bool
    stats_rows: int
    stats: bool
    path: str
    offset: int
    cols: int
    dtype: torch.dtype
    ident: tuple[int, int] | None = None


def process_helper_allowed(backend: str, threads: int | None) -> bool:
    """Whether runs here may use :class:`ProcessHelper`: :data:`ENV` is ``1``, on Linux
    (``fork``), with the mmap reader and one torch thread per kernel (a forked child must not
    inherit a running OpenMP pool).

    The ``monoquant`` command sets :data:`ENV` to ``1`` unless it is set (its process is its
    own); the Python API leaves it alone, so a library call forks only when asked to: a caller's
    process may hold threads of its own, whose locks a forked child would inherit held (a child
    forked inside a vLLM process hung so).

    Example:
        >>> import os
        >>> os.environ[ENV] = "0"
        >>> process_helper_allowed("mmap", 1)
        False
        >>> del os.environ[ENV]
    """
    return (
        os.environ.get(ENV) == "1"
        and sys.platform.startswith("linux")
        and hasattr(os, "fork")
        and backend == "mmap"
        and threads == 1
    )


class ProcessHelper(KernelHelper):
    """A :class:`~monoquant.overlap.KernelHelper` whose blocks are computed by a child process.

    Args:
        slots: the pool's workspaces (one output slot each).
        slot_bytes: bytes of each slot: the largest block's outputs.
    """

    def __init__(self, slots: int, slot_bytes: int):
        super().__init__()
        self._slot_bytes = -(-slot_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self._nslots = slots
        self._arena = mmap.mmap(-1, slots * self._slot_bytes)  # shared, anonymous
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()
        #: blocks the child computed
        self.blocks_done = 0
        self._ready = False
        ours, theirs = Pipe()
        parent = os.getpid()
        with warnings.catch_warnings():  # Python 3.12+ warns about fork() beside other threads
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 0
            try:
                ours.close()
                _child(theirs, self._arena, self._slot_bytes, slots, parent)
            except BaseException:  # nothing may escape into the parent's code
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        self.pid: int | None = pid
        HELPERS.add(pid)  # its memory is the run's (the report's peak_anon)
        self._conn: Connection | None = ours

    @property
    def alive(self) -> bool:
        """Whether blocks still go to the child (False once it failed or ended)."""
        return self._conn is not None

    def _slot(self, task: BlockTask) -> int | None:
        key = id(task.ws.buffers)  # the pool's workspaces live as long as the run
        with self._lock:
            s = self._slots.get(key)
            if s is None and len(self._slots) < self._nslots:
                s = self._slots[key] = len(self._slots)
            return s

    def compute(self, task: BlockTask) -> None:
        """Have the child compute ``task`` (on the helper's thread), or compute it here."""
        job = getattr(task.ctx, "job", None)
        slot = self._slot(task)
        conn = self._conn
        if conn is None or not isinstance(job, BlockJob) or job.ident is None or slot is None:
            task.run(self.helper_scratch)
            return
        try:
            if not self._ready:  # its first word: set up and listening
                if not conn.poll(READY_SECONDS) or conn.recv() != ("ready",):
                    raise TimeoutError("the kernel process did not start")
                self._ready = True
            conn.send((slot, job, task.a, task.b))  # (pickled whole before a byte is sent)
            if not conn.poll(BLOCK_SECONDS):
                raise TimeoutError("the kernel process did not answer")
            answer = conn.recv()
        except (EOFError, OSError):  # the child is gone or hung (TimeoutError): go on with threads
            self._lost()
            answer = ("local", "no child")
        except Exception:  # a job that does not pickle, say: this thread computes it
            answer = ("local", "not sent")
        if answer[0] != "ok":  # not for the child (or it failed there): computed here
            task.run(self.helper_scratch)
            return
        try:
            _, outs, st = answer
            result = {k: _view(self._arena, off, dt, shape) for k, dt, shape, off in outs}
        except Exception:  # an answer it cannot read: computed here
            task.run(self.helper_scratch)
            return
        task.result, task.stats = result, st
        self.blocks_done += 1
        task.x = None
        task.done.set()

    def _lost(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._reap(0.0)

    def _reap(self, wait: float) -> None:
        """Collect the child (SIGKILL after ``wait`` seconds)."""
        if self.pid is None:
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                done = self.pid
            if done:
                break
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                break
            time.sleep(0.005)
        forget_helper(self.pid)
        self.pid = None

    def shutdown(self) -> None:
        """Stop the thread (after its block), then the child (it exits when the pipe closes)."""
        super().shutdown()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._reap(5.0)


def _view(arena: mmap.mmap, off: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.frombuffer(arena, dtype=dtype, count=math.prod(shape), offset=off).view(shape)


def _child(conn: Connection, arena: mmap.mmap, slot_bytes: int, slots: int, parent: int) -> None:
    """The child's loop: one block per request, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent unwinds; the pipe's end stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    warnings.simplefilter("ignore")  # never a word on the run's terminal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the prctl
        return
    keep = conn.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
    torch.set_num_threads(1)
    scratch = Workspace()
    base = torch.frombuffer(arena, dtype=torch.uint8, count=1).data_ptr()
    half = slot_bytes // 2
    outs_ws = []
    for i in range(slots):  # the codes go straight into the first half of the block's slot
        w = Workspace()
        codes = torch.frombuffer(arena, dtype=torch.uint8, count=half, offset=i * slot_bytes)
        w.buffers[("q", torch.int8)] = codes.view(torch.int8)
        w.buffers[("u8", torch.uint8)] = codes
        outs_ws.append(w)
    files: dict[str, tuple[tuple[int, int], mmap.mmap]] = {}
    conn.send(("ready",))
    while True:
        try:
            slot, job, a, b = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer = _block(job, a, b, slot, slot_bytes, base, arena, outs_ws[slot], scratch, files)
        except Exception as e:  # the parent computes it again and raises it there
            answer = ("local", repr(e))
        conn.send(answer)


def _block(
    job: BlockJob,
    a: int,
    b: int,
    slot: int,
    slot_bytes: int,
    base: int,
    arena: mmap.mmap,
    ws: Workspace,
    scratch: Workspace,
    files: dict[str, tuple[tuple[int, int], mmap.mmap]],
) -> tuple[Any, ...]:
    """One block in the child: ``("ok", outputs, statistics)`` or ``("local", why)``."""
    got = files.get(job.path)
    if got is None or got[0] != job.ident:
        for _, old in files.values():
            old.close()
        files.clear()
        fd = os.open(job.path, os.O_RDONLY)
        try:
            info = os.fstat(fd)
            if (info.st_dev, info.st_ino) != job.ident:
                return ("local", "not the file the reader has open")
            files[job.path] = got = (job.ident, mmap.mmap(fd, 0, access=mmap.ACCESS_COPY))
        finally:
            os.close(fd)
    mm = got[1]
    item = job.dtype.itemsize
    off = job.offset + a * job.cols * item
    n = (b - a) * job.cols
    if n == 0 or off + n * item > len(mm):
        return ("local", "beyond the end of the file")
    x = torch.frombuffer(mm, dtype=job.dtype, count=n, offset=off).view(b - a, job.cols)
    st = ErrorStats() if job.stats else None
    res = get_kernel(job.scheme).quantize_block(
        x,
        tensor_scale=job.tensor_scale,
        ws=ws.with_scratch(scratch),
        stats=st,
        clamp_fp16=job.clamp_fp16,
        stats_rows=job.stats_rows,
    )
    lo, hi = slot * slot_bytes, (slot + 1) * slot_bytes
    outs = []
    pos = lo + slot_bytes // 2  # the second half: outputs not computed in place
    for key, t in res.items():
        p = t.data_ptr() - base
        nbytes = t.numel() * t.element_size()
        if t.is_contiguous() and lo <= p and p + nbytes <= lo + slot_bytes // 2:
            outs.append((key, t.dtype, tuple(t.shape), p))
            continue
        pos = -(-pos // ALIGN) * ALIGN
        if pos + nbytes > hi:
            return ("local", "outputs larger than the slot")
        torch.frombuffer(arena, dtype=torch.uint8, count=nbytes, offset=pos).copy_(
            t.contiguous().reshape(-1).view(torch.uint8)
        )
        outs.append((key, t.dtype, tuple(t.shape), pos))
        pos += nbytes
    page = mmap.PAGESIZE  # the rows are read: drop them from this mapping
    p0, p1 = -(-off // page) * page, (off + n * item) // page * page
    if p1 > p0:
        mm.madvise(mmap.MADV_DONTNEED, p0, p1 - p0)
    return ("ok", outs, st)  # the block's statistics go back whole (a dataclass of numbers)
