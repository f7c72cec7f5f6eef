"""Job control: run a plan into an output directory, resumably, by any number of workers.

:func:`run_job` is what :func:`monoquant.stream` does once its options are resolved and its plan
is made:

1. :func:`_already_complete`: ``dst`` holds this job's finished output (nothing to do), or is
   checked to hold nothing but this job's files (:mod:`monoquant.ownership`); ``restart`` deletes
   the files of the job being replaced.
2. The job state (:class:`monoquant.journal.JobState`) is prepared, the free space checked.
3. :func:`_run_shards`: this worker's shards (``i % N == K``), ``jobs`` at a time. Each shard
   is taken under its lock; one finished and journaled earlier (by this or another process) is
   skipped; otherwise :func:`_write_shard` writes it (``.partial``, then renamed) and journals it.
4. :func:`_maybe_finalize`: whichever worker sees every shard journaled writes the side files,
   ``config.json`` and, last, the index; then the job state is removed.

A kill at any point leaves either the finished output or a state a rerun resumes from (the
SIGKILL tests in ``tests/test_crash.py`` hold this).

Example:
    >>> import monoquant                                                   # doctest: +SKIP
    >>> monoquant.stream("ckpt/", "out/", "int4", worker="0/2")             # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .convert import HELD_BLOCKS, BlockLine, process_tensor
from .copylane import CopyLane
from .errors import MonoquantError, OutputError
from .journal import JobState, check_writable, entry_matches
from .kernelproc import ProcessHelper, process_helper_allowed
from .kernels import ErrorStats, Workspace, get_kernel
from .memwatch import MemWatch
from .options import JobOptions
from .outdir import completed_fingerprint, finalize
from .outnames import INDEX_NAME, partial_name
from .overlap import KernelHelper, SyncSink, ThreadSink, WorkspacePool
from .ownership import check_state_dir, finished_files, planned_files, present_files, refuse_foreign
from .plan import Plan, PlannedTensor, ShardPlan
from .prefetch import READAHEAD_BYTES
from .reader import Checkpoint, RowReader
from .remote import RemotePath, pin_inputs
from .report import ProgressEvent, Report
from .writer import ShardWriter

Emit = Callable[[ProgressEvent], None]

#: workspaces of a job with overlap on: the blocks a tensor holds (``convert.HELD_BLOCKS``: one on
#: each kernel thread, two waiting or finished) and four with the writer. They hold block outputs
#: only (a few MiB each; with ``--backend pread``, the block's input too); the kernels' scratch is
#: one per kernel thread. With two for the writer, the reading thread waited for a free workspace
#: in 10-18 % of its stack samples in a warm int8 run (the writer waits for the disk in bursts, at
#: each flush); with four, in 2-7 %, for 4 MiB more anonymous memory (scripts/thread_states.py)
POOL_OVERLAP = HELD_BLOCKS + 4


def run_job(ckpt: Checkpoint, p: Plan, dst: Path, opts: JobOptions, report: Report, emit: Emit) -> None:
    """Run ``p`` (planned from ``ckpt``) into ``dst``: this worker's shards, then the index when
    every shard is done. Fills ``report`` (``complete``, counts, statistics, memory)."""
    k, n = opts.worker
    side = side_relpaths(ckpt)
    with MemWatch() as mw, torch_threads(opts.threads):
        if _already_complete(dst, p, opts.restart, side):
            report.complete = True
        else:
            check_writable(dst)
            state = JobState(dst, p, side)
            state.prepare(opts.restart)
            pin_inputs(state.dir, ckpt.files)
            mine = [s for s in p.shards if s.index % n == k]
            _check_space(dst, mine, state, ckpt)
            _run_shards(ShardRun(p, state, dst, report, opts, emit), mine)
            report.complete = _maybe_finalize(p, state, ckpt, dst)
            if report.complete:
                emit(ProgressEvent("finalized", name=INDEX_NAME))
    report.memory = mw.report()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)`` and restore the previous setting."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def side_relpaths(ckpt: Any) -> list[str]:
    """The side files a run of ``ckpt`` writes into the output, as relative POSIX paths."""
    root = ckpt.root if ckpt.root.is_dir() else ckpt.root.parent
    return sorted(p.relative_to(root).as_posix() for p in ckpt.side_files)


def _already_complete(dst: Path, p: Plan, restart: bool, side: list[str]) -> bool:
    """Whether ``dst`` already holds this job's finished output; otherwise check that everything
    in ``dst`` is ours (see :mod:`monoquant.ownership`) and, for ``restart``, delete the files of
    the job being replaced."""
    check_state_dir(dst)
    done_fp = completed_fingerprint(dst)
    if done_fp is not None and done_fp == p.fingerprint and not restart:
        JobState(dst, p).remove()  # left behind by a kill between writing the index and cleaning up
        return True
    present = present_files(dst)
    ours = planned_files(p, side)
    state = JobState(dst, p, side)
    if done_fp is not None:
        if not restart:
            raise OutputError(
                f"{dst} holds a finished model of another job (other input or options); choose another "
                "output directory or add --restart to replace it"
            )
        old = finished_files(dst)
        refuse_foreign(dst, present - old - ours - state.owned(), "holds files next to the finished model")
        state.dir.mkdir(exist_ok=True)  # first: marks the directory as a job in progress (for a rerun)
        state.note_discard(old)  # then: what to delete, recorded before the index that lists it goes
        with contextlib.suppress(OSError):
            (dst / INDEX_NAME).unlink()  # then: an index must always mean a complete model
        state.discard()
        return False
    if state.dir.is_dir():
        rec = state.recorded()
        if restart or rec is None or rec.get("fingerprint") == p.fingerprint:
            refuse_foreign(dst, present - state.owned() - ours, "holds files")
        return False  # another job's state: prepare() says so
    if present:
        shown = ", ".join(sorted(present)[:3]) + (" ..." if len(present) > 3 else "")
        raise OutputError(f"{dst} is not empty ({shown}); choose an empty or new output directory")
    return False


def _check_space(dst: Path, mine: list[ShardPlan], state: JobState, ckpt: Any = None) -> None:
    done = state.finished()
    need = sum(s.file_size for s in mine if s.filename not in done) + (1 << 20)
    for f in getattr(ckpt, "side_files", []):  # copied at the end: they need room too
        with contextlib.suppress(OSError):
            need += f.stat().st_size
    try:
        free = shutil.disk_usage(dst).free
    except OSError:
        return
    if free < need:
        from .plan import human_bytes

        raise OutputError(
            f"{dst}: needs {human_bytes(need)} for the remaining shards but only {human_bytes(free)} is "
            "free; free space or choose another output directory"
        )


@dataclass
class ShardRun:
    """What the shard workers of one run share: the plan, the job state, where to write, the
    report they fill, the options, and the progress they count (under ``lock``)."""

    plan: Plan
    state: JobState
    dst: Path
    report: Report
    opts: JobOptions
    emit: Emit
    lock: threading.Lock = field(default_factory=threading.Lock)
    total: int = 0
    shards_total: int = 0
    bytes_done: int = 0
    shards_done: int = 0

    def advance(self, nbytes: int, kind: str, name: str, shard_done: bool = False) -> None:
        """Count ``nbytes`` of input as handled and report a ``kind`` event."""
        with self.lock:
            self.bytes_done += nbytes
            self.shards_done += int(shard_done)
            ev = ProgressEvent(kind, self.bytes_done, self.total, name, self.shards_done, self.shards_total)
        self.emit(ev)

    def count(self, what: str) -> None:
        """Add one to the report's ``shards_written``/``shards_skipped``/``shards_busy``."""
        with self.lock:
            setattr(self.report, what, getattr(self.report, what) + 1)


