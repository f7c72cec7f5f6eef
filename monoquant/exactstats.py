"""Exact, overflow-safe error sums for ``verify``: what a CI gate can trust.

``verify`` compares every element of the decoded output with the input. Its sums must not lie:

* **No overflow, no underflow.** Σx² and Σ(x̂-x)² are accumulated in float64 *scaled by the
  largest magnitude seen so far* (the ``dnrm2`` method: keep ``scale`` and ``Σ(v/scale)²``), so
  weights of 1e30 or 1e-30 (or float64 values near 1e300) give the right dB, never ``nan`` or
  ``inf``.
* **NaN/Inf in the decoded output fail.** An element that decodes to NaN or ±Inf where the
  input is finite is counted (``nonfinite``) and the tensor's SQNR is ``-inf``; such a tensor
  is listed as failed whatever the threshold.
* **An all-zero decode of a non-zero tensor fails** (``zero_output``): a broken scale of 0 is not
  "0 dB somewhere in the list" but a failure.

Example:
    >>> import torch
    >>> st = ExactStats()
    >>> x = torch.tensor([1e30, -2e30])
    >>> st.add(x, x * (1 + 1e-3))
    >>> round(st.sqnr_db, 1)
    60.0
    >>> st.add(torch.tensor([1.0]), torch.tensor([float("nan")]))
    >>> st.nonfinite, st.sqnr_db, st.failure()
    (1, -inf, '1 value(s) decode to NaN/Inf')
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .numerics import ErrorStats


@dataclass
class ExactStats(ErrorStats):
    """:class:`~monoquant.numerics.ErrorStats` with scaled float64 sums and failure counts.

    ``sum_sq``/``err_sq`` hold the plain float64 sums for compatibility (they may overflow to
    ``inf`` for huge values); :attr:`sqnr_db` and :attr:`rel_err` use the scaled sums."""

    x_scale: float = 0.0
    x_ssq: float = 0.0
    e_scale: float = 0.0
    e_ssq: float = 0.0
    nonfinite: int = 0
    out_nonzero: int = 0

    def add(self, x: torch.Tensor, dq: torch.Tensor) -> None:
        """Add one block: ``x`` the input, ``dq`` the decoded output (any float dtypes)."""
        xd = x.reshape(-1).double()
        dd = dq.reshape(-1).double()
        self.numel += xd.numel()
        if not bool(torch.isfinite(dd).all()):  # rare: count NaN/Inf, leave them out of the sums
            bad = ~torch.isfinite(dd) & torch.isfinite(xd)
            self.nonfinite += int(bad.sum())
            dd = torch.where(torch.isfinite(dd), dd, xd)
        if self.out_nonzero == 0:  # only "none at all" matters
            self.out_nonzero += int(torch.count_nonzero(dd))
        err = dd.sub_(xd)
        self.x_scale, self.x_ssq = _add_ssq(self.x_scale, self.x_ssq, xd)
        self.e_scale, self.e_ssq = _add_ssq(self.e_scale, self.e_ssq, err)
        self.sum_sq = self.x_scale**2 * self.x_ssq if self.x_scale < 1e154 else math.inf
        self.err_sq = self.e_scale**2 * self.e_ssq if self.e_scale < 1e154 else math.inf
        if err.numel():
            self.max_abs_err = max(self.max_abs_err, float(err.max()), -float(err.min()))

    @property
    def exact(self) -> bool:
        """True when every decoded value equals the input."""
        return self.e_ssq == 0.0 and self.nonfinite == 0

    @property
    def sqnr_db(self) -> float:
        if self.nonfinite:
            return -math.inf
        if self.e_ssq <= 0.0:
            return math.inf
        if self.x_ssq <= 0.0:
            return -math.inf
        return 10.0 * math.log10(self.x_ssq / self.e_ssq) + 20.0 * math.log10(self.x_scale / self.e_scale)

    @property
    def rel_err(self) -> float:
        if self.nonfinite:
            return math.inf
        if self.x_ssq <= 0.0:
            return 0.0 if self.e_ssq == 0.0 else math.inf
        return 10.0 ** (-self.sqnr_db / 20.0) if self.e_ssq > 0 else 0.0

    def failure(self) -> str | None:
        """Why this tensor's output is broken whatever the threshold, or ``None``."""
        if self.nonfinite:
            return f"{self.nonfinite} value(s) decode to NaN/Inf"
        if self.out_nonzero == 0 and self.x_ssq > 0:
            return "decodes to all zeros but the input is not zero"
        return None

    def to_dict(self) -> dict[str, float | int | None]:
        d = super().to_dict()
        d["rel_err"] = self.rel_err if math.isfinite(self.rel_err) else None
        d["nonfinite"] = self.nonfinite
        return d


def _add_ssq(scale: float, ssq: float, v: torch.Tensor) -> tuple[float, float]:
    """Fold ``Σv²`` into ``scale² · ssq`` without overflow or underflow (``v`` float64).

    The plain float64 dot product is exact enough and one pass; only when it overflows or may
    have underflowed (huge or tiny values) is the block rescaled by its largest magnitude."""
    if v.numel() == 0:
        return scale, ssq
    m, part = 1.0, float(torch.dot(v, v))
    if not (math.isfinite(part) and part > 1e-250):
        m = float(v.abs().max())
        if m == 0.0 or not math.isfinite(m):
            return scale, ssq
        vs = v / m
        part = float(torch.dot(vs, vs))
    if scale == 0.0:
        return m, part
    if m > scale:
        return m, ssq * (scale / m) ** 2 + part
    return scale, ssq + part * (m / scale) ** 2
