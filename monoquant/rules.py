"""Which tensors are quantized, cast or copied — decided from name, dtype and shape only.

Defaults (for ``int``/``fp8`` schemes): floating 2-D tensors whose name ends in ``weight`` are
quantized, except names matching ``*embed*``, ``*lm_head*`` or ``*norm*`` (case-insensitive):
embeddings and heads are not ``Linear`` layers in the loaders and are the most sensitive.
1-D tensors, integer/bool tensors and float8 inputs are copied. A tensor whose columns are not a
multiple of the group size is copied with that reason.

Overrides, by precedence: ``exclude`` globs win over everything (the tensor is copied);
``include`` globs quantize a tensor the defaults would skip (name patterns, rank > 2, which is
flattened to ``[shape[0], -1]``). Globs are shell-style (``fnmatch``), case-sensitive, matched
against the full tensor name.

For the ``fp16``/``bf16`` casts every floating tensor is cast unless excluded.

Example:
    >>> import torch
    >>> from monoquant.schemes import get_scheme
    >>> decide("model.layers.0.mlp.up_proj.weight", torch.bfloat16, (512, 256), get_scheme("int4")).action
    'quantize'
    >>> decide("model.embed_tokens.weight", torch.bfloat16, (1000, 256), get_scheme("int4")).reason
    "name matches '*embed*' (kept dense by default; --include to quantize)"
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

import torch

from .dtypes import dtype_name, is_float
from .kernels import get_kernel
from .schemes import Scheme

Action = Literal["quantize", "cast", "copy"]

DEFAULT_SKIP = ("*embed*", "*lm_head*", "*norm*")


@dataclass(frozen=True)
class Rules:
    """User overrides of the default tensor selection.

    Attributes:
        include: globs of tensors to quantize even where the defaults skip them.
        exclude: globs of tensors never to touch (copied as they are); win over ``include``.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @classmethod
    def of(cls, include: str | list[str] | tuple[str, ...] | None = None, exclude: str | list[str] | tuple[str, ...] | None = None) -> Rules:
        """Build rules from a glob, a list of globs or ``None``."""
        return cls(_tuple(include), _tuple(exclude))

    def to_dict(self) -> dict[str, list[str]]:
        return {"include": list(self.include), "exclude": list(self.exclude)}


def _tuple(x: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    if not isinstance(x, (list, tuple)) or not all(isinstance(p, str) for p in x):
        from .errors import OptionError

        raise OptionError(f"include/exclude {x!r}: give a glob or a list of globs (str)")
    return tuple(x)


@dataclass(frozen=True)
class Decision:
    """What happens to one tensor, and why.

    Attributes:
        action: ``quantize``, ``cast`` or ``copy``.
        reason: a short human sentence shown in plans and dry runs.
        scheme: the scheme applied (``None`` for ``copy``).
        warn: true for skips a user probably wants to know about (e.g. group size mismatch).
        eligible: the default rules would quantize this tensor (true for every ``quantize``, and
            for a tensor that mixed precision chose to keep dense); bits per weight count these.
    """

    action: Action
    reason: str
    scheme: Scheme | None = None
    warn: bool = False
    eligible: bool = False


def _first_match(name: str, patterns: tuple[str, ...]) -> str | None:
    for p in patterns:
        if fnmatchcase(name, p):
            return p
    return None


def decide(name: str, dtype: torch.dtype, shape: tuple[int, ...], scheme: Scheme, rules: Rules = Rules()) -> Decision:
    """Decide the fate of one tensor from its name, dtype and shape."""
    excluded = _first_match(name, rules.exclude)
    if excluded is not None:
        return Decision("copy", f"excluded by {excluded!r}")
    if not is_float(dtype):
        kind = "float8" if dtype.is_floating_point else dtype_name(dtype)
        return Decision("copy", f"{kind} tensor (only float32/float16/bfloat16/float64 are converted)")
    if scheme.kind == "cast":
        if dtype == scheme.dtype:
            return Decision("copy", f"already {dtype_name(dtype)}")
        return Decision("cast", f"{dtype_name(dtype)} -> {dtype_name(scheme.dtype)}", scheme)  # type: ignore[arg-type]
    included = _first_match(name, rules.include)
    if not name.endswith("weight"):
        why = "name does not end in 'weight' (loaders expect <module>.weight)"
        return Decision("copy", why, warn=included is not None)
    if included is None:
        if len(shape) != 2:
            return Decision("copy", f"{len(shape)}-D tensor (only 2-D weights by default; --include to quantize)")
        low = name.lower()
        for p in DEFAULT_SKIP:
            if fnmatchcase(low, p):
                return Decision("copy", f"name matches {p!r} (kept dense by default; --include to quantize)")
    problem = get_kernel(scheme).check_shape(tuple(shape))
    if problem is not None:
        return Decision("copy", problem, warn=True)
    why = f"included by {included!r}" if included is not None else "2-D weight"
    return Decision("quantize", why, scheme, eligible=True)
