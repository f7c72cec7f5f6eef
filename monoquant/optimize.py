"""Error-minimising scales (``--optimize``): same outputs as round-to-nearest, smaller error.

No calibration data: for every group of weights (or every row, per channel) the scale (and, when
asymmetric, the integer zero point) is chosen to minimise the squared reconstruction error
``Σ (w - ŵ)²`` of that group, instead of plain absmax (min/max). The on-disk format is unchanged:
the same tensors, dtypes and shapes as :meth:`monoquant.kernels.Kernel._quant_block` writes, so
every loader reads the result as it reads a round-to-nearest (RTN) checkpoint.

Method (per group, all groups of a block at once, vectorised):

1. **Candidates.** A fixed grid of clipping ratios ``r`` shrinks the RTN range: symmetric
   ``s = r · absmax / ((qmax - qmin) / 2)``; asymmetric ``s = r · (max - min) / (qmax - qmin)``
   with the zero point that keeps the group minimum in range (k-quants' ``make_qx_quants`` /
   AutoRound's "optimised RTN" idea).
2. **Least-squares refit.** Each candidate's codes ``q`` fix a linear problem; its optimum is
   closed-form: symmetric ``s = Σxq / Σq²``; asymmetric first the joint fit ``x ≈ a·q + c``,
   then the integer zero point ``z = round(-c / a)`` (and ``z ± 1``), then ``s = Σx(q-z) /
   Σ(q-z)²``. Each refitted scale is rounded to the dtype it is *stored* in (the weight's
   dtype, e.g. bf16), and its error ``Σx² - 2·s·Σx(q-z) + s²·Σ(q-z)²`` is computed from the
   same sums, in float64, with that stored scale. That error is an upper bound of the error
   once the codes are rounded again with the stored scale (round-to-nearest is the best code
   for each element given the scale and zero point).
3. **Keep the best, never worse than RTN.** The candidate with the smallest bound is quantized
   for real, its exact error is compared with the exact RTN error of the same group, and the
   RTN scale is kept wherever it is not strictly worse. So no group, hence no tensor, ever has
   a larger error than round-to-nearest.

Guarantees (pinned by ``tests/test_optimize.py``):

* **Deterministic and row-independent.** Every sum is a fixed pairwise tree of elementwise
  adds over one group (:func:`group_sums`), never a library reduction whose order may depend on
  the thread count or on how many rows a block holds; ties keep the earlier candidate. So the
  bytes are the same on every run, with any number of threads, and a tensor quantized block
  by block gives exactly the bytes of one call on the whole tensor (the block contract of
  :mod:`monoquant.kernels`).
* **Bounded memory.** Work proceeds on sub-blocks of at most :data:`SUB_BLOCK_ELEMENTS`
  elements with four scratch buffers from the caller's :class:`~monoquant.kernels.Workspace`,
  plus the float32 copy of the block that the RTN kernel makes too.
* **Per-tensor scales** (``--per-tensor``) are not searched: the scale is one constant fixed by
  the absmax pass before any block is seen, so those schemes fall back to plain RTN (identical
  bytes). fp8 and casts are not integer schemes and never reach this module.

Cost: about :data:`SYM_RATIOS` (or :data:`ASYM_RATIOS`) extra passes over each block, each a
handful of elementwise operations; ``docs/fidelity.md`` gives the measured seconds per GB.

Example:
    >>> import torch
    >>> from monoquant.kernels import ErrorStats, get_kernel
    >>> from monoquant.schemes import get_scheme
    >>> w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    >>> rtn, opt = ErrorStats(), ErrorStats()
    >>> a = get_kernel(get_scheme("int4", group_size=128)).quantize_tensor(w, stats=rtn)
    >>> b = get_kernel(get_scheme("int4", group_size=128, optimize=True)).quantize_tensor(w, stats=opt)
    >>> [(k, tuple(v.shape), v.dtype) for k, v in b.items()] == [(k, tuple(v.shape), v.dtype) for k, v in a.items()]
    True
    >>> opt.sqnr_db > rtn.sqnr_db + 0.5
    True
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .kernels import ErrorStats, Workspace, _accumulate_error, _check_finite, scale_dtype_for, stored_scale
from .packing import bytes_from_unsigned, pack_dim0, packed_cols

if TYPE_CHECKING:  # pragma: no cover
    from .kernels import Kernel

#: Search plan for symmetric scales: stage 0 lists clipping ratios of the RTN range; each later
#: stage lists factors applied to the best scale found so far (a coarse-to-fine search).
SYM_PLAN: tuple[tuple[float, ...], ...] = (tuple(round(1.0 - 0.03 * i, 4) for i in range(14)),)
#: Search plan for asymmetric scales (same meaning).
ASYM_PLAN: tuple[tuple[float, ...], ...] = (tuple(round(1.0 - 0.03 * i, 4) for i in range(14)),)
#: Zero-point offsets tried around each least-squares zero point (asymmetric).
ZSHIFTS: tuple[float, ...] = (0.0, -1.0, 1.0)
ZMODE = 'lo'
#: Elements per sub-block of the search (four float32 scratch buffers of this size).
SUB_BLOCK_ELEMENTS = 1 << 18


def group_sums(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` (``[..., g, m]``, float) over its dimension ``-2`` by a fixed pairwise tree, in place.

    Every column is summed by the same sequence of elementwise adds, so a column's sum depends
    neither on the other columns, nor on how many there are, nor on the number of threads
    (library reductions guarantee none of this). With groups laid out as columns, each level of
    the tree is one add of two contiguous halves. ``t`` is overwritten; the result is a view of
    its row 0.

    Example:
        >>> group_sums(torch.tensor([[1.0, 0.5], [2.0, 0.5], [3.0, 0.5], [4.0, 0.5], [5.0, 0.5]])).tolist()
        [15.0, 2.5]
    """
    w = t.shape[-2]
    while w > 1:
        if w % 2:
            t[..., 0, :].add_(t[..., w - 1, :])
            w -= 1
        h = w // 2
        t[..., :h, :].add_(t[..., h:w, :])
        w = h
    return t[..., 0, :]


