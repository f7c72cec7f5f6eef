"""int8 / int4: integer codes with a scale per tensor, per output channel (row) or per group of
input columns, symmetric or with a zero point (presets ``int8``, ``int4``, ``int4-asym``,
``w8a8`` ... ; compressed-tensors ``pack-quantized``, or ``int-quantized`` with ``--dynamic``).

Numerics (float32; see :mod:`monoquant.numerics` and docs/format.md): symmetric scale
``absmax / ((qmax - qmin) / 2)``, asymmetric scale and zero point from the group's range, the
scale stored in the weight's dtype rounded to nearest; codes
``clamp(round_half_even(x / scale + zp), qmin, qmax)``; dequantize ``(q - zp) * scale``.
``pack-quantized`` stores the codes offset-binary in int32 words (:mod:`monoquant.packing`),
zero points packed along dimension 0; ``int-quantized`` stores int8. With ``--optimize`` the
scales come from :mod:`monoquant.optimize` (same outputs, smaller error).

Example:
    >>> import torch
    >>> from monoquant.schemes import get_scheme
    >>> from monoquant.kernels import get_kernel
    >>> k = get_kernel(get_scheme("int4"))
    >>> [(s.suffix, tuple(s.shape)) for s in k.out_specs((16, 256), torch.bfloat16)]
    [('_packed', (16, 32)), ('_scale', (16, 2)), ('_shape', (2,))]
    >>> w = torch.randn(16, 256)
    >>> parts = k.quantize_tensor(w)
    >>> (k.dequantize(parts, (16, 256), torch.float32) - w).abs().max() < 0.5 * w.abs().max() / 7
    tensor(True)
"""

from __future__ import annotations

import torch

from ..errors import SchemeError
from ..numerics import (
    INT_TILE_ELEMENTS,
    DecodeOverflowError,
    ErrorStats,
    OutSpec,
    TileSums,
    Workspace,
    as_rows,
    asymmetric_params,
    contiguous_rows,
    decode_error,
    decode_overflow_message,
    decode_worst,
    group_range,
    int_code_magnitude,
    int_half_range,
    per_row,
    scale_dtype_for,
    symmetric_tile_scale,
    tensor_scale,
)
from ..optimize import optimized_block
from ..packing import (
    code_buffer,
    codes_per_word,
    encode_codes,
    pack_dim0,
    packed_cols,
    unpack_dim0,
    unpack_rows,
)
from .base import Kernel, group_width, plain_shape_problem, register, scale_spec


class _TileViews:
    """The views of one tile shape (``t`` rows of ``groups`` groups of ``g``) into a kernel's
    scratch buffers, made once per shape: the float32 input ``xf`` and codes ``y``, ``y`` as
    ``[t, c]`` and both flat, the float32 scales ``sc`` ``[t, groups]`` and ``sf``
    ``[t, groups, 1]``, and the decode ``dec`` in the stored dtype (``None`` without one)."""

    def __init__(
        self,
        xf_buf: torch.Tensor,
        y_buf: torch.Tensor,
        sf_buf: torch.Tensor,
        dec_buf: torch.Tensor | None,
        t: int,
        groups: int,
        g: int,
    ):
        n = t * groups * g
        self.xflat, self.yflat = xf_buf[:n], y_buf[:n]
        self.xf = self.xflat.view(t, groups, g)
        self.y = self.yflat.view(t, groups, g)
        self.y2d = self.yflat.view(t, groups * g)
        self.sc = sf_buf[: t * groups].view(t, groups)
        self.sf = self.sc.unsqueeze(-1)
        self.dec = dec_buf[:n].view(t, groups, g) if dec_buf is not None else None


