"""The one table between safetensors dtype codes, torch dtypes and item sizes."""

from __future__ import annotations

import torch

from .errors import CheckpointError

#: safetensors code -> torch dtype. Codes torch cannot hold (e.g. F8_E8M0 on old torch) are absent.
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64")):
    if hasattr(torch, _name):
        ST_TO_TORCH[_code] = getattr(torch, _name)

TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

#: torch dtype name (as written in JSON plans) -> dtype
NAME_TO_TORCH: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in ST_TO_TORCH.values()}


_ITEMSIZE: dict[torch.dtype, int] = {}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype`` (cached: planning asks this for every output of every tensor,
    and a torch allocation per call was a measurable part of a many-tensor run)."""
    n = _ITEMSIZE.get(dtype)
    if n is None:
        n = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return n


def from_st(code: str, *, where: str = "") -> torch.dtype:
    """Torch dtype of a safetensors dtype code; a clear error for an unknown one."""
    try:
        return ST_TO_TORCH[code]
    except (KeyError, TypeError):
        known = ", ".join(sorted(ST_TO_TORCH))
        raise CheckpointError(
            f"{where}unknown safetensors dtype {code!r} (known: {known}); "
            "the file is corrupt or written by a newer tool"
        ) from None


def to_st(dtype: torch.dtype) -> str:
    """Safetensors dtype code of a torch dtype."""
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a torch dtype, e.g. ``'bfloat16'``."""
    return str(dtype).removeprefix("torch.")


def is_float(dtype: torch.dtype) -> bool:
    """True for floating dtypes that monoquant may quantize or cast (not float8 inputs)."""
    return dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