def _run_shards(run: ShardRun, mine: list[ShardPlan]) -> None:
    p = run.plan
    run.total = sum(p.tensors[i].ref.nbytes for s in mine for i in s.tensors)
    run.shards_total = len(mine)
    run.emit(ProgressEvent("start", 0, run.total, shards_total=len(mine)))
    todo: queue.Queue[ShardPlan] = queue.Queue()
    for s in mine:
        todo.put(s)
    failure: list[BaseException] = []

    def work() -> None:
        # overlap: blocks computing on this thread and the kernel helper's (convert.BlockLine)
        # while earlier ones are written; a block's workspace holds its outputs only, the kernels'
        # scratch is per thread
        pool = WorkspacePool(POOL_OVERLAP if run.opts.overlap else 1)
        helper = _kernel_helper(run, mine, pool) if run.opts.overlap else None
        scratch = helper.scratch if helper is not None else Workspace()
        with RowReader(run.opts.backend, readahead=READAHEAD_BYTES) as reader, _shut(helper):
            while not failure:
                try:
                    shard = todo.get_nowait()
                except queue.Empty:
                    return
                shard_in = sum(p.tensors[i].ref.nbytes for i in shard.tensors)
                with run.state.lock(shard.filename) as got:
                    if not got:
                        run.count("shards_busy")
                        run.advance(shard_in, "shard_busy", shard.filename, True)
                        continue
                    # re-read under the lock: another process may have finished this shard, or the
                    # whole job (index written, state removed), since this one started
                    if completed_fingerprint(run.dst) != p.fingerprint:
                        run.state.check_ours()  # or replaced the job with another (--restart, other options)
                    entry = run.state.finished().get(shard.filename)
                    if (
                        _journaled_ok(p, shard, entry, run.dst)
                        or completed_fingerprint(run.dst) == p.fingerprint
                    ):
                        run.count("shards_skipped")
                        run.advance(shard_in, "shard_skipped", shard.filename, True)
                        continue
                    try:
                        _write_shard(run, shard, reader, pool, helper, scratch)
                    except BaseException as e:
                        failure.append(e)
                        return

    jobs = min(run.opts.jobs, max(len(mine), 1))  # more threads than shards would only idle
    if jobs <= 1:
        work()
    else:
        threads = [threading.Thread(target=work, name=f"monoquant-job-{i}") for i in range(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if failure:
        raise failure[0]


def _journaled_ok(p: Plan, shard: ShardPlan, entry: dict[str, Any] | None, dst: Path) -> bool:
    """True when ``shard`` is journaled and the file on disk still has its size and digest."""
    if entry is None:
        return False
    outputs = [o for i in shard.tensors for o in p.tensors[i].outputs]
    return entry_matches(dst / shard.filename, shard, outputs, entry)


def _two_kernel_threads(pt: PlannedTensor) -> bool:
    """Whether ``pt``'s blocks may be shared with the kernel helper thread: quantized tensors whose
    kernel works in tiles (a second block in flight costs a few MiB; the whole-block temporaries
    of NVFP4, MX, fp8-block or ``--optimize`` would raise the peak: NVFP4 passed 300 MiB of
    anonymous memory in the 384 MiB cap test). Casts are cheap: with a helper, their writer (as
    many bytes out as in) fell behind."""
    d = pt.decision
    return d.action == "quantize" and d.scheme is not None and get_kernel(d.scheme).tiled_scratch


def _kernel_helper(run: ShardRun, mine: list[ShardPlan], pool: WorkspacePool) -> KernelHelper:
    """The second kernel thread: its blocks computed in a process of its own
    (:class:`~monoquant.kernelproc.ProcessHelper`) where that is allowed and some tensor shares
    its blocks, else on the thread itself."""
    p = run.plan
    tensors = [p.tensors[i] for s in mine for i in s.tensors]
    shared = any(_mappable(pt) and _two_kernel_threads(pt) for pt in tensors)
    # one job thread: with --jobs N the process would fork beside other job threads at work
    if shared and run.opts.jobs == 1 and process_helper_allowed(run.opts.backend, run.opts.threads):
        try:
            # a block holds up to two blocks' bytes of rows (wider ones are cut elsewhere); the
            # codes take at most one byte per input byte, in the first half of the slot
            return ProcessHelper(pool.size, 2 * (2 * p.block_bytes + (1 << 19)))
        except OSError:  # no fork or no shared mapping here (limits): the thread does it
            pass
    return KernelHelper()


def _mappable(pt: PlannedTensor) -> bool:
    """Whether a kernel process could map ``pt``'s rows itself: a local safetensors file."""
    return pt.ref.is_safetensors and not isinstance(pt.ref.file, RemotePath)


def _on_copy_lane(pt: PlannedTensor, block_bytes: int) -> bool:
    """Whether ``pt`` is kept and large enough (two blocks or more) to be written on the shard's
    copy lane (:mod:`monoquant.copylane`); small ones are not worth a thread's switch."""
    return pt.decision.action == "copy" and pt.ref.nbytes >= 2 * block_bytes


@contextlib.contextmanager
def _shut(helper: KernelHelper | None) -> Iterator[None]:
    """Stop ``helper``'s thread on the way out (its last block is already collected)."""
    try:
        yield
    finally:
        if helper is not None:
            helper.shutdown()


def _write_shard(
    run: ShardRun,
    shard: ShardPlan,
    reader: RowReader,
    pool: WorkspacePool,
    helper: KernelHelper | None,
    scratch: Workspace,
) -> None:
    p, dst, stats_every = run.plan, run.dst, run.opts.stats_every
    with contextlib.suppress(OSError):
        (dst / partial_name(shard.filename)).unlink()  # stale, from a killed run (we hold the lock)
    writer = ShardWriter(dst, shard)
    # the pool bounds the blocks queued for the writer; a deeper queue only lets small outputs
    # (scales, shapes) go in without this thread waiting for the writer
    sink: SyncSink | ThreadSink = (
        ThreadSink(writer.write, depth=POOL_OVERLAP) if run.opts.overlap else SyncSink(writer.write)
    )
    outputs = [o for i in shard.tensors for o in p.tensors[i].outputs]

    def finished(pt: PlannedTensor, st: ErrorStats | None) -> None:
        with run.lock:
            if st is not None:
                run.report.stats[pt.ref.name] = st
            run.report.bytes_in += pt.ref.nbytes
            run.report.bytes_out += pt.out_bytes
        run.advance(pt.ref.nbytes, "tensor", pt.ref.name)

    # blocks of consecutive tiled tensors on both kernel threads, with no wait between tensors
    line = BlockLine(pool, helper) if helper is not None else None
    # large kept tensors go to a copy lane of their own while the kernels do the rest
    laned = {i for i in shard.tensors if run.opts.overlap and _on_copy_lane(p.tensors[i], p.block_bytes)}
    lane: CopyLane | None = None
    mine = [i for i in shard.tensors if i not in laned]
    if laned:
        lane = CopyLane(
            [p.tensors[i] for i in shard.tensors if i in laned],
            writer.write,
            backend=run.opts.backend,
            block_bytes=p.block_bytes,
            on_tensor=lambda pt: finished(pt, None),
        )
        sink.guard = lane.check  # a failed lane stops the block loop at its next block
    try:
        if lane is not None:
            lane.start()
        for k, i in enumerate(mine):
            pt = p.tensors[i]
            st = ErrorStats() if (stats_every and pt.decision.action != "copy") else None
            # a cast's error is small and uniform, and its kernel is cheap: sample it more thinly
            every = stats_every * 2 if (stats_every > 1 and pt.decision.action == "cast") else stats_every
            report = functools.partial(finished, pt, st)
            shared = line is not None and _two_kernel_threads(pt)
            if line is not None and not shared and pt.decision.action != "copy":
                line.drain()  # a one-thread kernel: the blocks held go first (a kept tensor may pass)
            process_tensor(
                pt,
                reader,
                pool,
                sink,
                block_bytes=p.block_bytes,
                clamp_fp16=p.clamp_fp16,
                stats=st,
                stats_every=every,
                line=line if shared else None,
                on_done=report if shared else None,
                scratch=scratch,
            )
            if not shared:  # finished on return; reported behind the blocks before it
                if line is not None:
                    line.after(report)
                else:
                    report()
            nxt = mine[k + 1] if k + 1 < len(mine) else None
            if nxt is None or p.tensors[nxt].ref.file != pt.ref.file:
                if line is not None:
                    line.drain()
                sink.drain()  # views of this file's mapping must be written before it is closed
        if line is not None:
            line.drain()
        sink.drain()
        if lane is not None:
            lane.join()
        size, digest = writer.finish(outputs)
    except BaseException as e:
        earlier: BaseException | None = None
        if line is not None:
            if isinstance(e, Exception) and not line.failed:
                try:  # a failure outside the line: a block before it may have failed first
                    line.drain()
                except BaseException as first:
                    earlier = first
            line.abort()
        if lane is not None:
            lane.stop()
        with contextlib.suppress(BaseException):
            sink.drain()
        writer.abort()
        if earlier is not None:
            raise earlier from None
        raise
    finally:
        sink.close()
    run.state.record(shard.filename, size, digest)
    run.count("shards_written")
    run.advance(0, "shard_done", shard.filename, True)


def _maybe_finalize(p: Plan, state: JobState, ckpt: Any, dst: Path) -> bool:
    """Write side files, config and index when every shard is journaled (any worker may)."""
    if completed_fingerprint(dst) == p.fingerprint:
        state.remove()  # this process may have (re)created it after another one finished the job
        return True
    done = state.finished()
    if any(s.filename not in done for s in p.shards):
        return False
    with state.lock("finalize") as got:
        if not got:
            return False
        if completed_fingerprint(dst) == p.fingerprint:
            return True
        for s in p.shards:
            try:
                size = (dst / s.filename).stat().st_size
            except OSError:
                size = -1
            if size != s.file_size:
                raise MonoquantError(
                    f"{dst / s.filename}: journaled as finished but missing or resized; rerun the same "
                    "command with --restart"
                )
        finalize(dst, p, ckpt.side_files, ckpt.root if ckpt.root.is_dir() else ckpt.root.parent, ckpt.config)
    state.remove()
    return True
