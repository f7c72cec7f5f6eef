"""The streaming pipeline: plan, then per shard read → quantize → write → journal, then index.

Example:
    >>> import monoquant
    >>> report = monoquant.stream("ckpt/", "out/", "int8", on_progress=print)  # doctest: +SKIP
    >>> report.complete, report.bits_per_weight                                  # doctest: +SKIP
    (True, 8.0039)
    >>> for name, t in monoquant.iter_quantized("ckpt/", "int4"):               # doctest: +SKIP
    ...     print(name, t.dtype, tuple(t.shape))
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MonoquantError, OptionError, OutputError, SchemeError
from .formats import shared_absmax
from .inmemory import decode_overflow_error, fp16_overflow_error, nonfinite_error
from .journal import JobState, check_writable, entry_matches
from .kernels import (
    DecodeOverflowError,
    ErrorStats,
    Fp16OverflowError,
    NonFiniteError,
    Workspace,
    absmax,
    as_rows,
    get_kernel,
)
from .memwatch import MemWatch
from .outdir import check_paths, completed_fingerprint, finalize
from .overlap import SpareCoreProbe, SyncSink, ThreadSink, WorkspacePool
from .ownership import check_state_dir, finished_files, planned_files, present_files, refuse_foreign
from .plan import (
    DEFAULT_BLOCK_BYTES,
    DEFAULT_MAX_SHARD,
    INDEX_NAME,
    Plan,
    PlannedOutput,
    PlannedTensor,
    ShardPlan,
    block_rows_for,
    make_plan,
)
from .prefetch import READAHEAD_BYTES
from .reader import Backend, RowReader, open_checkpoint
from .remote import is_remote, pin_inputs, refuse_remote_output
from .rules import Rules
from .schemes import Scheme
from .widerows import chunkable, process_wide_rows
from .writer import ShardWriter


@dataclass(frozen=True)
class ProgressEvent:
    """What the pipeline reports through ``on_progress``.

    Attributes:
        kind: ``start`` (totals known), ``tensor`` (a tensor finished), ``shard_done``,
            ``shard_skipped`` (already finished earlier), ``shard_busy`` (another process holds
            it), ``finalized`` (index written), ``done``.
        bytes_done, bytes_total: input bytes handled so far / in total for this run.
        name: tensor name (``tensor``) or shard file name (``shard_*``).
        shards_done, shards_total: shard counts for this run.
    """

    kind: str
    bytes_done: int = 0
    bytes_total: int = 0
    name: str = ""
    shards_done: int = 0
    shards_total: int = 0


@dataclass
class Report:
    """What a :func:`stream` run did.

    ``bytes_in``/``bytes_out`` count what this run processed (skipped shards excluded);
    ``plan`` holds the totals of the whole job. ``stats`` maps quantized/cast tensor names to
    their reconstruction error (when computed).
    """

    output: str
    fingerprint: str
    scheme: str
    complete: bool
    plan: dict[str, Any]
    shards_written: int = 0
    shards_skipped: int = 0
    shards_busy: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    memory: dict[str, int | None] = field(default_factory=dict)
    stats: dict[str, ErrorStats] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    #: things the user should know that are not errors (files of the input that were ignored)
    notes: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float | None:
        return self.plan.get("bits_per_weight")

    @property
    def gb_per_s(self) -> float:
        return self.bytes_in / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def worst(self, n: int = 5) -> list[tuple[str, ErrorStats]]:
        """The ``n`` tensors with the lowest SQNR."""
        return sorted(self.stats.items(), key=lambda kv: kv[1].sqnr_db)[:n]

    def mean_sqnr(self) -> float | None:
        vals = [s.sqnr_db for s in self.stats.values() if s.err_sq > 0]
        return sum(vals) / len(vals) if vals else None

    def to_json(self) -> dict[str, Any]:
        m = self.mean_sqnr()
        return {
            "output": self.output,
            "complete": self.complete,
            "scheme": self.scheme,
            "fingerprint": self.fingerprint,
            "plan": self.plan,
            "shards_written": self.shards_written,
            "shards_skipped": self.shards_skipped,
            "shards_busy": self.shards_busy,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "seconds": round(self.seconds, 3),
            "gb_per_s": round(self.gb_per_s, 4),
            "memory": self.memory,
            "settings": self.settings,
            "notes": self.notes,
            "mean_sqnr_db": round(m, 3) if m is not None else None,
            "worst": [{"name": n, **s.to_dict()} for n, s in self.worst(10)],
            "tensors": {n: s.to_dict() for n, s in self.stats.items()},
        }


# ---- one tensor ----------------------------------------------------------------------------------
def process_tensor(
    pt: PlannedTensor,
    reader: RowReader,
    pool: WorkspacePool,
    sink: SyncSink | ThreadSink,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    clamp_fp16: bool = False,
    stats: ErrorStats | None = None,
    stats_every: int = 1,
) -> None:
    """Read ``pt``'s input block by block, convert it, and submit every output block to ``sink``
    (in order within each output). Each block works in a workspace of ``pool`` that the sink
    returns once the block is written; consumed input pages are released then too.

    Error statistics, when ``stats`` is given, are measured on every ``stats_every``-th row of
    each block, so their cost stays small while every part of every tensor is covered."""
    ref, d = pt.ref, pt.decision

    def done(ws: Workspace, lo: int, hi: int) -> Callable[[], None]:
        def cb() -> None:
            reader.release(ref, lo, hi)
            pool.release(ws)

        return cb

    if d.action == "copy":
        out = pt.outputs[0]
        step = max(block_bytes, 1)
        for off in range(0, ref.nbytes, step):
            n = min(step, ref.nbytes - off)
            ws = pool.acquire()
            try:
                data = reader.raw(ref, off, n, ws=ws)
            except BaseException:
                pool.release(ws)
                raise
            sink.submit([(out, off, data)], done(ws, off, off + n))
        return
    kernel = get_kernel(d.scheme)  # type: ignore[arg-type]
    rows, cols = as_rows(ref.shape)
    br = block_rows_for(pt, block_bytes)
    row_bytes = ref.nbytes // max(rows, 1)
    where = f"{ref.file.name}: "
    try:
        if row_bytes > 2 * block_bytes and chunkable(d.scheme):  # type: ignore[arg-type]
            process_wide_rows(
                pt,
                reader,
                pool,
                sink,
                block_bytes=block_bytes,
                clamp_fp16=clamp_fp16,
                stats=stats,
                stats_every=stats_every,
                done=done,
            )
            return
        tscale = None
        if kernel.needs_absmax:
            amax = 0.0
            for a in range(0, rows, br):
                b = min(a + br, rows)
                amax = max(amax, absmax(reader.rows(ref, a, b)))
            if pt.shared:  # NVFP4: the tensors of a fused layer share one global scale
                amax = max(amax, shared_absmax(pt.shared, ref, br))
            tscale = kernel.tensor_scale(amax, ref.dtype)
        outs = {o.spec.suffix: o for o in pt.outputs}
        for a in range(0, rows, br):
            b = min(a + br, rows)
            ws = pool.acquire()
            try:
                x = reader.rows(ref, a, b, ws=ws)
                res = kernel.quantize_block(
                    x, tensor_scale=tscale, ws=ws, stats=stats, clamp_fp16=clamp_fp16, stats_rows=stats_every
                )
            except BaseException:
                pool.release(ws)
                raise
            del x
            items = [
                (outs[k], (a // outs[k].spec.row_div) * outs[k].spec.row_bytes, t) for k, t in res.items()
            ]  # type: ignore[operator]
            sink.submit(items, done(ws, a * row_bytes, b * row_bytes))
        consts = kernel.constants(ref.shape, tscale)
        sink.submit([(outs[k], 0, t) for k, t in consts.items()], None)
    except NonFiniteError:
        sink.drain()
        count = _count_nonfinite(pt, reader, br)
        if count == 0:  # finite in float64, beyond float32 once computed
            raise decode_overflow_error(
                ref.name, "its values exceed the float32 range the kernels compute in", where
            ) from None
        raise nonfinite_error(ref.name, count, where) from None
    except Fp16OverflowError as e:
        raise fp16_overflow_error(ref.name, str(e), where) from None
    except DecodeOverflowError as e:
        raise decode_overflow_error(ref.name, str(e), where) from None


def _count_nonfinite(pt: PlannedTensor, reader: RowReader, br: int) -> int:
    rows, _ = as_rows(pt.ref.shape)
    n = 0
    for a in range(0, rows, br):
        n += int((~torch.isfinite(reader.rows(pt.ref, a, min(a + br, rows)))).sum())
    return n


# ---- public entry points -------------------------------------------------------------------------
def plan(
    src: str | os.PathLike[str],
    scheme: str | Scheme = "int8",
    *,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    clamp_fp16: bool = False,
    target_bpw: float | None = None,
    min_sqnr: float | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    strict_group_size: bool = False,
    **scheme_options: Any,
) -> Plan:
    """Plan a run (what ``--dry-run`` prints). See :func:`stream` for arguments.

    From headers only, except with ``target_bpw``/``min_sqnr``: mixed precision estimates each
    tensor's error on sampled rows first (bounded memory)."""
    return _make_plan(
        open_checkpoint(src),
        scheme,
        Rules.of(include, exclude, strict_group_size),
        max_shard_size,
        clamp_fp16,
        target_bpw,
        min_sqnr,
        block_bytes,
        scheme_options,
    )