def nearest_stored(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float scales rounded to the nearest value of the storage ``dtype``, back as float64."""
    return s.to(dtype).double()


def optimized_block(
    kernel: Kernel,
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
    if s.kind != "int" or s.strategy == "tensor":
        return kernel._quant_block(x, tensor_scale, ws, stats)
    r, c = x.shape
    n = r * c
    g = c if s.strategy != "group" else int(s.group_size)  # type: ignore[arg-type]
    groups = c // g
    m = r * groups
    sdt = scale_dtype_for(x.dtype)
    xf = ws.get("xf", n, torch.float32).view(r, c)
    xf.copy_(x)
    if stats is not None:
        flat = xf.view(-1)
        stats.numel += n
        stats.sum_sq += float(torch.dot(flat, flat))
    xg = xf.view(m, g)
    # ---- round-to-nearest parameters, exactly as the kernel computes them ----
    if s.symmetric:
        a = ws.get("tmp", n, torch.float32).view(m, g)
        torch.abs(xg, out=a)
        amax = a.amax(dim=-1)
        _check_finite(amax)
        lo = hi = None
        rtn_scale = stored_scale(amax / ((s.qmax - s.qmin) / 2), sdt)
        rtn_zp = None
    else:
        lo = xg.amin(dim=-1).clamp_(max=0)
        hi = xg.amax(dim=-1).clamp_(min=0)
        _check_finite(lo)
        _check_finite(hi)
        amax = None
        rtn_scale = stored_scale((hi - lo) / (s.qmax - s.qmin), sdt)
        rtn_zp = (s.qmin - lo / rtn_scale.float()).clamp_(s.qmin, s.qmax).round_()
    scale = rtn_scale.clone()
    zp = rtn_zp.clone() if rtn_zp is not None else None
    # ---- search, sub-block by sub-block (each group's result depends on that group only) ----
    # Groups run along dimension 1 of a transposed copy ``[g, groups]``, so every elementwise
    # operation (and every level of the pairwise sums) works on contiguous memory.
    step = max(1, SUB_BLOCK_ELEMENTS // g)
    scratch = ws.get("opt", 5 * min(m, step) * g, torch.float32)
    err_sq = 0.0
    max_err = 0.0
    for i in range(0, m, step):
        j = min(m, i + step)
        buf = scratch[: 5 * (j - i) * g].view(5, g, j - i)
        xt = buf[4]
        xt.copy_(xg[i:j].t())
        e2, emax = _search(
            s.qmin,
            s.qmax,
            sdt,
            xt,
            buf[:4],
            amax[i:j] if amax is not None else None,
            lo[i:j] if lo is not None else None,
            hi[i:j] if hi is not None else None,
            scale[i:j],
            zp[i:j] if zp is not None else None,
            stats is not None,
        )
        xg[i:j].copy_(xt.t())
        err_sq += e2
        max_err = max(max_err, emax)
    if stats is not None:
        stats.err_sq += err_sq
        stats.max_abs_err = max(stats.max_abs_err, max_err)
    # ---- xf now holds the codes: encode exactly as the kernel does ----
    out: dict[str, torch.Tensor] = {}
    if s.format == "pack-quantized":
        xf.add_(1 << (s.bits - 1))
        nb = 4 * packed_cols(c, s.bits)
        u8 = ws.get("u8", r * nb, torch.uint8).view(r, nb)
        bytes_from_unsigned(xf, s.bits, out=u8, scratch=ws.get("tmp", n // 2 + 1, torch.float32))
        out["_packed"] = u8.view(torch.int32)
    else:
        q8 = ws.get("q", n, torch.int8).view(r, c)
        q8.copy_(xf)
        out[""] = q8
    out["_scale"] = scale.view(r, groups)
    if zp is not None:
        out["_zero_point"] = pack_dim0(zp.to(torch.int8).view(r, groups), s.bits)
    return out


def _search(
    qmin: int,
    qmax: int,
    sdt: torch.dtype,
    x: torch.Tensor,
    buf: torch.Tensor,
    amax: torch.Tensor | None,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    want_max: bool,
) -> tuple[float, float]:
    """Search one sub-block ``x`` (``[g, m]``: one group per column); update ``scale``/``zp``
    (the RTN values on entry) in place and overwrite ``x`` with the chosen codes.

    ``buf`` is ``[4, g, m]`` scratch. Returns (Σ err², max |err|) of the chosen result.
    """
    g, m = x.shape
    sym = zp is None
    t0, t1, t2, t3 = buf[0], buf[1], buf[2], buf[3]
    if sym:
        base = amax.double() / ((qmax - qmin) / 2)  # type: ignore[union-attr]
        plan = SYM_PLAN
        sx = None
        lo64 = None
    else:
        base = (hi - lo).double() / (qmax - qmin)  # type: ignore[operator]
        plan = ASYM_PLAN
        t0.copy_(x)
        sx = group_sums(t0).double()
        lo64 = lo.double()  # type: ignore[union-attr]
        hi64 = hi.double()
    ok = base > 0
    base = torch.where(ok, base, torch.ones_like(base))
    best_est = torch.full((m,), math.inf, dtype=torch.float64)
    best_s = base.clone()
    best_z = torch.zeros(m, dtype=torch.float64) if sym else (qmin - lo64 / base).round_().clamp_(qmin, qmax)
    zeros = torch.zeros(m, dtype=torch.float64)
    for stage, factors in enumerate(plan):
        center_s, center_z = best_s.clone(), best_z.clone()
        for f in factors:
            if stage == 0:
                sk = base * f
                if sym:
                    zk = None
                elif ZMODE == "center":
                    zk = ((qmin + qmax) / 2 - (lo64 + hi64) / (2 * sk)).round_().clamp_(qmin, qmax)
                else:
                    zk = (qmin - lo64 / sk).round_().clamp_(qmin, qmax)
            else:
                sk = center_s * f
                zk = center_z
            torch.div(x, sk.float(), out=t0)
            if zk is not None:
                t0.add_(zk.float())
            t0.round_().clamp_(qmin, qmax)
            if sym:
                torch.mul(t0, x, out=t1)
                t0.mul_(t0)
                sums = group_sums(buf[:2]).double()
                cands = [(sums[1], sums[0], zeros)]  # (Σxq, Σq², z = 0)
            else:
                torch.mul(t0, t0, out=t1)
                torch.mul(t0, x, out=t2)
                sums = group_sums(buf[:3]).double()
                st, st2, sxt = sums[0], sums[1], sums[2]
                # joint least squares x ≈ a·t + c, then the integer zero point z = round(-c / a)
                den = g * st2 - st * st
                a = torch.where(den > 0, (g * sxt - sx * st) / torch.where(den > 0, den, 1.0), sk)
                a = torch.where(a > 0, a, sk)
                z0 = ((st * a - sx) / (g * a)).round_().clamp_(qmin, qmax)
                cands = []
                for dz in ZSHIFTS:
                    z = (z0 + dz).clamp_(qmin, qmax)
                    cands.append((sxt - z * sx, st2 - 2 * z * st + g * z * z, z))
            for num, den2, z in cands:
                sst = nearest_stored(num / torch.where(den2 > 0, den2, 1.0), sdt)
                est = sst * (sst * den2 - 2 * num)
                better = ok & (den2 > 0) & (sst > 0) & torch.isfinite(sst) & (est < best_est)
                best_est = torch.where(better, est, best_est)
                best_s = torch.where(better, sst, best_s)
                best_z = torch.where(better, z, best_z)
    # ---- exact comparison with RTN, then the codes of the winner ----
    found = best_est < math.inf
    cand_scale = torch.where(found, best_s, scale.double()).to(scale.dtype)
    e_opt, m_opt = _exact(x, cand_scale, None if sym else best_z, qmin, qmax, t0, t1, want_max)
    e_rtn, m_rtn = _exact(x, scale, zp, qmin, qmax, t2, t3, want_max)
    win = found & (e_opt < e_rtn)
    if zp is not None:
        zp.copy_(torch.where(win, best_z.to(zp.dtype), zp))
    scale.copy_(torch.where(win, cand_scale, scale))
    torch.where(win, t0, t2, out=x)
    err = torch.where(win, e_opt, e_rtn)
    emax = float(torch.where(win, m_opt, m_rtn).amax()) if want_max else 0.0  # type: ignore[arg-type]
    return float(err.double().sum()), emax


def _exact(
    x: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    qmin: int,
    qmax: int,
    q: torch.Tensor,
    e: torch.Tensor,
    want_max: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes of ``x`` (``[g, m]``) with the stored ``scale`` (and ``zp``) into ``q``, computed
    as the kernel computes them; returns each group's Σ err² (and max |err| when asked)."""
    sf = scale.float()
    torch.div(x, sf, out=q)
    if zp is not None:
        zf = zp.float()
        q.add_(zf)
        q.round_().clamp_(qmin, qmax)
        torch.sub(q, zf, out=e)
        e.mul_(sf)
    else:
        q.round_().clamp_(qmin, qmax)
        torch.mul(q, sf, out=e)
    e.sub_(x)
    emax = None
    if want_max:
        e.abs_()
        emax = e.amax(dim=0)
    e.mul_(e)
    return group_sums(e).clone(), emax
