"""Kept tensors written on a thread of their own while the kernels work on the rest of the shard.

A tensor kept as it is (the ``copy`` decision: embeddings and ``lm_head`` by default, norms,
biases) needs no compute: its bytes go from the input to the output shard. In the block loop,
the kernel threads sat idle while the writer copied them, and in a Llama-style checkpoint the
kept embeddings and ``lm_head`` are an eighth to a quarter of the bytes. With overlap on,
:func:`monoquant.jobs` hands a shard's kept tensors to a :class:`CopyLane`: one thread, with its
own reader (its own mapping of the input files, its own read-ahead), that writes them through
the shard's :class:`~monoquant.writer.ShardWriter` at their planned offsets while the block loop
quantizes the others.

The output bytes and the shard digest are the same: every byte has its planned place whoever
writes it, and each output's CRC-32 runs over that output's bytes in order, on the one thread
that writes them. The shard is finished (fsynced, renamed, journaled) only once both are done;
a failure on either side stops the other and removes the partial file, as before.

Example:
    >>> import torch
    >>> from tempfile import mkdtemp
    >>> from safetensors.torch import save_file
    >>> from monoquant.plan import make_plan
    >>> from monoquant.reader import open_checkpoint
    >>> d = mkdtemp(); save_file({"norm.weight": torch.ones(64)}, d + "/model.safetensors")
    >>> p = make_plan(open_checkpoint(d), "int8")
    >>> got = {}
    >>> lane = CopyLane(p.tensors, lambda o, off, t: got.setdefault(o.name, t.clone()))
    >>> lane.start(); lane.join()
    >>> got["norm.weight"].view(torch.float32).tolist() == [1.0] * 64
    True
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from .convert import process_tensor
from .options import DEFAULT_BLOCK_BYTES
from .overlap import SyncSink, WorkspacePool, Write
from .plan import PlannedTensor
from .prefetch import READAHEAD_BYTES
from .reader import Backend, RowReader


class _Stopped(Exception):
    """The lane was told to stop (the shard failed elsewhere)."""


class CopyLane:
    """Writes ``tensors`` (all ``copy`` decisions) with ``write`` on a thread of its own, from
    :meth:`start` on. :meth:`check` raises the lane's error as soon as it has one, so the shard's
    block loop can stop at once (``sink.guard = lane.check``) instead of finding out at the end.

    Args:
        tensors: the kept tensors, in the order to write them.
        write: the shard writer's ``write(output, offset, tensor)``.
        backend: how the lane reads its input (``mmap`` or ``pread``).
        block_bytes: bytes per write.
        on_tensor: called on the lane's thread after each tensor is written.
    """

    def __init__(
        self,
        tensors: Sequence[PlannedTensor],
        write: Write,
        *,
        backend: Backend = "mmap",
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        on_tensor: Callable[[PlannedTensor], None] | None = None,
    ):
        self._tensors = list(tensors)
        self._write = write
        self._backend: Backend = backend
        self._block_bytes = block_bytes
        self._on_tensor = on_tensor
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="monoquant-copy", daemon=True)

    def start(self) -> None:
        """Start the thread. Separate from construction, so that whoever holds the lane can
        always stop it: an interrupt may arrive while ``start`` waits for the thread."""
        self._thread.start()

    def check(self) -> None:
        """Raise the lane's error, if it has failed (any thread may call this)."""
        if self._error is not None:
            raise self._error

    def _stopped(self) -> None:
        if self._stop.is_set():
            raise _Stopped

    def _run(self) -> None:
        try:
            with RowReader(self._backend, readahead=READAHEAD_BYTES) as reader:
                sink = SyncSink(self._write)
                sink.guard = self._stopped  # refuses the next block once the lane is told to stop
                pool = WorkspacePool(1)
                for pt in self._tensors:
                    process_tensor(pt, reader, pool, sink, block_bytes=self._block_bytes)
                    if self._on_tensor is not None:
                        self._on_tensor(pt)
        except _Stopped:
            pass
        except BaseException as e:  # raised by join() on the shard's thread
            self._error = e

    def join(self) -> None:
        """Wait until every kept tensor is written; raise the lane's error, if any."""
        self._thread.join()
        self.check()

    def stop(self) -> None:
        """Stop after the block being written and wait for the thread, if it was started
        (errors are dropped: the shard failed already)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
