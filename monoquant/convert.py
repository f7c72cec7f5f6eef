"""One tensor through the kernels: read block by block, convert, hand each output block to a sink.

Both :func:`monoquant.iter_quantized` (into memory) and the shard writers of
:mod:`monoquant.jobs` (onto disk) run every tensor through :func:`process_tensor`, so the output
bytes are the same whichever way they are collected.

Example:
    >>> import torch
    >>> from monoquant.overlap import SyncSink, WorkspacePool
    >>> from monoquant.plan import make_plan
    >>> from monoquant.reader import RowReader, open_checkpoint
    >>> from safetensors.torch import save_file
    >>> from tempfile import mkdtemp
    >>> d = mkdtemp(); save_file({"l.weight": torch.ones(8, 64)}, d + "/model.safetensors")
    >>> p = make_plan(open_checkpoint(d), "int8")
    >>> got = {}
    >>> sink = SyncSink(lambda o, off, t: got.setdefault(o.name, t.clone()))
    >>> with RowReader() as rd:
    ...     process_tensor(p.tensors[0], rd, WorkspacePool(1), sink)
    >>> sorted(got)
    ['l.weight_packed', 'l.weight_scale', 'l.weight_shape']
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from .errors import decode_overflow_error, fp16_overflow_error, nonfinite_error
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
from .options import DEFAULT_BLOCK_BYTES
from .overlap import BlockTask, KernelHelper, SyncSink, ThreadSink, WorkspacePool
from .peeramax import shared_absmax
from .plan import PlannedOutput, PlannedTensor, block_rows_for
from .reader import RowReader
from .widerows import chunkable, process_wide_rows


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
    helper: KernelHelper | None = None,
    scratch: Workspace | None = None,
) -> None:
    """Read ``pt``'s input block by block, convert it, and submit every output block to ``sink``
    (in order within each output). Each block works in a workspace of ``pool`` that the sink
    returns once the block is written; consumed input pages are released then too.

    Error statistics, when ``stats`` is given, are measured on every ``stats_every``-th row of
    each block, so their cost stays small while every part of every tensor is covered.

    ``scratch``: this thread's workspace for the kernels' scratch (default: each block's own
    workspace holds it too). With ``helper``, the blocks are shared out between this thread and
    the helper's (:func:`_shared_blocks`), each with its own scratch (``helper``'s). The output
    is the same."""
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
    assert d.scheme is not None  # every decision but "copy" has one
    kernel = get_kernel(d.scheme)
    rows, _cols = as_rows(ref.shape)
    br = block_rows_for(pt, block_bytes)
    row_bytes = ref.nbytes // max(rows, 1)
    where = f"{ref.file.name}: "
    try:
        if row_bytes > 2 * block_bytes and chunkable(d.scheme):
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
                scratch=scratch,
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

        def quantize(x: torch.Tensor, ws: Workspace, st: ErrorStats | None) -> dict[str, torch.Tensor]:
            return kernel.quantize_block(
                x, tensor_scale=tscale, ws=ws, stats=st, clamp_fp16=clamp_fp16, stats_rows=stats_every
            )

        def emit(a: int, b: int, ws: Workspace, res: dict[str, torch.Tensor]) -> None:
            items = [(outs[k], _block_offset(outs[k], a), t) for k, t in res.items()]
            sink.submit(items, done(ws, a * row_bytes, b * row_bytes))

        if helper is None:
            for a in range(0, rows, br):
                b = min(a + br, rows)
                ws = pool.acquire()
                try:
                    x = reader.rows(ref, a, b, ws=ws)
                    res = quantize(x, ws.with_scratch(scratch), stats)
                except BaseException:
                    pool.release(ws)
                    raise
                del x
                emit(a, b, ws, res)
        else:
            _shared_blocks(
                rows, br, lambda a, b, ws: reader.rows(ref, a, b, ws=ws), pool, quantize, emit, stats, helper
            )
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


#: blocks of one tensor read but not yet handed to the sink, at most (each holds a workspace of
#: the pool, which must keep one more for the writer): one on each kernel thread and two waiting
#: (or finished behind an older one), so that the helper can go on while this thread computes
HELD_BLOCKS = 4


def _shared_blocks(
    rows: int,
    br: int,
    read: Callable[[int, int, Workspace], torch.Tensor],
    pool: WorkspacePool,
    quantize: Callable[[torch.Tensor, Workspace, ErrorStats | None], dict[str, torch.Tensor]],
    emit: Callable[[int, int, Workspace, dict[str, torch.Tensor]], None],
    stats: ErrorStats | None,
    helper: KernelHelper,
) -> None:
    """The block loop on two threads that never wait for each other between blocks.

    This thread reads up to :data:`HELD_BLOCKS` blocks ahead (the reader's bookkeeping stays
    here) into a :class:`~monoquant.overlap.BlockQueue` and computes one itself only when another
    is left waiting; the helper takes the next one as soon as it is free, so it goes on while this
    thread is slow (a core shared with the writer) instead of waiting for it. Blocks are emitted in order
    by this thread, so the sink sees exactly the sequence of the one-thread loop and the bytes
    are the same. Each block's statistics are its own, merged in block order: the figures do not
    depend on which thread computed what. A failure is raised here when its block's turn to be
    emitted comes (the first failing block in order, as in the one-thread loop), once the helper
    has stopped; every workspace goes back to ``pool``."""
    if pool.size <= HELD_BLOCKS:
        raise ValueError(f"the pool needs more than {HELD_BLOCKS} workspaces, it has {pool.size}")
    todo = helper.blocks

    def compute(t: BlockTask, scratch: Workspace) -> None:
        st = ErrorStats() if stats is not None else None
        try:
            assert t.x is not None  # read, not yet computed
            t.result = quantize(t.x, t.ws.with_scratch(scratch), st)
        except BaseException as e:  # raised by the reading thread, in block order
            t.error = e  # (anything: the helper's loop must go on, and the block must not pass)
        finally:
            t.x, t.stats = None, st
            t.done.set()

    held: deque[BlockTask] = deque()
    starts = iter(range(0, rows, br))
    a = next(starts, None)
    try:
        while True:
            while held and held[0].done.is_set():  # hand over what is finished, in order
                head = held[0]
                if head.error is not None:
                    raise head.error
                if head.result is None:  # done without outputs or an error: a broken kernel
                    raise RuntimeError(f"rows {head.a}:{head.b} were computed without outputs")
                held.popleft()
                if stats is not None and head.stats is not None:
                    stats.merge(head.stats)
                emit(head.a, head.b, head.ws, head.result)
            while a is not None and len(held) < HELD_BLOCKS:  # read ahead: blocks for the helper
                b = min(a + br, rows)
                ws = pool.acquire()
                try:
                    x = read(a, b, ws)
                except Exception as e:  # raised in its turn: an earlier block's failure comes first
                    failed = BlockTask(a, b, ws, None, compute)
                    failed.error = e
                    failed.done.set()
                    held.append(failed)
                    a = None
                    break
                except BaseException:
                    pool.release(ws)
                    raise
                held.append(BlockTask(a, b, ws, x, compute))
                a = next(starts, None)
                helper.share(held[-1])
            # compute one here only if another is left for the helper meanwhile (or none is to come)
            mine = todo.take() if todo.waiting() >= (2 if a is not None else 1) else None
            if mine is not None:
                mine.run(helper.scratch)
                if mine.error is not None and not isinstance(mine.error, Exception):
                    raise mine.error  # Ctrl-C here: at once, not in the block's turn
            elif held:
                held[0].done.wait()  # the oldest block is on the helper, or about to be
            else:
                break
    finally:
        if held:  # failed: blocks not started are taken back, the helper's finish first
            gone = todo.withdraw(held)
            for left in held:
                if left.on_helper and id(left) not in gone:
                    left.done.wait()
                pool.release(left.ws)


def _block_offset(out: PlannedOutput, first_row: int) -> int:
    """Where the output block of input rows from ``first_row`` starts in ``out``."""
    div = out.spec.row_div
    assert div is not None, out.name  # a block's outputs are all written row by row
    return (first_row // div) * out.spec.row_bytes


def _count_nonfinite(pt: PlannedTensor, reader: RowReader, br: int) -> int:
    rows, _ = as_rows(pt.ref.shape)
    n = 0
    for a in range(0, rows, br):
        n += int((~torch.isfinite(reader.rows(pt.ref, a, min(a + br, rows)))).sum())
    return n
