"""The in-memory API: quantize a state dict (or a module's) you already hold, and back.

Example:
    >>> import torch, monoquant
    >>> model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.LayerNorm(64))
    >>> qsd = monoquant.quantize(model, "int4")
    >>> sorted(qsd)
    ['0.bias', '0.weight_packed', '0.weight_scale', '0.weight_shape', '1.bias', '1.weight']
    >>> qsd.decisions["1.weight"].reason
    '1-D tensor (only 2-D weights by default; --include to quantize)'
    >>> model.load_state_dict(monoquant.dequantize(qsd))
    <All keys matched successfully>
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

from .errors import TensorValueError, decode_overflow_error, fp16_overflow_error, nonfinite_error
from .fusedscales import shared_scale_groups
from .kernels import DecodeOverflowError, ErrorStats, Fp16OverflowError, NonFiniteError, absmax, get_kernel
from .layout import dequantize_group, find_groups
from .options import resolve_scheme
from .rules import Decision, Rules, decide
from .schemes import Scheme
from .storedformats import output_name


class QuantizedStateDict(dict[str, torch.Tensor]):
    """A ``dict[str, Tensor]`` in on-disk names, plus what was done to each input tensor.

    Attributes:
        decisions: input tensor name -> :class:`~monoquant.rules.Decision` (action and reason).
        schemes: input tensor name -> :class:`~monoquant.schemes.Scheme` for quantized tensors.
        stats: input tensor name -> :class:`~monoquant.kernels.ErrorStats` when asked for.
    """

    decisions: dict[str, Decision]
    schemes: dict[str, Scheme]
    stats: dict[str, ErrorStats]


def quantize(
    obj: torch.nn.Module | Mapping[str, torch.Tensor],
    scheme: str | Scheme = "int8",
    *,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    clamp_fp16: bool = False,
    stats: bool = False,
    strict_group_size: bool = False,
    **scheme_options: Any,
) -> QuantizedStateDict:
    """Quantize a state dict (or ``module.state_dict()``) in memory.

    Args:
        obj: an ``nn.Module`` or a mapping of names to tensors.
        scheme: a preset name (``int8``, ``int4``, ``fp8``, ``fp16``, ``bf16``, ...) or a Scheme.
        include: glob(s) of tensors to quantize even where the default rules skip them.
        exclude: glob(s) of tensors to leave untouched (wins over ``include``).
        clamp_fp16: saturate values beyond ±65504 in an fp16 cast instead of failing.
        stats: compute per-tensor error statistics (``result.stats``).
        strict_group_size: leave a tensor whose columns are not a multiple of the group size
            dense instead of quantizing it with smaller groups (see :mod:`monoquant.rules`).
        **scheme_options: ``group_size``, ``per_tensor``, ``asymmetric``, ``dynamic``,
            ``act_strategy``, ``optimize`` (see :func:`monoquant.schemes.get_scheme`).

    Returns:
        A new :class:`QuantizedStateDict` in the on-disk names; tensors not converted are the
        same tensor objects as in the input.

    Raises:
        SchemeError: unknown scheme or impossible options.
        TensorValueError: NaN/Inf in a converted tensor, or an fp16 overflow.
    """
    sd = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    sch = resolve_scheme(scheme, scheme_options)
    rules = Rules.of(include, exclude, strict_group_size)
    out = QuantizedStateDict()
    out.decisions, out.schemes, out.stats = {}, {}, {}
    if not isinstance(sd, Mapping):
        raise TensorValueError(
            f"quantize() takes an nn.Module or a mapping of names to tensors, not a {type(sd).__name__}"
        )
    for name, t in sd.items():
        _check_entry(name, t)
    shared = _shared_amax(sd, sch, rules)
    for name, t in sd.items():
        d = decide(name, t.dtype, tuple(t.shape), sch, rules)
        out.decisions[name] = d
        if d.action == "copy":
            out[name] = t
            continue
        assert d.scheme is not None  # every decision but "copy" has one
        st = ErrorStats() if stats else None
        try:
            extra = {"amax": shared[name]} if name in shared else {}
            parts = get_kernel(d.scheme).quantize_tensor(t, stats=st, clamp_fp16=clamp_fp16, **extra)
        except NonFiniteError:
            raise nonfinite_error(name, int((~torch.isfinite(t)).sum())) from None
        except Fp16OverflowError as e:
            raise fp16_overflow_error(name, str(e)) from None
        except DecodeOverflowError as e:
            raise decode_overflow_error(name, str(e)) from None
        for suffix, v in parts.items():
            out[output_name(name, suffix)] = v
        if d.action == "quantize":
            out.schemes[name] = d.scheme
        if st is not None:
            out.stats[name] = st
    return out


def _check_entry(name: object, t: object) -> None:
    """A state dict entry monoquant can convert: a str name and a dense tensor with data."""
    if not isinstance(name, str):
        raise TensorValueError(
            f"state dict key {name!r} is a {type(name).__name__}; tensor names must be str"
        )
    if not isinstance(t, torch.Tensor):
        raise TensorValueError(
            f"{name!r} is a {type(t).__name__}, not a tensor; pass a state dict of tensors only"
        )
    if t.layout != torch.strided:
        raise TensorValueError(f"tensor {name!r} is {t.layout} (sparse); convert it with .to_dense() first")
    if t.is_meta:
        raise TensorValueError(
            f"tensor {name!r} is on the meta device (no data); load the real weights first"
        )


def _shared_amax(sd: Mapping[str, torch.Tensor], sch: Scheme, rules: Rules) -> dict[str, float]:
    """Tensor name -> absmax over the tensors sharing its global scale (NVFP4's fused layers,
    see :func:`monoquant.fusedscales.shared_scale_groups`), as the streaming plan groups them."""
    if sch.kind != "nvfp4":
        return {}
    names = [n for n, t in sd.items() if decide(n, t.dtype, tuple(t.shape), sch, rules).action == "quantize"]
    out: dict[str, float] = {}
    for name, members in shared_scale_groups(names).items():
        with contextlib.suppress(NonFiniteError):  # reported by the member's own quantization
            out[name] = max(absmax(sd[m].detach().cpu().reshape(-1, 1)) for m in members)
    return out


def dequantize(qsd: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Turn on-disk names back into the dense state dict (original names and shapes).

    Args:
        qsd: the result of :func:`quantize`, or any mapping in compressed-tensors names (e.g.
            loaded with ``safetensors.torch.load_file``).
        dtype: dtype of the dequantized tensors (default: the stored scale's dtype, i.e. the
            original weight dtype). Tensors that were not quantized keep their dtype.

    Example:
        >>> import torch
        >>> qsd = quantize({"l.weight": torch.ones(4, 8)}, "int8")
        >>> dequantize(qsd)["l.weight"].unique().tolist()  # int8 scale = absmax / 127.5
        [0.9960784912109375]
    """
    schemes: Mapping[str, Scheme] = getattr(qsd, "schemes", {}) or {}
    groups = find_groups(qsd.keys())
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for base, g in groups.items():
        parts = {s: qsd[n] for s, n in g.names.items()}
        used.update(g.names.values())
        out[base] = dequantize_group(parts, schemes.get(base), dtype)
    for name, t in qsd.items():
        if name not in used:
            out[name] = t
    return {k: out[k] for k in _order(qsd, out)}


def _order(qsd: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor]) -> list[str]:
    """Keep the input order, with each group at the place of its first tensor."""
    seen: list[str] = []
    done: set[str] = set()
    for name in qsd:
        for cand in (
            name,
            *(name[: -len(s)] for s in ("_packed", "_scale", "_shape", "_zero_point") if name.endswith(s)),
        ):
            if cand in out and cand not in done:
                seen.append(cand)
                done.add(cand)
                break
    return seen
