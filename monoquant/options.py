"""Options resolved once: the public functions' keyword arguments, checked and turned into values.

:func:`monoquant.stream`, :func:`monoquant.plan` and :func:`monoquant.iter_quantized` take plain
keyword arguments (the CLI passes its flags through them). They resolve them here, once, into a
:class:`~monoquant.schemes.Scheme` and frozen option values; everything below them takes only
those values. A bad option is reported before any file is opened.

* :class:`PlanOptions`: what decides the output bytes besides the scheme (rules, shard size, fp16
  clamping, mixed-precision target) and the block size, for :func:`monoquant.plan.build_plan`.
* :class:`JobOptions`: how a run goes (worker slice, threads, statistics, overlap), for
  :mod:`monoquant.jobs`; none of it changes the output bytes.

Example:
    >>> scheme, opts = resolve("int4", {"group_size": 64}, max_shard_size="2GB", exclude="lm_head*")
    >>> scheme.name, opts.max_shard_size, opts.rules.exclude, opts.mixed
    ('int4-g64', 2000000000, ('lm_head*',), False)
    >>> job = job_options(worker="1/4", stats="sample", overlap=False)
    >>> job.worker, job.stats_every, job.settings(opts.block_bytes)["worker"]
    ((1, 4), 8, '1/4')
    >>> try:
    ...     resolve("fp16", {}, target_bpw=4.5)
    ... except SchemeError as e:
    ...     print(e)
    --target-bpw chooses among int4/int8 storages: it needs an int scheme (--int4 or --int8), not a cast
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import OptionError, OutputError, SchemeError
from .reader import Backend
from .rules import Rules
from .schemes import Scheme, get_scheme

DEFAULT_MAX_SHARD = 5 * 1000**3
DEFAULT_BLOCK_BYTES = 4 * 1024 * 1024
#: ``stats="sample"``: blocks per measured block (casts: twice as thin)
STATS_SAMPLE_EVERY = 8
_BACKENDS: dict[str, Backend] = {"mmap": "mmap", "pread": "pread"}


@dataclass(frozen=True)
class PlanOptions:
    """Everything besides the scheme that shapes a plan.

    Attributes:
        rules: include/exclude overrides and ``strict_group_size``.
        max_shard_size: output shard size cap in bytes.
        clamp_fp16: saturate fp16 casts instead of failing.
        block_bytes: input bytes per processing block (does not change the output bytes).
        target_bpw, min_sqnr: the mixed-precision target (at most one is set).
    """

    rules: Rules = field(default_factory=Rules)
    max_shard_size: int = DEFAULT_MAX_SHARD
    clamp_fp16: bool = False
    block_bytes: int = DEFAULT_BLOCK_BYTES
    target_bpw: float | None = None
    min_sqnr: float | None = None

    @property
    def mixed(self) -> bool:
        """Whether each tensor's storage is chosen by budget (mixed precision)."""
        return self.target_bpw is not None or self.min_sqnr is not None


@dataclass(frozen=True)
class JobOptions:
    """How :func:`monoquant.stream` runs a plan (none of it changes the output bytes).

    Attributes:
        worker: ``(K, N)``: this process handles shards ``i`` with ``i % N == K``.
        jobs: shards processed concurrently by this process (threads).
        restart: discard the state or output of a different job in the output directory.
        backend: ``mmap`` or ``pread``.
        threads: torch intra-op threads (``None``: leave the setting alone).
        stats: ``exact``, ``sample`` or ``off``.
        overlap: write and hash on a background thread, and share each tensor's blocks with a
            kernel helper thread (the tiled kernels: integer round-to-nearest, fp8).
    """

    worker: tuple[int, int] = (0, 1)
    jobs: int = 1
    restart: bool = False
    backend: Backend = "mmap"
    threads: int | None = 1
    stats: str = "exact"
    overlap: bool = False

    @property
    def stats_every(self) -> int:
        """Blocks per measured block (0: no statistics)."""
        return {"exact": 1, "sample": STATS_SAMPLE_EVERY}.get(self.stats, 0)

    def settings(self, block_bytes: int) -> dict[str, Any]:
        """The ``Report.settings`` of a run with these options."""
        k, n = self.worker
        return {
            "overlap": self.overlap,
            "stats": self.stats,
            "backend": self.backend,
            "threads": self.threads,
            "jobs": self.jobs,
            "block_bytes": block_bytes,
            "worker": f"{k}/{n}",
        }