def _make_plan(
    ckpt: Any,
    scheme: str | Scheme,
    rules: Rules,
    max_shard_size: int | str,
    clamp_fp16: bool,
    target_bpw: float | None,
    min_sqnr: float | None,
    block_bytes: int,
    scheme_options: dict[str, Any],
) -> Plan:
    chooser = None
    extra: dict[str, Any] = {}
    check_counts(block_bytes=block_bytes)
    for opt, v in (("target_bpw", target_bpw), ("min_sqnr", min_sqnr)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise OptionError(f"{opt}={v!r}: must be a number")
    if target_bpw is not None or min_sqnr is not None:
        from .mixed import budget_chooser
        from .schemes import get_scheme

        if get_scheme(scheme, **scheme_options).kind == "cast":
            raise SchemeError(
                f"{'--target-bpw' if target_bpw is not None else '--min-sqnr'} chooses among int4/int8 storages: it "
                "needs an int scheme (--int4 or --int8), not a cast"
            )

        chooser = budget_chooser(
            ckpt, get_scheme(scheme, **scheme_options), rules, target_bpw=target_bpw, min_sqnr=min_sqnr
        )
        extra = {"mixed": chooser.summary["options"]}
    p = make_plan(
        ckpt,
        scheme,
        rules=rules,
        max_shard_size=max_shard_size,
        clamp_fp16=clamp_fp16,
        chooser=chooser,
        block_bytes=block_bytes,
        extra=extra,
        **scheme_options,
    )
    if chooser is not None:
        p.extra["mixed_summary"] = chooser.summary
    return p


def iter_quantized(
    src: str | os.PathLike[str],
    scheme: str | Scheme = "int8",
    *,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    clamp_fp16: bool = False,
    backend: Backend = "mmap",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    strict_group_size: bool = False,
    **scheme_options: Any,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` output pairs lazily, in plan order, one input tensor at a time.

    Memory is bounded by the largest tensor's outputs (each yielded tensor is a fresh one).

    Example:
        >>> for name, t in iter_quantized("ckpt/", "int4", group_size=64):   # doctest: +SKIP
        ...     print(name, t.dtype, tuple(t.shape))
    """
    p = plan(
        src,
        scheme,
        include=include,
        exclude=exclude,
        clamp_fp16=clamp_fp16,
        block_bytes=block_bytes,
        strict_group_size=strict_group_size,
        **scheme_options,
    )
    pool = WorkspacePool(1)
    with RowReader(backend) as reader:
        for pt in p.tensors:
            bufs = {o.name: torch.empty(o.nbytes, dtype=torch.uint8) for o in pt.outputs}

            def write(
                o: PlannedOutput, off: int, t: torch.Tensor, bufs: dict[str, torch.Tensor] = bufs
            ) -> None:
                flat = t.contiguous().reshape(-1).view(torch.uint8)
                bufs[o.name][off : off + flat.numel()].copy_(flat)

            process_tensor(pt, reader, pool, SyncSink(write), block_bytes=block_bytes, clamp_fp16=clamp_fp16)
            for o in pt.outputs:
                yield o.name, bufs[o.name].view(o.spec.dtype).view(o.spec.shape)


def parse_worker(worker: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``."""
    if worker is None:
        return 0, 1
    if isinstance(worker, tuple):
        k, n = worker
    else:
        try:
            ks, ns = str(worker).split("/")
            k, n = int(ks), int(ns)
        except ValueError:
            raise OutputError(
                f"--worker {worker!r}: write K/N, e.g. 0/4 for the first of four workers"
            ) from None
    if not (n >= 1 and 0 <= k < n):
        raise OutputError(f"--worker {k}/{n}: K must be in 0..N-1")
    return k, n


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


def stream(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    scheme: str | Scheme = "int8",
    *,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    clamp_fp16: bool = False,
    target_bpw: float | None = None,
    min_sqnr: float | None = None,
    worker: str | tuple[int, int] | None = None,
    jobs: int = 1,
    restart: bool = False,
    backend: Backend = "mmap",
    threads: int | None = 1,
    stats: str | bool = "exact",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    overlap: bool | str = "auto",
    on_progress: Callable[[ProgressEvent], None] | None = None,
    strict_group_size: bool = False,
    **scheme_options: Any,
) -> Report:
    """Quantize a checkpoint into ``dst`` shard by shard, with bounded memory, resumably.

    Args:
        src: checkpoint file or directory (safetensors, sharded with an index, or torch zip).
        dst: output directory (created; must not be, contain, or lie inside ``src``).
        scheme: preset name or Scheme; ``scheme_options`` as in :func:`~monoquant.get_scheme`.
        include, exclude: glob overrides of the default tensor rules.
        max_shard_size: output shard size cap (bytes or ``"5GB"``).
        clamp_fp16: saturate fp16 casts instead of failing on overflow.
        target_bpw: mixed precision: per tensor, choose among int4 g32/g64/g128, int8 and the
            original dtype the storage that meets this many bits per weight (over the tensors the
            rules quantize) with the least estimated total error.
        min_sqnr: mixed precision: per tensor, the smallest storage whose estimated SQNR reaches
            this many dB (exclusive with ``target_bpw``).
        worker: ``"K/N"``: process only shards ``i`` with ``i % N == K``; workers share nothing
            but ``dst``; whichever sees every shard done writes the index.
        jobs: shards processed concurrently by this process (threads).
        restart: discard unfinished state of a different job in ``dst``.
        backend: ``mmap`` or ``pread`` for reading safetensors input.
        threads: torch intra-op threads during the run (``None`` leaves the setting alone).
        stats: per-tensor error statistics (SQNR, relative and max abs error) measured during the
            run: ``"exact"`` (default: every row, the figures ``monoquant verify --against``
            measures, so the worst tensors agree; about 0.5 s of CPU per GB of bf16 input over
            no statistics, see docs/benchmarks.md), ``"sample"`` (every 8th row, every 16th for casts: cheaper, but an
            estimate: a tensor whose error sits in a few rows can read a few dB better than it is
            and be missing from the worst list) or ``"off"``.
        block_bytes: input bytes per processing block (memory vs. speed; output unchanged).
        overlap: write and hash blocks on a background thread while the next block is computed:
            ``True``, ``False``, or ``"auto"`` (default: on when a CPU core is idle at the start;
            it made runs 10-40% faster on a quiet 2-core machine and slower on busy cores, see
            docs/benchmarks.md). The output bytes are the same either way.
        on_progress: called with :class:`ProgressEvent` (from worker threads, serialized).
        strict_group_size: leave tensors whose columns are not a multiple of the group size dense
            (default: quantize them with the largest halved group size that divides them).

    Returns:
        A :class:`Report`.

    Raises:
        MonoquantError: bad input, bad options, unusable output directory, disk full,
            NaN/Inf weights — always with the file/tensor and what to do.
    """
    t0 = time.perf_counter()
    check_counts(jobs=jobs, threads=threads, block_bytes=block_bytes)
    stats_every = _stats_stride(stats)
    probe = SpareCoreProbe() if overlap == "auto" else None  # measures the CPUs while the plan is made
    if probe is None and not isinstance(overlap, bool):
        raise OutputError(f"overlap={overlap!r}: use True, False or 'auto'")
    refuse_remote_output(dst)
    dst_p = Path(dst)
    ckpt = open_checkpoint(src)
    if not is_remote(src):
        check_paths(Path(src), dst_p)
    p = _make_plan(
        ckpt,
        scheme,
        Rules.of(include, exclude, strict_group_size),
        max_shard_size,
        clamp_fp16,
        target_bpw,
        min_sqnr,
        block_bytes,
        scheme_options,
    )
    k, n = parse_worker(worker)
    overlap = probe.result() if probe is not None else bool(overlap)
    report = Report(str(dst_p), p.fingerprint, p.scheme.name, False, p.totals())
    report.notes = list(getattr(ckpt, "notes", []))
    report.settings = {
        "overlap": overlap,
        "stats": stats if isinstance(stats, str) else ("exact" if stats else "off"),
        "backend": backend,
        "threads": threads,
        "jobs": jobs,
        "block_bytes": block_bytes,
        "worker": f"{k}/{n}",
    }
    lock = threading.Lock()

    def emit(ev: ProgressEvent) -> None:
        if on_progress is not None:
            with lock:
                on_progress(ev)

    side = side_relpaths(ckpt)
    with MemWatch() as mw, torch_threads(threads):
        if _already_complete(dst_p, p, restart, side):
            report.complete = True
        else:
            check_writable(dst_p)
            state = JobState(dst_p, p, side)
            state.prepare(restart)
            pin_inputs(state.dir, ckpt.files)
            mine = [s for s in p.shards if s.index % n == k]
            _check_space(dst_p, mine, state, ckpt)
            _run_shards(
                p,
                mine,
                state,
                dst_p,
                report,
                emit,
                jobs=jobs,
                backend=backend,
                stats_every=stats_every,
                overlap=overlap,
            )
            report.complete = _maybe_finalize(p, state, ckpt, dst_p)
            if report.complete:
                emit(ProgressEvent("finalized", name=INDEX_NAME))
    report.memory = mw.report()
    report.seconds = time.perf_counter() - t0
    emit(ProgressEvent("done", report.bytes_in, report.bytes_in))
    return report


STATS_SAMPLE_EVERY = 8


def check_counts(**counts: Any) -> None:
    """Each given count must be a positive int (``None`` allowed for ``threads``)."""
    for name, v in counts.items():
        if v is None and name == "threads":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OptionError(f"{name}={v!r}: must be a positive integer")


def _stats_stride(stats: str | bool) -> int:
    """Blocks per measured block (0: no statistics)."""
    if stats is True or stats == "exact":
        return 1
    if stats is False or stats == "off":
        return 0
    if stats == "sample":
        return STATS_SAMPLE_EVERY
    raise OutputError(f"stats={stats!r}: use 'sample', 'exact' or 'off'")


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
                f"{dst} holds a finished model of another job (other input or options); choose another output "
                "directory or add --restart to replace it"
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
            f"{dst}: needs {human_bytes(need)} for the remaining shards but only {human_bytes(free)} is free; "
            "free space or choose another output directory"
        )


def _run_shards(
    p: Plan,
    mine: list[ShardPlan],
    state: JobState,
    dst: Path,
    report: Report,
    emit: Callable[[ProgressEvent], None],
    *,
    jobs: int,
    backend: Backend,
    stats_every: int,
    overlap: bool,
) -> None:
    total = sum(p.tensors[i].ref.nbytes for s in mine for i in s.tensors)
    progress = {"bytes": 0, "shards": 0}
    plock = threading.Lock()
    emit(ProgressEvent("start", 0, total, shards_total=len(mine)))
    todo: queue.Queue[ShardPlan] = queue.Queue()
    for s in mine:
        todo.put(s)
    failure: list[BaseException] = []

    def advance(nbytes: int, kind: str, name: str, shard_done: bool = False) -> None:
        with plock:
            progress["bytes"] += nbytes
            progress["shards"] += int(shard_done)
            ev = ProgressEvent(kind, progress["bytes"], total, name, progress["shards"], len(mine))
        emit(ev)

    def work() -> None:
        pool = WorkspacePool(2 if overlap else 1)  # 2: one block computing, one writing (3 thrashed caches)
        with RowReader(backend, readahead=READAHEAD_BYTES) as reader:
            while not failure:
                try:
                    shard = todo.get_nowait()
                except queue.Empty:
                    return
                shard_in = sum(p.tensors[i].ref.nbytes for i in shard.tensors)
                with state.lock(shard.filename) as got:
                    if not got:
                        with plock:
                            report.shards_busy += 1
                        advance(shard_in, "shard_busy", shard.filename, True)
                        continue
                    # re-read under the lock: another process may have finished this shard, or the
                    # whole job (index written, state removed), since this one started
                    if completed_fingerprint(dst) != p.fingerprint:
                        state.check_ours()  # or replaced the job with another (--restart, other options)
                    entry = state.finished().get(shard.filename)
                    if _journaled_ok(p, shard, entry, dst) or completed_fingerprint(dst) == p.fingerprint:
                        with plock:
                            report.shards_skipped += 1
                        advance(shard_in, "shard_skipped", shard.filename, True)
                        continue
                    try:
                        _write_shard(
                            p, shard, state, dst, reader, pool, report, plock, advance, stats_every, overlap
                        )
                    except BaseException as e:
                        failure.append(e)
                        return

    jobs = min(jobs, max(len(mine), 1))  # more threads than shards would only idle
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


def _write_shard(
    p: Plan,
    shard: ShardPlan,
    state: JobState,
    dst: Path,
    reader: RowReader,
    pool: WorkspacePool,
    report: Report,
    plock: threading.Lock,
    advance: Callable[..., None],
    stats_every: int,
    overlap: bool,
) -> None:
    with contextlib.suppress(OSError):
        (dst / (shard.filename + ".partial")).unlink()  # stale, from a killed run (we hold the lock)
    writer = ShardWriter(dst, shard)
    sink: SyncSink | ThreadSink = ThreadSink(writer.write) if overlap else SyncSink(writer.write)
    outputs: list[PlannedOutput] = []
    try:
        for k, i in enumerate(shard.tensors):
            pt = p.tensors[i]
            st = ErrorStats() if (stats_every and pt.decision.action != "copy") else None
            # a cast's error is small and uniform, and its kernel is cheap: sample it more thinly
            every = stats_every * 2 if (stats_every > 1 and pt.decision.action == "cast") else stats_every
            process_tensor(
                pt,
                reader,
                pool,
                sink,
                block_bytes=p.block_bytes,
                clamp_fp16=p.clamp_fp16,
                stats=st,
                stats_every=every,
            )
            nxt = shard.tensors[k + 1] if k + 1 < len(shard.tensors) else None
            if nxt is None or p.tensors[nxt].ref.file != pt.ref.file:
                sink.drain()  # views of this file's mapping must be written before it is closed
            outputs.extend(pt.outputs)
            with plock:
                if st is not None:
                    report.stats[pt.ref.name] = st
                report.bytes_in += pt.ref.nbytes
                report.bytes_out += pt.out_bytes
            advance(pt.ref.nbytes, "tensor", pt.ref.name)
        sink.drain()
        size, digest = writer.finish(outputs)
    except BaseException:
        with contextlib.suppress(BaseException):
            sink.drain()
        writer.abort()
        raise
    finally:
        sink.close()
    state.record(shard.filename, size, digest)
    with plock:
        report.shards_written += 1
    advance(0, "shard_done", shard.filename, True)


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
                    f"{dst / s.filename}: journaled as finished but missing or resized; rerun the same command "
                    "with --restart"
                )
        finalize(dst, p, ckpt.side_files, ckpt.root if ckpt.root.is_dir() else ckpt.root.parent, ckpt.config)
    state.remove()
    return True
