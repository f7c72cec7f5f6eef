"""Packing integer codes into int32 words, as compressed-tensors ``pack-quantized`` stores them.

A signed code ``q`` in ``[-2^(b-1), 2^(b-1)-1]`` is stored *offset binary*: ``u = q + 2^(b-1)``
(int4: ``q + 8`` in ``[0, 15]``; int8: ``q + 128`` in ``[0, 255]``) — not two's complement.
Codes run along a row (the input dimension) and fill each int32 word from its lowest bits::

    int4, one row: q = [-8, -7, -1, 0, 1, 2, 6, 7 | 3, -3]   ->  u = q + 8
                   u = [ 0,  1,  7, 8, 9,10,14,15 | 11, 5]

    word 0 (int32):  bit 31                                            bit 0
                     | u7 | u6 | u5 | u4 | u3 | u2 | u1 | u0 |
                     | F  | E  | A  | 9  | 8  | 7  | 1  | 0  |  = 0xFEA98710 = -22444272
    word 1 (int32):  | 0  | 0  | 0  | 0  | 0  | 0  | u9 | u8 |  = 0x0000005B = 91
                       (a row's last word is zero-padded)

    Little-endian bytes of a row = two codes per byte, element 0 in the low nibble:
        byte m = u[2m] | u[2m+1] << 4          ->  10 87 A9 FE 5B 00 00 00

    int8: four codes per word, element 4k+j in bits 8j..8j+7:
        q = [-128, -1, 0, 127 | 5]  ->  words [0xFF807F00, 0x00000085]

Asymmetric zero points ``[rows, groups]`` are packed the same way but along dimension 0
(column by column), giving ``[ceil(rows / (32/b)), groups]``.

Because safetensors stores little-endian and a row's words are contiguous, the packed row is
exactly the byte string above; monoquant builds it byte-wise and reinterprets it as int32.

Example:
    >>> import torch
    >>> pack_rows(torch.tensor([[-8, -7, -1, 0, 1, 2, 6, 7, 3, -3]]), 4).tolist()
    [[-22444272, 91]]
    >>> unpack_rows(pack_rows(torch.tensor([[-8, 7, 3]]), 4), 4, 3).tolist()
    [[-8, 7, 3]]
"""

from __future__ import annotations

import sys

import torch

from .errors import SchemeError
from .numerics import Workspace

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("monoquant's packing assumes a little-endian machine")


def codes_per_word(bits: int) -> int:
    """Codes per int32 word: 8 for int4, 4 for int8."""
    if bits not in (4, 8):
        raise SchemeError(f"only 4- and 8-bit codes are packed, not {bits}")
    return 32 // bits


def packed_cols(cols: int, bits: int) -> int:
    """int32 words per packed row of ``cols`` codes."""
    per = codes_per_word(bits)
    return (cols + per - 1) // per