def resolve_scheme(scheme: str | Scheme, scheme_options: dict[str, Any] | None = None) -> Scheme:
    """The one place a public entry point turns a scheme name plus options into a :class:`Scheme`."""
    return get_scheme(scheme, **(scheme_options or {}))


def resolve(
    scheme: str | Scheme,
    scheme_options: dict[str, Any],
    *,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    strict_group_size: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD,
    clamp_fp16: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    target_bpw: float | None = None,
    min_sqnr: float | None = None,
) -> tuple[Scheme, PlanOptions]:
    """Check the planning keyword arguments and resolve them into a scheme and :class:`PlanOptions`.

    Raises:
        OptionError: a count, size or target that is not a usable number.
        SchemeError: unknown scheme, impossible scheme options, or a mixed-precision target with
            a cast scheme.
    """
    check_counts(block_bytes=block_bytes)
    for opt, v in (("target_bpw", target_bpw), ("min_sqnr", min_sqnr)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise OptionError(f"{opt}={v!r}: must be a number")
    rules = Rules.of(include, exclude, strict_group_size)
    sch = resolve_scheme(scheme, scheme_options)
    if (target_bpw is not None or min_sqnr is not None) and sch.kind == "cast":
        raise SchemeError(
            f"{'--target-bpw' if target_bpw is not None else '--min-sqnr'} chooses among int4/int8 "
            "storages: it needs an int scheme (--int4 or --int8), not a cast"
        )
    opts = PlanOptions(
        rules=rules,
        max_shard_size=parse_size(max_shard_size),
        clamp_fp16=clamp_fp16,
        block_bytes=block_bytes,
        target_bpw=target_bpw,
        min_sqnr=min_sqnr,
    )
    return sch, opts


def job_options(
    *,
    worker: str | tuple[int, int] | None = None,
    jobs: int = 1,
    restart: bool = False,
    backend: str = "mmap",
    threads: int | None = 1,
    stats: str | bool = "exact",
    overlap: bool | str = "auto",
) -> JobOptions:
    """Check :func:`monoquant.stream`'s run-control keyword arguments into :class:`JobOptions`
    (``overlap="auto"`` is decided here: on when a CPU core is idle now)."""
    check_counts(jobs=jobs, threads=threads)
    label = _stats_label(stats)
    if overlap == "auto":
        from .overlap import spare_core

        overlap = spare_core()
    elif not isinstance(overlap, bool):
        raise OutputError(f"overlap={overlap!r}: use True, False or 'auto'")
    if backend not in _BACKENDS:
        from .errors import CheckpointError

        raise CheckpointError(f"unknown read backend {backend!r} (mmap or pread)")
    return JobOptions(
        worker=parse_worker(worker),
        jobs=jobs,
        restart=bool(restart),
        backend=_BACKENDS[backend],
        threads=threads,
        stats=label,
        overlap=overlap,
    )


def check_counts(**counts: Any) -> None:
    """Each given count must be a positive int (``None`` allowed for ``threads``)."""
    for name, v in counts.items():
        if v is None and name == "threads":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OptionError(f"{name}={v!r}: must be a positive integer")


def _stats_label(stats: str | bool) -> str:
    if stats is True or stats == "exact":
        return "exact"
    if stats is False or stats == "off":
        return "off"
    if stats == "sample":
        return "sample"
    raise OutputError(f"stats={stats!r}: use 'sample', 'exact' or 'off'")


def parse_worker(worker: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``.

    Example:
        >>> parse_worker("2/4"), parse_worker(None)
        ((2, 4), (0, 1))
    """
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


def parse_size(text: str | int) -> int:
    """Parse ``5GB``, ``500MB``, ``2GiB``, ``1e9`` or a byte count (positive, finite).

    Example:
        >>> parse_size("2GiB"), parse_size("500MB"), parse_size(4096)
        (2147483648, 500000000, 4096)
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise OptionError(f"max shard size {text!r}: give a byte count or a size such as 5GB")
    if isinstance(text, int):
        if text <= 0:
            raise OptionError(f"size {text!r} must be positive")
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise OptionError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    num, unit, binary = m.groups()
    base = 1024 if binary else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.lower()]
    try:
        value = int(float(num) * base**power)
    except (ValueError, OverflowError):  # 1e400 is inf: no size
        raise OptionError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise OptionError(f"size {text!r} must be positive")
    if value > 1 << 60:
        raise OptionError(f"size {text!r} is implausibly large; write e.g. 5GB")
    return value
