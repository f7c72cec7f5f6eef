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
from dataclasses import dataclass

import torch

from .errors import decode_overflow_error, fp16_overflow_error, nonfinite_error
from .kernelproc import BlockJob
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
    line: BlockLine | None = None,
    on_done: Callable[[], None] | None = None,
    scratch: Workspace | None = None,
) -> None:
    """Read ``pt``'s input block by block, convert it, and submit every output block to ``sink``
    (in order within each output). Each block works in a workspace of ``pool`` that the sink
    returns once the block is written; consumed input pages are released then too.

    Error statistics, when ``stats`` is given, are measured on every ``stats_every``-th row of
    each block, so their cost stays small while every part of every tensor is covered.

    ``scratch``: this thread's workspace for the kernels' scratch (default: each block's own
    workspace holds it too). With ``line`` (a tensor whose kernel works in tiles), the blocks go
    through a :class:`BlockLine` shared with the kernel helper thread, and this returns once the
    last block is read: the tensor is finished, its constants written and ``on_done`` called,
    when its last block is handed over, during a later tensor's :meth:`BlockLine.feed` or at
    :meth:`BlockLine.drain`. The output is the same. Without ``line``, ``on_done`` is not used
    (the tensor is finished on return)."""
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
    rows, cols = as_rows(ref.shape)
    br = block_rows_for(pt, block_bytes)
    row_bytes = ref.nbytes // max(rows, 1)
    try:
        if row_bytes > 2 * block_bytes and chunkable(d.scheme):
            if line is not None:  # one thread, in order: what the line holds goes first
                line.drain()
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
            if line is not None and on_done is not None:
                on_done()
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

        consts = kernel.constants(ref.shape, tscale)
        if line is not None:

            def finish() -> None:
                sink.submit([(outs[k], 0, t) for k, t in consts.items()], None)
                if on_done is not None:
                    on_done()

            def map_error(e: BaseException) -> BaseException:
                return _user_error(pt, reader, br, sink, e)

            job = BlockJob(
                scheme=d.scheme,
                tensor_scale=tscale,
                clamp_fp16=clamp_fp16,
                stats_rows=stats_every,
                stats=stats is not None,
                path=str(ref.file),
                offset=ref.offset,
                cols=cols,
                dtype=ref.dtype,
            )

            def read(a: int, b: int, ws: Workspace) -> torch.Tensor:
                x = reader.rows(ref, a, b, ws=ws)
                if job.ident is None and ref.is_safetensors:  # (set before the block is shared)
                    job.ident = reader.file_identity()
                return x

            line.feed(rows, br, read, quantize, TensorBlocks(emit, stats, map_error, finish, job))
            return
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
        sink.submit([(outs[k], 0, t) for k, t in consts.items()], None)
    except (NonFiniteError, Fp16OverflowError, DecodeOverflowError) as e:
        raise _user_error(pt, reader, br, sink, e) from None


def _user_error(
    pt: PlannedTensor, reader: RowReader, br: int, sink: SyncSink | ThreadSink, e: BaseException
) -> BaseException:
    """The one-line error of a kernel failure on ``pt`` (NaN/Inf, fp16 or decode overflow), or
    ``e`` itself for any other failure."""
    ref = pt.ref
    where = f"{ref.file.name}: "
    if isinstance(e, NonFiniteError):
        sink.drain()
        count = _count_nonfinite(pt, reader, br)
        if count == 0:  # finite in float64, beyond float32 once computed
            return decode_overflow_error(
                ref.name, "its values exceed the float32 range the kernels compute in", where
            )
        return nonfinite_error(ref.name, count, where)
    if isinstance(e, Fp16OverflowError):
        return fp16_overflow_error(ref.name, str(e), where)
    if isinstance(e, DecodeOverflowError):
        return decode_overflow_error(ref.name, str(e), where)
    return e


#: blocks of one tensor read but not yet handed to the sink, at most (each holds a workspace of
#: the pool, which must keep one more for the writer): one on each kernel thread and two waiting
#: (or finished behind an older one), so that the helper can go on while this thread computes
HELD_BLOCKS = 4


@dataclass
class TensorBlocks:
    """What :class:`BlockLine` needs to hand one tensor's blocks over: the sink call of a block,
    the tensor's statistics, how a failure becomes the user's error, and what to do once its
    last block is handed over."""

    emit: Callable[[int, int, Workspace, dict[str, torch.Tensor]], None]
    stats: ErrorStats | None
    map_error: Callable[[BaseException], BaseException] = lambda e: e
    finish: Callable[[], None] | None = None
    #: the tensor's blocks as a kernel process computes them (:mod:`monoquant.kernelproc`)
    job: BlockJob | None = None


