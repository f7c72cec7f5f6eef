"""What a run reports: progress events while it goes, a :class:`Report` at the end.

Example:
    >>> r = Report("out/", "ab12", "int8", True, {"bits_per_weight": 8.0039})
    >>> r.bits_per_weight, r.gb_per_s, r.worst()
    (8.0039, 0.0, [])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .kernels import ErrorStats
from .schemes import Scheme


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
    #: the schemes the output holds, by name (mixed precision and group-size fallbacks: several;
    #: a cast: the cast scheme), so a caller can tell what each one means
    schemes: dict[str, Scheme] = field(default_factory=dict)

    def compat_notes(self) -> list[str]:
        """Where this output does not load, as known: the notes of every scheme it holds, once."""
        return list(dict.fromkeys(n for s in self.schemes.values() for n in s.compat_notes()))

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