@register("int")
class IntKernel(Kernel):
    """The integer unit (see the module docstring)."""

    default_dtype = None  # the scale's dtype: the original weight dtype

    @property
    def magnitude(self) -> float:
        """The largest ``|code - zp|`` a decode multiplies a scale by."""
        s = self.scheme
        return int_code_magnitude(s.qmin, s.qmax, s.symmetric)

    @property
    def packed(self) -> bool:
        return self.scheme.format == "pack-quantized"

    def out_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[OutSpec, ...]:
        s = self.scheme
        shape = tuple(int(d) for d in shape)
        rows, cols = as_rows(shape)
        scale = scale_spec(s.strategy, rows, cols, s.group_size, scale_dtype_for(dtype))
        if not self.packed:
            return (OutSpec("", torch.int8, shape), scale)
        specs = [
            OutSpec("_packed", torch.int32, (rows, packed_cols(cols, s.bits))),
            scale,
            OutSpec("_shape", torch.int64, (len(shape),), None),
        ]
        if not s.symmetric:
            per = codes_per_word(s.bits)
            specs.append(
                OutSpec("_zero_point", torch.int32, (packed_cols(rows, s.bits), scale.shape[1]), per)
            )
        return tuple(specs)

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        why = plain_shape_problem(shape)
        if why is not None:
            return why
        s = self.scheme
        cols = as_rows(shape)[1]
        if s.strategy == "group" and cols % group_width(s.strategy, cols, s.group_size):
            return f"{cols} input columns are not a multiple of the group size {s.group_size}"
        return None

    @property
    def block_rows_multiple(self) -> int:
        """Zero points are packed along rows: blocks of whole words of them."""
        return 1 if self.scheme.symmetric else codes_per_word(self.scheme.bits)

    @property
    def needs_absmax(self) -> bool:
        return self.scheme.strategy == "tensor"

    def tensor_scale(self, amax: float, dtype: torch.dtype) -> torch.Tensor:
        s = self.scheme
        return tensor_scale(
            amax, int_half_range(s.qmin, s.qmax), scale_dtype_for(dtype), self.magnitude, s.name
        )

    def constants(self, shape: tuple[int, ...], tensor_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.packed:
            out["_shape"] = torch.tensor(shape, dtype=torch.int64)
        if self.scheme.strategy == "tensor":
            if tensor_scale is None:
                raise SchemeError("a per-tensor scheme needs the tensor scale (absmax pass)")
            out["_scale"] = tensor_scale
        return out

    def quantize_block(
        self,
        x: torch.Tensor,
        *,
        tensor_scale: torch.Tensor | None = None,
        ws: Workspace | None = None,
        stats: ErrorStats | None = None,
        clamp_fp16: bool = False,
        stats_rows: int = 1,
    ) -> dict[str, torch.Tensor]:
        ws = ws if ws is not None else Workspace()
        if self.scheme.optimize:  # the search measures every row
            if self.scheme.strategy == "tensor" or x.numel() == 0:
                return self.rtn_block(x, tensor_scale, ws, stats)
            return optimized_block(self, x, tensor_scale=tensor_scale, ws=ws, stats=stats)
        return self.rtn_block(x, tensor_scale, ws, stats, max(int(stats_rows), 1))

    def encode(
        self,
        y: torch.Tensor,
        scale: torch.Tensor,
        zp: torch.Tensor | None,
        ws: Workspace,
        codes: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The block outputs of float codes ``y`` ``[r, c]`` (overwritten), stored scales
        ``scale`` and float zero points ``zp`` (``[r, groups]``); ``codes``: the encoded codes
        already written (the tiled path), else ``y`` is encoded here."""
        s = self.scheme
        r = y.shape[0]
        if codes is None:
            codes = encode_codes(y, s.bits, self.packed, ws)
        out = {"_packed" if self.packed else "": codes.view(torch.int32) if self.packed else codes}
        if s.strategy != "tensor":
            out["_scale"] = scale.view(r, -1)
        if zp is not None:
            out["_zero_point"] = pack_dim0(zp.to(torch.int8).view(r, -1), s.bits)
        return out

    @property
    def tiled_scratch(self) -> bool:
        """Round to nearest works in tiles; ``--optimize``'s search allocates per block."""
        return not self.scheme.optimize

    def rtn_block(
        self,
        x: torch.Tensor,
        tensor_scale: torch.Tensor | None,
        ws: Workspace,
        stats: ErrorStats | None,
        k: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Round-to-nearest outputs of the block ``x``; ``stats`` measures every ``k``-th row.

        The block is processed in tiles of whole rows of about
        :data:`~monoquant.numerics.INT_TILE_ELEMENTS` (2 MiB of float32, cache-sized): every step
        of a tile (float32 copy, range, scale, divide, round, clamp, encode) reads what the
        previous one left in the cache, instead of streaming the whole block through memory
        once per step. Every element and every row's scale is
        computed exactly as on the whole block, so the bytes do not depend on the tiling. Exact
        statistics (``k == 1``) are measured on each tile while it is in the cache (float32
        terms, float64 sums across tiles); sampled ones gather every ``k``-th row and are
        measured once per block.
        """
        s = self.scheme
        r, c = x.shape
        sdt = scale_dtype_for(x.dtype)
        g = group_width(s.strategy, c, s.group_size)
        groups = c // g
        mag = self.magnitude
        if s.strategy == "tensor" and tensor_scale is None:
            raise SchemeError("a per-tensor scheme needs the tensor scale (absmax pass)")
        tile = max(1, min(r, INT_TILE_ELEMENTS // max(c, 1)))
        codes = code_buffer(r, c, s.bits, self.packed, ws)
        per_tensor = s.strategy == "tensor"
        # each torch call holds the GIL the other kernel thread may be waiting for, and costs a
        # few microseconds of dispatch: at 512 K elements a tile's forty-odd calls were a fifth
        # of its time. So no placeholder tensors, the views of a whole tile are made once, the
        # scales are written into their block buffer and their float32 copy in place, and the
        # statistics' four figures go into one buffer (one conversion per tile)
        per_tile = stats is not None and k == 1
        gather = stats is not None and k > 1 and tile < r
        m = -(-r // k)
        xs = ws.get("xs", m * c, torch.float32).view(m, groups, g) if gather else None
        ys = ws.get("ys", m * c, torch.float32).view(m, groups, g) if gather else None
        rows0 = min(tile, r)  # the rows of a whole tile (0 for an empty block: no tile)
        xf_buf = ws.get("xf", rows0 * c, torch.float32)  # exactly rows0 * c elements
        y_buf = ws.get("tmp", rows0 * c, torch.float32)
        sf_buf = ws.get("sf", rows0 * groups, torch.float32)
        dec_buf = ws.get("dec", rows0 * c, sdt) if per_tile and sdt != torch.float32 else None
        xv = x.view(r, groups, g) if x.is_contiguous() else None
        scales = torch.empty(r, groups, dtype=sdt) if not per_tensor else None
        zps = torch.empty(r, groups, dtype=torch.float32) if not s.symmetric else None
        sums = TileSums() if per_tile else None
        half = int_half_range(s.qmin, s.qmax)
        full: _TileViews | None = None
        # packed int8 in whole words: a tile's codes are copied as they are and turned into
        # offset binary (q + 128, a flip of the top bit) by one XOR over the block at the end,
        # four torch calls fewer per tile than encode_codes
        byte_codes = codes.view(torch.int8) if self.packed and s.bits == 8 and codes.shape[1] == c else None
        sf = tensor_scale.float().view(1, 1, 1) if tensor_scale is not None else None
        worst = 0.0
        pending: DecodeOverflowError | None = None
        for a in range(0, r, tile):
            b = min(a + tile, r)
            t = b - a
            if t == tile:
                tv = full = full or _TileViews(xf_buf, y_buf, sf_buf, dec_buf, t, groups, g)
            else:  # the last, shorter tile
                tv = _TileViews(xf_buf, y_buf, sf_buf, dec_buf, t, groups, g)
            xf, y = tv.xf, tv.y
            xf.copy_(xv[a:b] if xv is not None else x[a:b].reshape(t, groups, g))
            zp = None
            if per_tensor:
                pass
            elif s.symmetric:
                assert scales is not None
                sf = symmetric_tile_scale(xf, half, scales[a:b], tv.sc, mag)
            else:
                assert scales is not None and zps is not None
                mx, mn = group_range(xf)
                try:
                    scale, zp = asymmetric_params(mx, mn, s.qmin, s.qmax, sdt, s.name)
                except DecodeOverflowError as e:  # raised once the whole block is checked for NaN
                    pending = pending or e
                    continue
                zps[a:b] = zp
                scales[a:b] = scale
                tv.sc.copy_(scale)
                sf = tv.sf
            assert sf is not None
            torch.div(xf, sf, out=y)
            if zp is not None:
                y.add_(zp.unsqueeze(-1))
            y.round_().clamp_(s.qmin, s.qmax)
            if zp is not None:
                worst = max(worst, decode_worst(y, tv.sc, zp, mag, sdt))
            if byte_codes is not None:
                byte_codes[a:b].copy_(tv.y2d)
            else:
                encode_codes(tv.y2d, s.bits, self.packed, ws, out=codes[a:b])  # (y is kept)
            if sums is not None and stats is not None:
                # the codes are stored: the error overwrites them (one float32 tile less in the cache)
                zp_t = None if zp is None else zp.unsqueeze(-1)
                decode_error(xf, y, sf, zp_t, ws, sdt, out=y, rounded=tv.dec)
                stats.add_tile(tv.xflat, tv.yflat, sums)
            elif xs is not None and ys is not None:
                i0 = -(-a // k) * k  # the first sampled row of this tile
                if i0 < b:
                    src = slice(i0 - a, t, k)
                    j0 = i0 // k
                    n_s = len(range(*src.indices(t)))
                    xs[j0 : j0 + n_s].copy_(xf[src])
                    ys[j0 : j0 + n_s].copy_(y[src])
        if pending is not None:
            raise pending
        if byte_codes is not None:
            codes.bitwise_xor_(0x80)
        if worst > torch.finfo(sdt).max:
            raise DecodeOverflowError(decode_overflow_message(worst, sdt, s.name))
        if stats is not None and not per_tile and r:
            if xs is None or ys is None:  # one tile: the block itself
                xs, ys = xf[::k], y[::k]
            assert sf is not None
            sf_all = sf if per_tensor or scales is None else scales.float().unsqueeze(-1)
            zp_s = None if zps is None else zps.unsqueeze(-1)[::k]
            xs = contiguous_rows(xs, ws)
            stats.add_error(xs, decode_error(xs, ys, per_row(sf_all, r, k), zp_s, ws, sdt))
        enc_scale = sf if per_tensor else scales
        assert enc_scale is not None
        return self.encode(codes, enc_scale, zps, ws, codes=codes)

    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rebuild the dense tensor, in ``dtype`` (default: the scale's dtype, the weight's)."""
        s = self.scheme
        scale = parts["_scale"]
        dtype = dtype or scale.dtype
        rows, cols = as_rows(tuple(shape))
        if self.packed:
            q = unpack_rows(parts["_packed"], s.bits, cols).float()
        else:
            q = parts[""].reshape(rows, cols).float()
        if s.strategy == "tensor":
            w = q * scale.float().view(1, 1)
            return w.reshape(shape).to(dtype)
        groups = scale.shape[-1]
        qv = q.view(rows, groups, cols // groups)
        if not s.symmetric:
            zp = unpack_dim0(parts["_zero_point"], s.bits, rows).float()
            qv = qv - zp.view(rows, groups, 1)
        w = qv * scale.float().view(rows, groups, 1)
        return w.reshape(shape).to(dtype)
