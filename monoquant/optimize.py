"""Error-minimising scales (``--optimize``): same outputs as round-to-nearest, a better model.

No calibration data: for every group of weights (or every row, per channel) the scale (and, when
asymmetric, the integer zero point) is chosen to minimise that group's *importance-weighted*
reconstruction error ``Σ |w| · (w - ŵ)²``, instead of plain absmax (min/max). The on-disk
format is unchanged: the same tensors, dtypes and shapes as
:meth:`monoquant.formats.integer.IntKernel.rtn_block` writes, so every loader reads the result as
it reads a round-to-nearest (RTN) checkpoint.

Why weighted: the plain squared error rewards clipping a group's largest weights for a smaller
total error, and models punish exactly that. On SmolLM2-135M the unweighted search lowered every
group's squared error and still raised the perplexity above RTN's (asymmetric g64: +40 % over the
source against RTN's +28 %). Weighting each error by ``|w|`` keeps the large weights close and
improved both models measured, SmolLM2 (perplexity) and MiniLM (sentence-embedding cosine); the
figures are in ``docs/fidelity.md``.

Method (per group; all groups of a block at once, vectorised; :data:`SYM_PLAN`, :data:`ASYM_PLAN`):

1. **Candidate scales**, coarse to fine. Stage 0 shrinks the RTN range by mild clipping ratios
   (``1.0, 0.95, 0.9``): symmetric ``s = r · absmax / ((qmax - qmin) / 2)``; asymmetric
   ``s = r · (max - min) / (qmax - qmin)`` with the zero point that centres the clipped range on
   the group's range. The later stage multiplies the best scale found so far by ``0.975`` and
   ``1.025``.
2. **Weighted least-squares refit, in closed form.** A candidate's codes ``q`` fix a linear
   problem; with weights ``w = |x|``: symmetric ``s = Σwxq / Σwq²``; asymmetric the joint fit
   ``x ≈ a·q + c``, then the integer zero point ``z = round(-c / a)`` (clamped to
   ``[qmin, qmax]``: it is stored as a code), then ``s = Σwx(q-z) / Σw(q-z)²``. The refitted
   scale is rounded to the dtype it is *stored* in (the weight's dtype, e.g. bf16) and scored,
   from the same sums, with that stored value: ``Σwx² - 2·s·Σwx(q-z) + s²·Σw(q-z)²``. That
   score bounds the weighted error from above once the codes are rounded again with the stored
   scale and zero point (round-to-nearest is the best code for every element given them,
   whatever its weight), which is what is written.
3. **Keep the best, never worse than RTN.** The best-scoring candidate of each group is
   quantized for real; its exact weighted error is compared with the exact weighted error of
   RTN for the same group, and RTN is kept wherever the candidate is not strictly better. So no
   group, hence no tensor, is ever worse than round-to-nearest in the objective. (The plain
   SQNR usually rises too, but is not what is minimised.)

Guarantees (pinned by ``tests/test_optimize.py``):

* **Same format.** The outputs are those of :meth:`monoquant.kernels.Kernel.quantize_block`
  (suffixes, dtypes, shapes, packing); only the values of ``_scale`` (and ``_zero_point``)
  differ. compressed-tensors' own compressors decompress them identically.
* **Deterministic and row-independent.** Every sum is a fixed pairwise tree of elementwise
  adds over one group (:func:`~monoquant.numerics.group_sums`), never a library reduction whose
  order may depend on the thread count or on how many groups a block holds; every other step
  is elementwise; ties keep the earlier candidate. So the bytes are the same on every run with any number of
  threads, and a tensor quantized block by block gives exactly the bytes of one call on the
  whole tensor (the block contract of :mod:`monoquant.kernels`).
* **Bounded memory.** The search runs over sub-blocks of about :data:`SUB_BLOCK_ELEMENTS`
  elements (at least one group), with one scratch buffer of ``11 x`` that size from the
  caller's :class:`~monoquant.numerics.Workspace` (6 MB), plus the float32 copy of the block
  that the RTN kernel makes too.
* **Per-tensor scales** (``--per-tensor``) are not searched: that scale is one constant fixed
  by the absmax pass before any block is seen, so those schemes are written exactly as RTN
  writes them. fp8 and casts are not integer schemes and never reach this module.

Cost: 5 candidates, each about eight elementwise passes over the block (three more when
asymmetric), measured against RTN in ``docs/fidelity.md`` (``scripts/fidelity.py``).

Example:
    >>> import torch
    >>> from monoquant.kernels import ErrorStats, get_kernel
    >>> from monoquant.schemes import get_scheme
    >>> w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    >>> rtn, opt = ErrorStats(), ErrorStats()
    >>> a = get_kernel(get_scheme("int4", group_size=128)).quantize_tensor(w, stats=rtn)
    >>> b = get_kernel(get_scheme("int4", group_size=128, optimize=True)).quantize_tensor(w, stats=opt)
    >>> def specs(parts): return [(k, tuple(v.shape), v.dtype) for k, v in parts.items()]
    >>> specs(a) == specs(b)
    True
    >>> opt.sqnr_db > rtn.sqnr_db + 0.2
    True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .numerics import (
    ErrorStats,
    Workspace,
    asymmetric_params,
    check_decodes_finite,
    check_finite,
    decode_cap,
    group_sums,
    int_code_magnitude,
    int_half_range,
    scale_dtype_for,
    stored_scale,
    unsafe_square_sums,
)

if TYPE_CHECKING:  # pragma: no cover
    from .formats.integer import IntKernel

__all__ = [
    "ALGORITHM_VERSION",
    "ASYM_PLAN",
    "SUB_BLOCK_ELEMENTS",
    "SYM_PLAN",
    "group_sums",
    "optimized_block",
]

#: Version of the search. The plans and every step of the search fix the bytes written with
#: --optimize: change any of them and bump this (and monoquant.schemes.FORMAT_VERSION, which
#: enters every plan fingerprint), so a resumed run never mixes bytes of two versions.
ALGORITHM_VERSION = 2

#: Search plan for symmetric scales: stage 0 lists clipping ratios of the RTN range; each later
#: stage lists factors applied to the best scale found so far (a coarse-to-fine search).
#: Mild clipping only: with the importance-weighted objective, deeper ratios (0.8, 0.7) lowered
#: SmolLM2's perplexity less than this plan (docs/fidelity.md), and cost more candidates.
SYM_PLAN: tuple[tuple[float, ...], ...] = ((1.0, 0.95, 0.9), (0.975, 1.025))
#: Search plan for asymmetric scales (same meaning).
ASYM_PLAN: tuple[tuple[float, ...], ...] = ((1.0, 0.95, 0.9), (0.975, 1.025))
#: Elements per sub-block of the search (memory and speed only; the bytes do not depend on it).
SUB_BLOCK_ELEMENTS = 1 << 17


def optimized_block(
    kernel: IntKernel,
    x: torch.Tensor,
    *,
    tensor_scale: torch.Tensor | None = None,
    ws: Workspace | None = None,
    stats: ErrorStats | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize a block of whole rows like ``kernel.quantize_block`` with error-minimising scales.

    Args:
        kernel: the kernel of an integer scheme (``kernel.scheme.optimize`` is normally set;
            the outputs follow ``kernel.out_specs`` either way).
        x: a block of whole rows, 2-D, in the input dtype.
        tensor_scale: the per-tensor scale (only for ``strategy == "tensor"``, which falls back
            to round-to-nearest).
        ws: reusable buffers (the returned tensors may be views into them).
        stats: accumulates the reconstruction error of the block.

    Returns:
        The block-wise outputs keyed by suffix (``_packed``/``""``, ``_scale``, ``_zero_point``),
        exactly as :meth:`~monoquant.kernels.Kernel.quantize_block` returns them.

    Raises:
        NonFiniteError: the block holds NaN or Inf.

    Example:
        >>> import torch
        >>> from monoquant.kernels import get_kernel
        >>> from monoquant.schemes import get_scheme
        >>> k = get_kernel(get_scheme("int4", group_size=32, asymmetric=True, optimize=True))
        >>> out = optimized_block(k, torch.randn(8, 64))
        >>> {key: tuple(v.shape) for key, v in out.items()}
        {'_packed': (8, 8), '_scale': (8, 2), '_zero_point': (1, 2)}
    """
    s = kernel.scheme
    ws = ws if ws is not None else Workspace()
    if s.kind != "int" or s.strategy == "tensor" or x.numel() == 0:
        return kernel.rtn_block(x, tensor_scale, ws, stats)
    r, c = x.shape
    n = r * c
    g = c if s.strategy != "group" else int(s.group_size or c)
    groups = c // g
    m = r * groups
    sdt = scale_dtype_for(x.dtype)
    xf = ws.get("xf", n, torch.float32).view(r, c)
    xf.copy_(x)
    xg = xf.view(m, g)
    # ---- round-to-nearest parameters, exactly as the kernel computes them ----
    hi = xg.amax(dim=-1)
    lo = xg.amin(dim=-1)
    check_finite(hi)
    check_finite(lo)
    sum_sq = 0.0
    if stats is not None:
        flat = xf.view(-1)
        sum_sq = float(torch.dot(flat, flat))
    mag = int_code_magnitude(s.qmin, s.qmax, s.symmetric)
    if s.symmetric:
        amax = torch.maximum(hi, -lo)
        rtn_scale = stored_scale(amax / int_half_range(s.qmin, s.qmax), sdt, mag)
        rtn_zp = None
    else:
        amax = None
        rtn_scale, rtn_zp = asymmetric_params(hi, lo, s.qmin, s.qmax, sdt, s.name)
    scale = rtn_scale.clone()
    zp = rtn_zp.clone() if rtn_zp is not None else None
    # ---- search, sub-block by sub-block (each group's result depends on that group only) ----
    # A sub-block is transposed to ``[g, groups]`` (one group per column), so every elementwise
    # operation, and every level of the pairwise sums, runs over contiguous memory.
    plan = SYM_PLAN if s.symmetric else ASYM_PLAN
    width = max(6, (2 if s.symmetric else 3) * max(len(f) for f in plan))
    step = max(1, SUB_BLOCK_ELEMENTS // g)
    scratch = ws.get("opt", (2 + width) * min(m, step) * g, torch.float32)
    err_sq = 0.0
    max_err = 0.0
    for i in range(0, m, step):
        j = min(m, i + step)
        size = (j - i) * g
        xt = scratch[:size].view(g, j - i)
        xt.copy_(xg[i:j].t())
        wt = torch.abs(xt, out=scratch[size : 2 * size].view(g, j - i))  # each element's importance
        e2, emax = _search(
            plan,
            s.qmin,
            s.qmax,
            sdt,
            xt,
            wt,
            scratch[2 * size : (2 + width) * size],
            amax[i:j] if amax is not None else None,
            lo[i:j],
            hi[i:j],
            scale[i:j],
            zp[i:j] if zp is not None else None,
            stats is not None,
        )
        xg[i:j].copy_(xt.t())
        err_sq += e2
        max_err = max(max_err, emax)
    if zp is not None:
        check_decodes_finite(xf.view(r, groups, g), scale, zp, mag, s.name, sdt)
    # ---- xf now holds the codes: encode them exactly as round-to-nearest does ----
    out = kernel.encode(xf, scale, zp, ws)
    if stats is not None:
        if unsafe_square_sums(sum_sq, err_sq, max_err):  # rare: huge or tiny values, in float64
            dq = kernel.dequantize(out, (r, c)).double()
            xd = x.double()
            stats.add_error(xd, dq.sub_(xd))
        else:
            stats.add_sums(n, sum_sq, err_sq, max_err)
    return out


def _search(
    plan: tuple[tuple[float, ...], ...],
    qmin: int,
    qmax: int,
    sdt: torch.dtype,
    x: torch.Tensor,
    wgt: torch.Tensor,
    work: torch.Tensor,
    amax: torch.Tensor | None,
    lo: torch.Tensor,
    hi: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    want_max: bool,
) -> tuple[float, float]:
    """Search one sub-block ``x`` (``[g, m]``: one group per column); update ``scale``/``zp``
    (the RTN values on entry) in place and overwrite ``x`` with the chosen codes.

    ``wgt`` (same shape) holds each element's importance ``|x|``: every sum of the fit and every
    score is weighted by it. ``work`` is flat float32 scratch of at least ``max(6, 3·k) · g · m``
    elements (``k``: the largest stage of ``plan``). Returns (Σ err², max |err|) of the chosen
    result (plain, unweighted: the error statistics).
    """
    g, m = x.shape
    f64 = torch.float64
    sym = zp is None
    nsum = 2 if sym else 3
    mid = sx = sw = None
    if amax is not None:  # symmetric
        base = amax.double() / ((qmax - qmin) / 2)
    else:
        base = (hi - lo).double() / (qmax - qmin)
        mid = (hi + lo).double() / 2
        t = work[: 2 * g * m].view(2, g, m)
        t[0].copy_(wgt)
        torch.mul(wgt, x, out=t[1])
        sw, sx = group_sums(t).double()  # Σw, Σwx
    base = torch.where(base > 0, base, 1.0)
    best_est = torch.full((m,), math.inf, dtype=f64)
    best_s = base
    best_z = torch.zeros(m, dtype=f64)
    for stage, factors in enumerate(plan):
        k = len(factors)
        f = torch.tensor(factors, dtype=f64).unsqueeze(1)
        sk = (base if stage == 0 else best_s) * f  # [k, m]
        buf = work[: nsum * k * g * m].view(nsum, k, g, m)
        codes = buf[0]
        torch.div(x, sk.float().unsqueeze(1), out=codes)
        if sym:
            codes.round_().clamp_(qmin, qmax)
            torch.mul(codes, x, out=buf[1]).mul_(wgt)  # w·x·q
            codes.mul_(codes).mul_(wgt)  # w·q²
            sq, sxq = group_sums(buf).double()
            num, den, z = sxq, sq, best_z
        else:
            if stage == 0 and mid is not None:  # centre the clipped range on the group's range
                zk = ((qmin + qmax) / 2 - mid / sk).round_().clamp_(qmin, qmax)
            else:
                zk = best_z.expand(k, m)
            codes.add_(zk.float().unsqueeze(1))
            codes.round_().clamp_(qmin, qmax)
            torch.mul(codes, codes, out=buf[1]).mul_(wgt)  # w·t²
            torch.mul(codes, x, out=buf[2]).mul_(wgt)  # w·x·t
            codes.mul_(wgt)  # w·t
            st, st2, sxt = group_sums(buf).double()
            assert sw is not None and sx is not None
            # weighted least squares x ≈ a·t + c, then the integer zero point z = round(-c / a)
            a = (sw * sxt - sx * st) / (sw * st2 - st * st)
            a = torch.where(torch.isfinite(a) & (a > 0), a, sk)
            z = ((st * a - sx) / (sw * a)).nan_to_num_(0.0).round_().clamp_(qmin, qmax)
            num = sxt - z * sx  # Σw·x(t-z)
            den = st2 - 2 * z * st + sw * z * z  # Σw·(t-z)²
        # the refitted scale as stored, and the weighted error it gives these codes (minus Σw·x²)
        sst = (num / den).to(sdt).double()
        est = torch.where(sst > 0, sst * (sst * den - 2 * num), math.inf)
        for c in range(k):  # in order: ties keep the earlier candidate
            better = est[c] < best_est
            best_est = torch.where(better, est[c], best_est)
            best_s = torch.where(better, sst[c], best_s)
            if not sym:
                best_z = torch.where(better, z[c], best_z)
    # ---- exact comparison with RTN, then the codes of the winner ----
    found = best_est < math.inf
    cand = torch.where(found, best_s, scale.double()).to(scale.dtype)
    if sym:  # a loader decodes code * scale in the stored dtype: keep it finite (stored_scale)
        cand = torch.minimum(cand, decode_cap(scale.dtype, max(-qmin, qmax)).to(cand.dtype))
    sf = torch.stack((cand, scale)).float().unsqueeze(1)  # [2, 1, m]
    q = work[: 2 * g * m].view(2, g, m)
    e = work[2 * g * m : 4 * g * m].view(2, g, m)
    torch.div(x, sf, out=q)
    if sym:
        q.round_().clamp_(qmin, qmax)
        torch.mul(q, sf, out=e)
    else:
        assert zp is not None  # asymmetric
        zf = torch.stack((best_z.float(), zp.float())).unsqueeze(1)
        q.add_(zf)
        q.round_().clamp_(qmin, qmax)
        torch.sub(q, zf, out=e)
        e.mul_(sf)
    e.sub_(x)
    emax = None
    if want_max:
        e.abs_()
        emax = e.amax(dim=1)
    e.mul_(e)
    werr = group_sums(torch.mul(e, wgt, out=work[4 * g * m : 6 * g * m].view(2, g, m)))  # Σw·err²
    err = group_sums(e)
    win = found & (werr[0] < werr[1])
    if zp is not None:
        zp.copy_(torch.where(win, best_z.to(zp.dtype), zp))
    scale.copy_(torch.where(win, cand, scale))
    torch.where(win, q[0], q[1], out=x)
    chosen = torch.where(win, err[0], err[1])
    top = float(torch.where(win, emax[0], emax[1]).amax()) if emax is not None else 0.0
    return float(chosen.double().sum()), top