class _After:
    """A call queued behind the blocks before it (a tensor finished, a kept tensor written)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn


class BlockLine:
    """The blocks of consecutive tensors on two kernel threads that never wait for each other.

    This thread reads up to :data:`HELD_BLOCKS` blocks ahead (the reader's bookkeeping stays
    here) into the helper's :class:`~monoquant.overlap.BlockQueue` and computes one itself only
    when another is left waiting; the helper takes the next one as soon as it is free. A tensor's
    :meth:`feed` returns once its last block is read, so the next tensor's blocks follow while the
    helper finishes its last ones: no thread waits at the end of a tensor. Blocks are handed to
    the sink in order, and each block's statistics are merged into its tensor's in block order,
    so the bytes and the figures do not depend on which thread computed what; a tensor's
    ``finish`` and the calls queued with :meth:`after` run in order behind them. A failure is
    raised when its block's turn comes (the first failing block in order, as in the one-thread
    loop). :meth:`drain` hands everything over; after a failure, :meth:`abort` stops and gives
    every workspace back to ``pool``.
    """

    def __init__(self, pool: WorkspacePool, helper: KernelHelper):
        if pool.size <= HELD_BLOCKS:
            raise ValueError(f"the pool needs more than {HELD_BLOCKS} workspaces, it has {pool.size}")
        self.pool, self.helper = pool, helper
        self._held: deque[BlockTask | _After] = deque()
        self._blocks = 0  # BlockTasks in _held
        #: a block's failure was raised (the rest is for :meth:`abort`)
        self.failed = False

    def feed(
        self,
        rows: int,
        br: int,
        read: Callable[[int, int, Workspace], torch.Tensor],
        quantize: Callable[[torch.Tensor, Workspace, ErrorStats | None], dict[str, torch.Tensor]],
        tensor: TensorBlocks,
    ) -> None:
        """Read a tensor's blocks of ``br`` rows and hand them over as they are computed; returns
        once the last one is read (its ``finish`` runs behind its blocks)."""

        def compute(t: BlockTask, scratch: Workspace) -> None:
            st = ErrorStats() if tensor.stats is not None else None
            try:
                assert t.x is not None  # read, not yet computed
                t.result = quantize(t.x, t.ws.with_scratch(scratch), st)
            except BaseException as e:  # raised by the reading thread, in block order
                t.error = e  # (anything: the helper's loop must go on, and the block must not pass)
            finally:
                t.x, t.stats = None, st
                t.done.set()

        starts = iter(range(0, rows, br))
        a = next(starts, None)
        while True:
            self._hand_over()
            while a is not None and self._blocks < HELD_BLOCKS:  # read ahead: blocks for the helper
                b = min(a + br, rows)
                ws = self.pool.acquire()
                try:
                    x = read(a, b, ws)
                except Exception as e:  # raised in its turn: an earlier block's failure comes first
                    failed = BlockTask(a, b, ws, None, compute)
                    failed.ctx = tensor
                    failed.fail(e)
                    self._push(failed)
                    a = None
                    break
                except BaseException:
                    self.pool.release(ws)
                    raise
                t = BlockTask(a, b, ws, x, compute)
                t.ctx = tensor
                self._push(t)
                a = next(starts, None)
                try:
                    self.helper.share(t)
                except Exception as e:  # the helper could not take it (no thread): fails in its turn
                    self.helper.blocks.withdraw([t])
                    if t.on_helper:  # taken after all: it completes; the failure is raised now
                        raise
                    t.fail(e)
                    a = None
                    break
            if a is None:
                if tensor.finish is not None:
                    self._held.append(_After(tensor.finish))
                return
            self._step(more=True)

    def after(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once every block held now is handed over (at once when none is)."""
        if self._held:
            self._held.append(_After(fn))
        else:
            fn()

    def drain(self) -> None:
        """Compute and hand over every block held, and run the calls queued behind them."""
        while True:
            self._hand_over()
            if not self._held:
                return
            self._step(more=False)

    def abort(self) -> None:
        """After a failure: blocks not started are taken back, the helper's finish first, and
        every workspace goes back; nothing more is handed over."""
        blocks = [t for t in self._held if isinstance(t, BlockTask)]
        self._held.clear()
        self._blocks = 0
        gone = self.helper.blocks.withdraw(blocks)
        for t in blocks:
            if t.on_helper and id(t) not in gone:
                t.done.wait()
            self.pool.release(t.ws)

    def _push(self, t: BlockTask) -> None:
        self._held.append(t)
        self._blocks += 1

    def _hand_over(self) -> None:
        """Hand over what is finished, in order, up to the first block still being computed."""
        held = self._held
        while held:
            head = held[0]
            if isinstance(head, _After):
                held.popleft()
                try:
                    head.fn()
                except BaseException:  # (a progress callback): nothing more is handed over
                    self.failed = True
                    raise
                continue
            if not head.done.is_set():
                return
            ctx = head.ctx
            assert isinstance(ctx, TensorBlocks)
            if head.error is not None:
                self.failed = True
                raise ctx.map_error(head.error)
            if head.result is None:  # done without outputs or an error: a broken kernel
                self.failed = True
                raise RuntimeError(f"rows {head.a}:{head.b} were computed without outputs")
            held.popleft()
            self._blocks -= 1
            if ctx.stats is not None and head.stats is not None:
                ctx.stats.merge(head.stats)
            ctx.emit(head.a, head.b, head.ws, head.result)

    def _step(self, more: bool) -> None:
        """Compute a waiting block here if another is left for the helper meanwhile (or, with
        no ``more`` blocks to come, any), else wait for the oldest block."""
        todo = self.helper.blocks
        mine = todo.take() if todo.waiting() >= (2 if more else 1) else None
        if mine is not None:
            mine.run(self.helper.scratch)
            if mine.error is not None and not isinstance(mine.error, Exception):
                raise mine.error  # Ctrl-C here: at once, not in the block's turn
            return
        head = self._held[0]  # after _hand_over: a block still being computed, by the helper
        assert isinstance(head, BlockTask)
        head.done.wait()


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
