"""Schemes as values: what a quantized (or cast) tensor looks like.

A :class:`Scheme` is a frozen description (bits, integer or float, symmetric or not, granularity,
whether activations are declared dynamic). Named presets cover the common cases and options make
the variants::

    >>> from monoquant.schemes import get_scheme
    >>> get_scheme("int4").name
    'int4-g128'
    >>> get_scheme("int4", group_size=64, asymmetric=True).name
    'int4-g64-asym'
    >>> get_scheme("int8", per_tensor=True).format
    'pack-quantized'
    >>> get_scheme("int8", dynamic=True).format
    'int-quantized'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch

from .dtypes import NAME_TO_TORCH, dtype_name
from .errors import SchemeError

Kind = Literal["int", "float", "cast", "nvfp4", "mxfp4", "mxfp8"]
Strategy = Literal["tensor", "channel", "group", "block", "tensor_group"]
ActStrategy = Literal["token", "tensor", "group", "tensor_group"]

#: Kinds implemented by the registered format units of :mod:`monoquant.formats` (microscaling
#: floats: fixed group size, scale encoding and packing, see docs/format.md).
MICROSCALE_KINDS = ("nvfp4", "mxfp4", "mxfp8")

#: Version of the numerics and on-disk layout. It enters every plan fingerprint: bump it when
#: the bytes monoquant writes for the same input and options change.
FORMAT_VERSION = 3


@dataclass(frozen=True)
class Scheme:
    """A frozen description of how a tensor is stored.

    Attributes:
        kind: ``"int"`` (integer codes + scale), ``"float"`` (float8 + scale) or ``"cast"``
            (plain dtype change, no scale).
        bits: bits per stored weight element (8 or 4 for ``int``, 8 for ``float``, 16 for ``cast``).
        strategy: scale granularity: one per tensor, per output channel (row), or per group of
            ``group_size`` input columns. ``None`` for casts.
        group_size: columns per group when ``strategy == "group"``.
        symmetric: symmetric codes (no zero point); ``False`` writes ``weight_zero_point``.
        dynamic: activations are declared dynamic (quantized by the runtime); changes the format.
        act_strategy: ``"token"`` or ``"tensor"`` granularity of the dynamic activations.
        dtype: storage dtype for ``float`` (float8_e4m3fn) and the target dtype of a ``cast``.
        optimize: search the clipping range that minimises the reconstruction error instead of
            plain round-to-nearest (same on-disk format).
    """

    kind: Kind
    bits: int
    strategy: Strategy | None = None
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    act_strategy: ActStrategy | None = None
    dtype: torch.dtype | None = None
    optimize: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Canonical label, e.g. ``int8``, ``int4-g128``, ``int8-tensor-dynamic``, ``fp16``."""
        if self.kind == "cast":
            return "fp16" if self.dtype == torch.float16 else "bf16"
        if self.kind in MICROSCALE_KINDS:  # CT preset names: nvfp4a16 / nvfp4 (W4A4), ...
            return self.kind + ("" if self.dynamic else "a16") + ("-opt" if self.optimize else "")
        if self.strategy == "block":
            return "fp8-block"
        base = "fp8" if self.kind == "float" else f"int{self.bits}"
        if self.strategy == "group":
            gran = f"-g{self.group_size}"
        elif self.strategy == "tensor":
            gran = "-tensor"
        elif self.kind == "int" and self.bits == 4:
            gran = "-channel"
        else:
            gran = ""
        parts = [base + gran]
        if not self.symmetric:
            parts.append("asym")
        if self.dynamic:
            parts.append("dynamic" if self.act_strategy == "token" else "dynamic-tensor")
        if self.optimize:
            parts.append("opt")
        return "-".join(parts)

    @property
    def format(self) -> str | None:
        """The compressed-tensors format this scheme is written in (``None`` for casts)."""
        if self.kind == "cast":
            return None
        if self.kind in ("nvfp4", "mxfp4"):
            return f"{self.kind}-pack-quantized"
        if self.kind == "mxfp8":
            return "mxfp8-quantized"
        if self.kind == "float":
            return "float-quantized" if self.dynamic else "naive-quantized"
        return "int-quantized" if self.dynamic else "pack-quantized"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def packed(self) -> bool:
        """True when codes are packed into int32 words (``weight_packed``)."""
        return self.format == "pack-quantized"

    def compat_notes(self) -> list[str]:
        """Where this scheme's output does *not* load, as known (see docs/loading.md)."""
        notes = []
        if self.kind == "int" and not self.symmetric:
            notes.append(
                "asymmetric int: transformers' default path cannot load packed zero points; use "
                "CompressedTensorsConfig(dequantize=True) or vLLM's zero-point kernels"
            )
        if self.format == "pack-quantized" and self.strategy == "tensor":
            notes.append("per-tensor pack-quantized: vLLM's WNA16 kernels take channel or group scales only")
        if self.dynamic and self.act_strategy == "tensor":
            notes.append("dynamic per-tensor activations: vLLM implements dynamic activations per token")
        if self.kind == "nvfp4" and self.dynamic:
            notes.append(
                "nvfp4 W4A4 without calibration: input_global_scale is written as 1.0 (activation block "
                "scales held directly in fp8, |x| up to 2688); calibrate for the best activation accuracy"
            )
        if self.strategy == "block":
            notes.append(
                "fp8-block: vLLM needs the output size of each fused partition (q/k/v, gate/up) to be a "
                "multiple of 128 (and the input size for row-parallel layers)"
            )
        return notes

    def bits_per_weight(self, shape: tuple[int, ...], scale_bytes: int = 2) -> float:
        """Storage bits per weight element including scales and zero points, for ``shape``."""
        from .kernels import get_kernel

        numel = 1
        for s in shape:
            numel *= s
        specs = get_kernel(self).out_specs(tuple(shape), _scale_dtype(scale_bytes))
        return 8.0 * sum(s.nbytes for s in specs) / max(numel, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (used in plans, fingerprints and index metadata)."""
        d = dataclasses.asdict(self)
        d["dtype"] = dtype_name(self.dtype) if self.dtype is not None else None
        d["name"] = self.name
        d["format"] = self.format
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scheme:
        """Inverse of :meth:`to_dict`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if kw.get("dtype") is not None:
            kw["dtype"] = NAME_TO_TORCH[kw["dtype"]]
        return cls(**kw)

    def ct_weights_args(self) -> dict[str, Any]:
        """The ``weights`` block of a compressed-tensors config group."""
        if self.kind in MICROSCALE_KINDS or self.strategy == "block":
            return _ct_microscale_args(self, activations=False)
        return {
            "num_bits": self.bits,
            "type": "float" if self.kind == "float" else "int",
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": self.group_size if self.strategy == "group" else None,
            "dynamic": False,
            "actorder": None,
            "block_structure": None,
            "observer": "minmax",
            "observer_kwargs": {},
        }

    def ct_input_args(self) -> dict[str, Any] | None:
        """The ``input_activations`` block (only for dynamic schemes)."""
        if not self.dynamic:
            return None
        if self.kind in MICROSCALE_KINDS or self.strategy == "block":
            return _ct_microscale_args(self, activations=True)
        return {
            "num_bits": 8,
            "type": "float" if self.kind == "float" else "int",
            "symmetric": True,
            "strategy": self.act_strategy,
            "group_size": None,
            "dynamic": True,
            "actorder": None,
            "block_structure": None,
            "observer": None,
            "observer_kwargs": {},
        }


def _ct_microscale_args(s: Scheme, activations: bool) -> dict[str, Any]:
    """Weights or input-activation args of the FP8-block, NVFP4 and MX schemes, as the
    compressed-tensors presets ``FP8_BLOCK``, ``NVFP4A16``/``NVFP4``, ``MXFP4A16``/``MXFP4``,
    ``MXFP8A16``/``MXFP8`` serialize them."""
    d: dict[str, Any] = {
        "num_bits": s.bits,
        "type": "float",
        "symmetric": True,
        "group_size": s.group_size,
        "strategy": s.strategy,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    if s.kind == "nvfp4":
        d["scale_dtype"] = "torch.float8_e4m3fn"
    elif s.kind in MICROSCALE_KINDS:
        d["scale_dtype"] = "torch.uint8"
    if s.strategy == "block":
        d.update(group_size=None, block_structure=[128, 128])
    if activations:
        d.update(observer=None, dynamic=True, block_structure=None)
        if s.strategy == "block":  # FP8_BLOCK: fp8 activations per token-group of 128
            d.update(num_bits=8, group_size=128, strategy="group")
        elif s.kind == "nvfp4":  # local (group) scales dynamic, global scale static
            d.update(dynamic="local", observer="static_minmax")
    return d


def _scale_dtype(nbytes: int) -> torch.dtype:
    return {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[nbytes]


def _validate(s: Scheme) -> None:
    if s.kind not in ("int", "float", "cast", *MICROSCALE_KINDS):
        raise SchemeError(f"scheme kind must be int, float, cast, nvfp4, mxfp4 or mxfp8, not {s.kind!r}")
    if s.kind in MICROSCALE_KINDS or s.strategy == "block":
        _validate_microscale(s)
        return
    if s.kind == "cast":
        if s.dtype not in (torch.float16, torch.bfloat16):
            raise SchemeError("a cast scheme needs dtype float16 or bfloat16")
        if s.strategy is not None or s.dynamic or not s.symmetric or s.optimize:
            raise SchemeError(
                "fp16/bf16 are plain casts: --group-size, --per-tensor, --asymmetric, "
                "--dynamic and --optimize do not apply to them"
            )
        return
    if s.kind == "int" and s.bits not in (4, 8):
        raise SchemeError(f"integer schemes support 4 or 8 bits, not {s.bits}")
    if s.kind == "float" and (s.bits != 8 or s.dtype != torch.float8_e4m3fn):
        raise SchemeError("the float scheme is fp8 (float8_e4m3fn, 8 bits)")
    if s.strategy not in ("tensor", "channel", "group"):
        raise SchemeError(f"strategy must be tensor, channel or group, not {s.strategy!r}")
    if s.strategy == "group":
        if not isinstance(s.group_size, int) or s.group_size < 2 or s.group_size % 2:
            raise SchemeError(f"group size must be an even integer >= 2, not {s.group_size!r}")
        if s.kind == "float":
            raise SchemeError("fp8 supports per-channel or --per-tensor scales, not groups")
    elif s.group_size is not None:
        raise SchemeError("group_size is only meaningful with the group strategy")
    if not s.symmetric:
        if s.kind != "int":
            raise SchemeError("--asymmetric applies to integer schemes only")
        if s.strategy == "tensor":
            raise SchemeError("--asymmetric needs per-channel or group scales, not --per-tensor")
        if s.dynamic:
            raise SchemeError("--dynamic (W8A8) weights are symmetric; drop --asymmetric")
    if s.dynamic:
        if s.kind == "int" and s.bits != 8:
            raise SchemeError("--dynamic needs 8-bit weights: use --int8 --dynamic (W8A8)")
        if s.strategy == "group":
            raise SchemeError("--dynamic weights use per-channel or --per-tensor scales")
        if s.act_strategy not in ("token", "tensor"):
            raise SchemeError("--act-strategy must be token or tensor")
    elif s.act_strategy is not None:
        raise SchemeError("--act-strategy needs --dynamic")
    if s.optimize and s.kind != "int":
        raise SchemeError("--optimize applies to integer schemes (int8, int4)")


#: The fixed layout of each microscaling kind: (bits, strategy, group size, element dtype).
_MICRO: dict[str, tuple[int, Strategy, int, torch.dtype | None]] = {
    "nvfp4": (4, "tensor_group", 16, None),
    "mxfp4": (4, "group", 32, None),
    "mxfp8": (8, "group", 32, torch.float8_e4m3fn),
}


def _validate_microscale(s: Scheme) -> None:
    if s.strategy == "block":
        if s.kind != "float" or s.bits != 8 or s.dtype != torch.float8_e4m3fn or s.group_size is not None:
            raise SchemeError("the block strategy is fp8-block (float8_e4m3fn, 128x128 blocks)")
        if not s.dynamic or s.act_strategy != "group":
            raise SchemeError("fp8-block declares dynamic activations per token-group of 128")
        if not s.symmetric or s.optimize:
            raise SchemeError("fp8-block takes no --asymmetric or --optimize")
        return
    bits, strategy, group, dtype = _MICRO[s.kind]
    if (s.bits, s.strategy, s.group_size, s.dtype) != (bits, strategy, group, dtype) or not s.symmetric:
        raise SchemeError(
            f"{s.kind} has a fixed layout (groups of {group}, symmetric): --group-size, --per-tensor, "
            "--per-channel and --asymmetric do not apply"
        )
    want = strategy if s.kind != "nvfp4" else "tensor_group"
    if s.dynamic and s.act_strategy != want:
        raise SchemeError(f"{s.kind} activations are declared per group ({want}); drop --act-strategy")
    if not s.dynamic and s.act_strategy is not None:
        raise SchemeError("--act-strategy needs --dynamic")
    if s.optimize and s.kind == "mxfp8":
        raise SchemeError("--optimize applies to int8, int4, nvfp4 and mxfp4")


def _micro(kind: str, dynamic: bool = False) -> Scheme:
    bits, strategy, group, dtype = _MICRO[kind]
    act: ActStrategy | None = ("tensor_group" if kind == "nvfp4" else "group") if dynamic else None
    return Scheme(
        kind=cast(Kind, kind),
        bits=bits,
        strategy=strategy,
        group_size=group,
        dtype=dtype,
        dynamic=dynamic,
        act_strategy=act,
    )


def _int(bits: int, strategy: Strategy, group: int | None = None, **kw: Any) -> Scheme:
    return Scheme(kind="int", bits=bits, strategy=strategy, group_size=group, **kw)


def _fp8(strategy: Strategy, **kw: Any) -> Scheme:
    return Scheme(kind="float", bits=8, strategy=strategy, dtype=torch.float8_e4m3fn, **kw)


#: Named presets. Options (group size, per tensor, asymmetric, dynamic) derive the variants.
PRESETS: dict[str, Scheme] = {
    "int8": _int(8, "channel"),
    "int8-tensor": _int(8, "tensor"),
    "int8-g128": _int(8, "group", 128),
    "int4": _int(4, "group", 128),
    "int4-g32": _int(4, "group", 32),
    "int4-g64": _int(4, "group", 64),
    "int4-g128": _int(4, "group", 128),
    "int4-channel": _int(4, "channel"),
    "int4-asym": _int(4, "group", 128, symmetric=False),
    "fp8": _fp8("channel"),
    "fp8-tensor": _fp8("tensor"),
    "w8a8": _int(8, "channel", dynamic=True, act_strategy="token"),
    "fp8-dynamic": _fp8("channel", dynamic=True, act_strategy="token"),
    "fp16": Scheme(kind="cast", bits=16, dtype=torch.float16),
    "bf16": Scheme(kind="cast", bits=16, dtype=torch.bfloat16),
}

#: The formats the largest models ship in (compressed-tensors presets FP8_BLOCK, NVFP4A16,
#: NVFP4, MXFP4A16, MXFP4, MXFP8A16, MXFP8), implemented by :mod:`monoquant.formats`. Kept apart
#: from :data:`PRESETS` so that code and tests iterating the classic presets are unchanged.
FORMAT_PRESETS: dict[str, Scheme] = {
    "fp8-block": _fp8("block", dynamic=True, act_strategy="group"),
    "nvfp4a16": _micro("nvfp4"),
    "nvfp4": _micro("nvfp4", dynamic=True),
    "mxfp4a16": _micro("mxfp4"),
    "mxfp4": _micro("mxfp4", dynamic=True),
    "mxfp8a16": _micro("mxfp8"),
    "mxfp8": _micro("mxfp8", dynamic=True),
}


def get_scheme(
    scheme: str | Scheme = "int8",
    *,
    group_size: int | None = None,
    per_tensor: bool = False,
    per_channel: bool = False,
    asymmetric: bool = False,
    dynamic: bool = False,
    act_strategy: str | None = None,
    optimize: bool = False,
) -> Scheme:
    """Resolve a preset name (or a :class:`Scheme`) plus options into a :class:`Scheme`.

    Args:
        scheme: a preset name (see :data:`PRESETS`; canonical names such as ``int4-g64-asym``
            are accepted too) or a ready scheme.
        group_size: scales per group of this many input columns.
        per_tensor: one scale for the whole tensor.
        per_channel: one scale per output channel (row).
        asymmetric: integer codes with a zero point.
        dynamic: declare activations dynamic (W8A8 for int8, FP8-dynamic for fp8).
        act_strategy: ``token`` (default with ``dynamic``) or ``tensor``.
        optimize: error-minimising scales instead of plain absmax (integer schemes).

    Raises:
        SchemeError: unknown name (the message lists the known ones) or impossible options.

    Example:
        >>> get_scheme("int8", group_size=128).name
        'int8-g128'
    """
    if isinstance(scheme, Scheme):
        base = scheme
    else:
        key = str(scheme).lower().replace("_", "-")
        found = PRESETS.get(key) or FORMAT_PRESETS.get(key) or _parse_name(key)
        if found is None:
            known = ", ".join([*PRESETS, *FORMAT_PRESETS])
            raise SchemeError(
                f"unknown scheme {scheme!r}; known schemes: {known} "
                "(plus canonical names such as int4-g64-asym or int8-tensor-dynamic)"
            )
        base = found
    if base.kind in MICROSCALE_KINDS or base.strategy == "block":
        return _micro_options(
            base, group_size, per_tensor, per_channel, asymmetric, dynamic, act_strategy, optimize
        )
    given = sum(bool(x) for x in (group_size is not None, per_tensor, per_channel))
    if given > 1:
        raise SchemeError("choose one of --group-size, --per-tensor and --per-channel")
    changes: dict[str, Any] = {}
    if group_size is not None:
        changes.update(strategy="group", group_size=_as_int(group_size))
    elif per_tensor:
        changes.update(strategy="tensor", group_size=None)
    elif per_channel:
        changes.update(strategy="channel", group_size=None)
    if asymmetric:
        changes["symmetric"] = False
    if dynamic and not base.dynamic:
        changes.update(dynamic=True, act_strategy=act_strategy or "token")
    elif act_strategy is not None:
        changes["act_strategy"] = act_strategy
    if optimize:
        changes["optimize"] = True
    if base.kind == "cast" and changes:
        flags = ", ".join(sorted(changes))
        raise SchemeError(f"{base.name} is a plain cast; options {flags} do not apply")
    return dataclasses.replace(base, **changes) if changes else base


def _micro_options(
    base: Scheme,
    group_size: int | None,
    per_tensor: bool,
    per_channel: bool,
    asymmetric: bool,
    dynamic: bool,
    act_strategy: str | None,
    optimize: bool,
) -> Scheme:
    """Options on an FP8-block/NVFP4/MX scheme: only ``dynamic`` (W4A4/W8A8) and ``optimize``."""
    if group_size is not None or per_tensor or per_channel or asymmetric or act_strategy is not None:
        raise SchemeError(
            f"{base.name} has a fixed layout: --group-size, --per-tensor, --per-channel, --asymmetric and "
            "--act-strategy do not apply (use --dynamic for the W4A4/W8A8 variant)"
        )
    changes: dict[str, Any] = {}
    if dynamic and not base.dynamic:
        changes.update(dynamic=True, act_strategy="tensor_group" if base.kind == "nvfp4" else "group")
    if optimize:
        changes["optimize"] = True
    return dataclasses.replace(base, **changes) if changes else base


def _parse_name(key: str) -> Scheme | None:
    """Parse a canonical name (``int4-g64-asym``, ``int8-tensor-dynamic``, ``fp8-opt`` ...)."""
    head, *mods = key.split("-")
    base = PRESETS.get(head) or FORMAT_PRESETS.get(head)
    if base is None or not mods:
        return None
    opts: dict[str, Any] = {}
    for m in mods:
        if m.startswith("g") and m[1:].isdigit():
            opts["group_size"] = int(m[1:])
        elif m == "tensor" and opts.get("dynamic"):
            opts["act_strategy"] = "tensor"
        elif m in ("tensor", "channel"):
            opts["per_" + m] = True
        elif m == "asym":
            opts["asymmetric"] = True
        elif m == "dynamic":
            opts["dynamic"] = True
        elif m == "opt":
            opts["optimize"] = True
        else:
            return None
    try:
        return get_scheme(base, **opts)
    except SchemeError:
        return None


def _as_int(v: Any) -> Any:
    """``int(v)`` when it is an integer value; otherwise ``v`` unchanged (the validation then names it)."""
    try:
        return int(v) if float(v) == int(float(v)) else v
    except (TypeError, ValueError, OverflowError):
        return v
