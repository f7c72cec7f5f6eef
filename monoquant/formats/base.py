"""The interface every format unit implements, with the defaults most of them share.

A kernel is the set of pure functions of one scheme, on blocks of whole rows: the output specs,
a shape check, the row multiple of a block, the optional first pass (per-tensor scale),
``quantize_block``, ``dequantize``. A unit subclasses :class:`Kernel`, overrides what its
format needs, and registers itself (:func:`monoquant.formats.register`).

A tensor is seen as rows (``[shape[0], prod(shape[1:])]``; 1-D tensors are one row). Every
format is row-independent given its per-tensor scale, so a caller may feed any block of whole rows
(a multiple of :attr:`Kernel.block_rows_multiple`) and get exactly the bytes one call on the whole
tensor gives.

Example:
    >>> import torch
    >>> from monoquant.schemes import get_scheme
    >>> from monoquant.kernels import get_kernel
    >>> k = get_kernel(get_scheme("int4"))
    >>> isinstance(k, Kernel), k.block_rows_multiple, k.needs_absmax
    (True, 1, False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SchemeError
from ..numerics import ErrorStats, OutSpec, Workspace, absmax, as_rows

if TYPE_CHECKING:  # pragma: no cover - the scheme is a value read by attribute only
    from ..schemes import Scheme


#: Registry key -> kernel class (filled by :func:`register` as the units are imported).
REGISTRY: dict[str, type[Any]] = {}


def register(*keys: str) -> Callable[[type[Any]], type[Any]]:
    """Class decorator: the kernel class implementing schemes of these keys (kinds or ``strategy:X``)."""

    def deco(cls: type[Any]) -> type[Any]:
        for k in keys:
            if REGISTRY.get(k, cls) is not cls:
                raise ValueError(
                    f"format key {k!r} is registered twice ({REGISTRY[k].__name__}, {cls.__name__})"
                )
            REGISTRY[k] = cls
        return cls

    return deco


def plain_shape_problem(shape: tuple[int, ...]) -> str | None:
    """Why a tensor of ``shape`` has no rows and columns to quantize, or ``None``."""
    if len(shape) < 2:
        return f"{len(shape)}-D tensor (quantization needs rows and columns)"
    rows, cols = as_rows(shape)
    if rows == 0 or cols == 0:
        return "empty tensor"
    return None


def scale_spec(
    strategy: str | None, rows: int, cols: int, group_size: int | None, sdt: torch.dtype
) -> OutSpec:
    """The ``_scale`` output of a per-tensor, per-channel or per-group scheme."""
    if strategy == "tensor":
        return OutSpec("_scale", sdt, (1,), None)
    if strategy == "channel":
        return OutSpec("_scale", sdt, (rows, 1))
    return OutSpec("_scale", sdt, (rows, cols // group_width(strategy, cols, group_size)))


def group_width(strategy: str | None, cols: int, group_size: int | None) -> int:
    """Columns sharing one scale: the group size, else the whole row."""
    return int(group_size) if strategy == "group" and group_size else cols


class Kernel:
    """Base of the format units (see the module docstring).

    Args:
        scheme: the scheme to implement.
    """

    #: dtype of :meth:`dequantize` when none is asked for and the outputs do not say (NVFP4, MX).
    default_dtype: torch.dtype | None = torch.bfloat16

    def __init__(self, scheme: Scheme):
        self.scheme = scheme

    @property
    def tiled_scratch(self) -> bool:
        """Whether :meth:`quantize_block` works in its workspace's cache-sized tiles, so that a
        second block in flight (the pipeline's kernel helper thread) costs a few MiB more, not a
        second set of whole-block temporaries. Units that allocate per block say ``False`` (the
        default) and keep one kernel thread."""
        return False

    # ---- shapes -----------------------------------------------------------------------------
    def out_specs(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[OutSpec, ...]:
        """Output tensors for an input of ``shape``/``dtype``, in on-disk order."""
        raise NotImplementedError

    def check_shape(self, shape: tuple[int, ...]) -> str | None:
        """Why a tensor of ``shape`` cannot take this scheme, or ``None`` when it can."""
        return plain_shape_problem(shape)

    @property
    def block_rows_multiple(self) -> int:
        """Blocks fed to :meth:`quantize_block` must hold a multiple of this many rows (except
        the last)."""
        return 1

    @property
    def needs_absmax(self) -> bool:
        """True when a first pass over the tensor must compute its absmax."""
        return False

    def tensor_scale(self, amax: float, dtype: torch.dtype) -> torch.Tensor:
        """The per-tensor scale for a tensor whose absmax is ``amax`` (formats with a first pass)."""
        raise SchemeError(f"{self.scheme.name} has no per-tensor scale")

    def constants(self, shape: tuple[int, ...], tensor_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Outputs computed once per tensor (``weight_shape``, a per-tensor scale)."""
        return {}

    # ---- quantize / dequantize --------------------------------------------------------------
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
        """Quantize a block of whole rows ``x`` (2-D, the input dtype) into the block-wise outputs.

        Returned tensors may be views into ``ws`` buffers: consume them before the next call.
        Constants (see :meth:`constants`) are not included. ``stats`` accumulates the error of
        every ``stats_rows``-th row of the block (1: all rows; an even spread keeps the estimate
        unbiased).

        Raises:
            NonFiniteError: the block holds NaN or Inf.
            Fp16OverflowError: an fp16 cast meets |x| > 65504 and ``clamp_fp16`` is false.
            DecodeOverflowError: a decode in the stored dtype would overflow.
        """
        raise NotImplementedError

    def dequantize(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rebuild the dense tensor from its outputs (keyed by suffix), in ``dtype``."""
        raise NotImplementedError

    def quantize_tensor(
        self,
        w: torch.Tensor,
        *,
        stats: ErrorStats | None = None,
        clamp_fp16: bool = False,
        amax: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Quantize a whole tensor held in memory; returns every output keyed by suffix.

        ``amax`` raises the tensor's own absmax for the per-tensor scale (the absmax of all
        tensors sharing it: NVFP4's global scale of a fused layer)."""
        shape = tuple(w.shape)
        rows, cols = as_rows(shape)
        x = w.detach().reshape(rows, cols)
        if x.device.type != "cpu":
            x = x.cpu()
        tscale = None
        if self.needs_absmax:
            own = absmax(x)
            tscale = self.tensor_scale(max(own, amax) if amax is not None else own, x.dtype)
        block = self.quantize_block(
            x, tensor_scale=tscale, ws=Workspace(), stats=stats, clamp_fp16=clamp_fp16
        )
        parts = dict(block)
        parts.update(self.constants(shape, tscale))
        specs = self.out_specs(shape, w.dtype)
        # fresh, canonically strided tensors (block outputs may be views into the workspace)
        return {sp.suffix: parts[sp.suffix].reshape(-1).clone().view(sp.shape) for sp in specs}
