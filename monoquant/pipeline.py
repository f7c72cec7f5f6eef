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

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .convert import process_tensor
from .jobs import run_job
from .options import DEFAULT_BLOCK_BYTES, DEFAULT_MAX_SHARD, job_options, resolve
from .outdir import check_paths
from .overlap import SpareCoreProbe, SyncSink, WorkspacePool
from .plan import Plan, PlannedOutput, build_plan
from .reader import Backend, RowReader, open_checkpoint
from .remote import is_remote, refuse_remote_output
from .report import ProgressEvent, Report
from .schemes import Scheme


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
    sch, opts = resolve(
        scheme,
        scheme_options,
        include=include,
        exclude=exclude,
        strict_group_size=strict_group_size,
        max_shard_size=max_shard_size,
        clamp_fp16=clamp_fp16,
        block_bytes=block_bytes,
        target_bpw=target_bpw,
        min_sqnr=min_sqnr,
    )
    return build_plan(open_checkpoint(src), sch, opts)


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
    sch, opts = resolve(
        scheme,
        scheme_options,
        include=include,
        exclude=exclude,
        strict_group_size=strict_group_size,
        clamp_fp16=clamp_fp16,
        block_bytes=block_bytes,
    )
    p = build_plan(open_checkpoint(src), sch, opts)
    pool = WorkspacePool(1)
    with RowReader(backend) as reader:
        for pt in p.tensors:
            bufs = {o.name: torch.empty(o.nbytes, dtype=torch.uint8) for o in pt.outputs}

            def write(
                o: PlannedOutput, off: int, t: torch.Tensor, bufs: dict[str, torch.Tensor] = bufs
            ) -> None:
                flat = t.contiguous().reshape(-1).view(torch.uint8)
                bufs[o.name][off : off + flat.numel()].copy_(flat)

            process_tensor(
                pt, reader, pool, SyncSink(write), block_bytes=opts.block_bytes, clamp_fp16=opts.clamp_fp16
            )
            for o in pt.outputs:
                yield o.name, bufs[o.name].view(o.spec.dtype).view(o.spec.shape)


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
            measures, so the worst tensors agree; 0.25-0.6 s of wall time per GB of bf16 input
            more than sampling, see docs/benchmarks.md), ``"sample"`` (every 8th row, every 16th for
            casts: cheaper, but an estimate: a tensor whose error sits in a few rows can read a few
            dB better than it is and be missing from the worst list) or ``"off"``.
        block_bytes: input bytes per processing block (memory vs. speed; output unchanged).
        overlap: use a second core: write and hash blocks on a background thread while the next
            block is computed, and share each tensor's blocks with a kernel helper thread (the
            tiled integer and fp8 kernels; whichever thread is free takes the next block):
            ``True``, ``False``, or ``"auto"`` (default: on when a CPU core is idle at the start;
            faster on a quiet 2-core machine, slower on busy cores, see docs/benchmarks.md). The
            output bytes are the same either way; the statistics are the same figures summed in
            another order (block by block, in block order: the same every run).
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
    # overlap="auto": the CPUs are sampled while the plan is made instead of sleeping for it
    probe = SpareCoreProbe() if overlap == "auto" else None
    sch, opts = resolve(
        scheme,
        scheme_options,
        include=include,
        exclude=exclude,
        strict_group_size=strict_group_size,
        max_shard_size=max_shard_size,
        clamp_fp16=clamp_fp16,
        block_bytes=block_bytes,
        target_bpw=target_bpw,
        min_sqnr=min_sqnr,
    )
    job = job_options(
        worker=worker,
        jobs=jobs,
        restart=restart,
        backend=backend,
        threads=threads,
        stats=stats,
        overlap=False if probe is not None else overlap,
    )
    refuse_remote_output(dst)
    dst_p = Path(dst)
    ckpt = open_checkpoint(src)
    if not is_remote(src):
        check_paths(Path(src), dst_p)
    p = build_plan(ckpt, sch, opts)
    if probe is not None:
        job = dataclasses.replace(job, overlap=probe.result())
    report = Report(
        str(dst_p),
        p.fingerprint,
        p.scheme.name,
        False,
        p.totals(),
        notes=list(ckpt.notes),
        settings=job.settings(p.block_bytes),
        schemes=p.schemes_used() or {p.scheme.name: p.scheme},
    )
    lock = threading.Lock()

    def emit(ev: ProgressEvent) -> None:
        if on_progress is not None:
            with lock:
                on_progress(ev)

    run_job(ckpt, p, dst_p, job, report, emit)
    report.seconds = time.perf_counter() - t0
    emit(ProgressEvent("done", report.bytes_in, report.bytes_in))
    return report