def bytes_from_unsigned(
    u: torch.Tensor,
    bits: int,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pack unsigned codes ``u`` (any dtype holding integers in ``[0, 2^bits)``), shape ``[r, c]``,
    into uint8 ``[r, 4 * packed_cols(c)]`` bytes (the little-endian image of the int32 words).

    ``out`` (uint8, that shape) and ``scratch`` (``u``'s dtype, ``r * c // 2`` elements) are
    reused when given, so a chunked caller allocates nothing per chunk.
    """
    r, c = u.shape
    nbytes = 4 * packed_cols(c, bits)
    if out is None:
        out = torch.empty((r, nbytes), dtype=torch.uint8)
    if bits == 8:
        if c == nbytes:
            out.copy_(u)
        else:
            out.zero_()
            out[:, :c].copy_(u)
        return out
    # bits == 4: byte m = u[2m] + 16 * u[2m+1]
    half = c // 2
    if 2 * nbytes == c:
        pair = u.reshape(r, half, 2)
        if scratch is None:
            scratch = torch.empty(r * half, dtype=u.dtype)
        tmp = scratch[: r * half].view(r, half)
        torch.add(pair[..., 0], pair[..., 1], alpha=16, out=tmp)
        out.copy_(tmp)
        return out
    out.zero_()
    ui = u.to(torch.int32)
    if half:
        out[:, :half].copy_(ui[:, 0 : 2 * half : 2] + ui[:, 1 : 2 * half : 2] * 16)
    if c % 2:
        out[:, half].copy_(ui[:, c - 1])
    return out


def code_buffer(r: int, c: int, bits: int, packed: bool, ws: Workspace) -> torch.Tensor:
    """The ``ws`` buffer :func:`encode_codes` writes ``[r, c]`` codes to: uint8
    ``[r, 4 * packed_cols(c)]`` (``packed``) or int8 ``[r, c]``."""
    if not packed:
        return ws.get("q", r * c, torch.int8).view(r, c)
    nb = 4 * packed_cols(c, bits)
    return ws.get("u8", r * nb, torch.uint8).view(r, nb)


def encode_codes(
    y: torch.Tensor, bits: int, packed: bool, ws: Workspace, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Float codes ``y`` ``[r, c]`` (integers in ``[qmin, qmax]``) -> the stored codes: int32 rows
    packed in offset binary (``packed``) or int8 ``[r, c]`` (``y`` is not modified), written to
    ``out`` (rows of a :func:`code_buffer`) or a ``ws`` buffer.

    Example:
        >>> encode_codes(torch.tensor([[-8.0, -7, -1, 0, 1, 2, 6, 7]]), 4, True, Workspace()).tolist()
        [[-22444272]]
    """
    r, c = y.shape
    if out is None:
        out = code_buffer(r, c, bits, packed, ws)
    if not packed:
        out.copy_(y)
        return out
    nb = 4 * packed_cols(c, bits)
    u8 = out
    if bits == 8 and c == nb:
        u8.view(torch.int8).copy_(y)
        u8.bitwise_xor_(0x80)  # q + 128 on the bytes of two's complement codes
    elif bits == 4 and 2 * nb == c:
        q8 = ws.get("q4", r * c, torch.int8).view(r, c)
        q8.copy_(y)
        q8.add_(8)  # offset binary: q + 8, 0-15
        pack_nibbles(q8, out=u8, tmp=ws.get("w16", r * (c // 2), torch.int16).view(r, c // 2))
    else:  # rows that do not fill whole words: the general (slower) path
        bytes_from_unsigned(y + (1 << (bits - 1)), bits, out=u8)
    return u8.view(torch.int32)


def pack_nibbles(
    codes: torch.Tensor, out: torch.Tensor | None = None, tmp: torch.Tensor | None = None
) -> torch.Tensor:
    """``[r, c]`` 8-bit codes 0-15 (c even) -> ``[r, c/2]`` uint8 bytes, column ``2j`` in the low
    nibble, into ``out`` when given (``tmp``: an int16 ``[r, c/2]`` scratch). A pair read as one
    little-endian int16 is ``w = lo | hi << 8``, and the low byte of ``w | w >> 4`` is
    ``lo | hi << 4``: contiguous integer passes, several times faster than strided pairs.

    Example:
        >>> pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist()
        [[33, 15]]
    """
    if sys.byteorder != "little":
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        return packed if out is None else out.copy_(packed)
    w = codes.contiguous().view(torch.int16)
    t = torch.bitwise_right_shift(w, 4, out=tmp)
    t.bitwise_or_(w)
    return t.to(torch.uint8) if out is None else out.copy_(t)  # int16 -> uint8 keeps the low byte


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes ``q`` ``[r, c]`` along rows into int32 ``[r, packed_cols(c)]``."""
    if q.dim() != 2:
        raise SchemeError(f"pack_rows needs a 2-D tensor, got shape {tuple(q.shape)}")
    u = q.to(torch.int32) + (1 << (bits - 1))
    return bytes_from_unsigned(u, bits).view(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[r, w]`` -> int8 codes ``[r, cols]``."""
    r = packed.shape[0]
    b = packed.contiguous().reshape(-1).view(torch.uint8).reshape(r, -1).to(torch.int16)
    # int8: one code per byte; int4: two per byte, low nibble first
    u = b[:, :cols] if bits == 8 else torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(r, -1)[:, :cols]
    return (u - (1 << (bits - 1))).to(torch.int8)


def pack_dim0(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes ``[r, g]`` along dimension 0 -> int32 ``[packed_cols(r), g]``
    (the layout of compressed-tensors' asymmetric zero points)."""
    return pack_rows(q.t(), bits).t().contiguous()


def unpack_dim0(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_dim0`."""
    return unpack_rows(packed.t().contiguous(), bits, rows).t().contiguous()
