"""Which tensors are quantized, cast or copied — decided from name, dtype and shape only.

Defaults (for ``int``/``fp8`` schemes): floating 2-D tensors whose name ends in ``weight`` are
quantized, except those whose name says they are not the weight of a ``Linear`` layer, or are one
the serving engines keep unquantized (:data:`DEFAULT_DENSE`, matched on the lower-cased name):

* embeddings: ``*embed*``, and GPT-2's ``wte``/``wpe``, T5's ``shared`` and
  ``relative_attention_bias`` (looked up, not multiplied: a quantized ``nn.Embedding`` does not
  load in transformers' default path);
* output heads ``*lm_head*`` and normalisation weights ``*norm*``;
* MoE routers: a module named ``gate`` or ``*_gate`` (Mixtral ``block_sparse_moe.gate``,
  Qwen-MoE/DeepSeek ``mlp.gate``, ``shared_expert_gate``; **not** ``gate_proj``) or any path
  with ``router`` in it: engines build them unquantized (transformers' routers are not
  ``Linear``) and they are the most sensitive weights of an MoE;
* GPT-2 ``Conv1D`` modules ``c_attn``/``c_fc``/``c_proj``/``q_attn``: they store their weight
  transposed (``[in, out]``) and are not ``Linear`` in the loaders.

These are naming conventions shared by families, not architecture tables; ``--dry-run`` shows
the rule that kept each tensor dense, and ``include`` overrides any of them.

Tensors of rank other than 2 are copied: 1-D (biases, norms), and 3-D ones such as **stacked
MoE experts** (``experts.gate_up_proj`` ``[experts, 2·inter, hidden]``): compressed-tensors
quantizes ``Linear`` modules, and transformers and vLLM build their fused expert tensors
themselves from per-expert 2-D ``Linear`` weights (which are quantized as usual); a stacked 3-D
tensor has no quantized form they load, so it is kept dense (``include`` flattens it to
``[shape[0], -1]`` for users who know their loader takes that). Integer/bool tensors and float8
inputs are copied.

**Widths that are not a multiple of the group size** (SmolLM2's 576, 960, 2880): such a tensor is
quantized with the largest of ``group_size/2``, ``group_size/4``, ... (not below
:data:`MIN_FALLBACK_GROUP`) that divides its columns, in a config group of its own (scheme name
``int4-g64``), and the plan says so. Halving keeps the group sizes the serving kernels take
(vLLM's WNA16 kernels: 32, 64, 128). ``strict_group_size`` (``--strict-group-size``) keeps such
tensors dense instead, as before. Either way the plan flags them (``warn``), and summaries
count them per reason (:func:`summarize_warnings`).

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
    "name matches '*embed*': embedding (kept dense by default; --include to quantize)"
    >>> decide("model.layers.0.mlp.gate.weight", torch.bfloat16, (64, 256), get_scheme("int4")).action
    'copy'
    >>> d = decide("model.layers.0.self_attn.q_proj.weight", torch.bfloat16, (576, 576), get_scheme("int4"))
    >>> d.action, d.scheme.name
    ('quantize', 'int4-g64')
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch

from .dtypes import dtype_name, is_float
from .kernels import as_rows, get_kernel
from .schemes import Scheme

Action = Literal["quantize", "cast", "copy"]

#: Name rules of the tensors kept dense by default: (pattern shown in the plan, regex on the
#: lower-cased name, what such a tensor is). See the module docstring.
DEFAULT_DENSE: tuple[tuple[str, str, str], ...] = (
    ("*embed*", r"embed", "embedding"),
    (
        "wte|wpe|shared|relative_attention_bias",
        r"(?:^|\.)(?:wte|wpe|shared|relative_attention_bias)\.weight$",
        "embedding",
    ),
    ("*lm_head*", r"lm_head", "output head"),
    ("*norm*", r"norm", "normalisation weight"),
    (
        "*.gate|*_gate|*router*",
        r"(?:^|\.|_)gate\.weight$|router",
        "MoE router (built unquantized by the engines; the most sensitive weight)",
    ),
    (
        "c_attn|c_fc|c_proj|q_attn",
        r"(?:^|\.)(?:c_attn|c_fc|c_proj|q_attn)\.weight$",
        "GPT-2 Conv1D (weight stored [in, out]; not a Linear in the loaders)",
    ),
)
#: Kept for callers of earlier versions: the display patterns of :data:`DEFAULT_DENSE`.
DEFAULT_SKIP = tuple(p for p, _r, _w in DEFAULT_DENSE)
_DENSE_RE = tuple((p, re.compile(r), w) for p, r, w in DEFAULT_DENSE)
#: Smallest group size a tensor falls back to when its width is not a multiple of the group size.
MIN_FALLBACK_GROUP = 32


@dataclass(frozen=True)
class Rules:
    """User overrides of the default tensor selection.

    Attributes:
        include: globs of tensors to quantize even where the defaults skip them.
        exclude: globs of tensors never to touch (copied as they are); win over ``include``.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    strict_group_size: bool = False

    @classmethod
    def of(
        cls,
        include: str | list[str] | tuple[str, ...] | None = None,
        exclude: str | list[str] | tuple[str, ...] | None = None,
        strict_group_size: bool = False,
    ) -> Rules:
        """Build rules from a glob, a list of globs or ``None``."""
        return cls(_tuple(include), _tuple(exclude), bool(strict_group_size))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"include": list(self.include), "exclude": list(self.exclude)}
        if self.strict_group_size:
            d["strict_group_size"] = True
        return d


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
        warn: true for decisions a user probably wants to know about (a group-size fallback or
            mismatch, an include that cannot take effect).
        eligible: the default rules would quantize this tensor (true for every ``quantize``, and
            for a tensor that mixed precision chose to keep dense); bits per weight count these.
        category: a short key of the kind of warning (``group-fallback``, ``group-mismatch``,
            ``include-ignored``); summaries count warnings per category.
    """

    action: Action
    reason: str
    scheme: Scheme | None = None
    warn: bool = False
    eligible: bool = False
    category: str = ""


def _first_match(name: str, patterns: tuple[str, ...]) -> str | None:
    for p in patterns:
        if fnmatchcase(name, p):
            return p
    return None


def dense_by_name(name: str) -> tuple[str, str] | None:
    """``(pattern, what)`` of the :data:`DEFAULT_DENSE` rule that keeps ``name`` dense, or ``None``.

    Example:
        >>> dense_by_name("transformer.h.0.attn.c_attn.weight")[0]
        'c_attn|c_fc|c_proj|q_attn'
        >>> dense_by_name("model.layers.0.mlp.shared_expert_gate.weight")[0]
        '*.gate|*_gate|*router*'
        >>> dense_by_name("model.layers.0.mlp.experts.3.gate_proj.weight") is None
        True
    """
    low = name.lower()
    for pattern, rx, what in _DENSE_RE:
        if rx.search(low):
            return pattern, what
    return None


def fallback_group_size(cols: int, group_size: int) -> int | None:
    """The largest of ``group_size/2, group_size/4, ...`` (>= :data:`MIN_FALLBACK_GROUP`, even)
    that divides ``cols``; ``None`` when there is none.

    Example:
        >>> fallback_group_size(576, 128), fallback_group_size(2880, 128), fallback_group_size(100, 128)
        (64, 64, None)
    """
    g = group_size
    while g % 2 == 0 and g // 2 >= MIN_FALLBACK_GROUP and g // 2 % 2 == 0:
        g //= 2
        if cols % g == 0:
            return g
    return None


def decide(
    name: str, dtype: torch.dtype, shape: tuple[int, ...], scheme: Scheme, rules: Rules = Rules()
) -> Decision:
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
        if included is not None:
            return Decision("copy", why, warn=True, category="include-ignored")
        return Decision("copy", why)
    if included is None:
        if len(shape) != 2:
            return Decision(
                "copy", f"{len(shape)}-D tensor (only 2-D weights by default; --include to quantize)"
            )
        hit = dense_by_name(name)
        if hit is not None:
            return Decision(
                "copy", f"name matches {hit[0]!r}: {hit[1]} (kept dense by default; --include to quantize)"
            )
    kernel = get_kernel(scheme)
    problem = kernel.check_shape(tuple(shape))
    if problem is not None:
        cols = as_rows(tuple(shape))[1] if len(shape) >= 2 else 0
        if scheme.strategy == "group" and cols and cols % scheme.group_size:  # type: ignore[operator]
            g = None if rules.strict_group_size else fallback_group_size(cols, scheme.group_size)  # type: ignore[arg-type]
            if g is not None:
                smaller = dataclasses.replace(scheme, group_size=g)
                why = f"{problem}: groups of {g} instead (--strict-group-size keeps it dense)"
                return Decision("quantize", why, smaller, warn=True, eligible=True, category="group-fallback")
            return Decision("copy", problem, warn=True, category="group-mismatch")
        return Decision("copy", problem, warn=True, category="shape")
    why = f"included by {included!r}" if included is not None else "2-D weight"
    return Decision("quantize", why, scheme, eligible=True)


def summarize_warnings(items: list[tuple[str, Decision]]) -> list[dict[str, Any]]:
    """One entry per warning category: its count and the first tensor as an example.

    Example:
        >>> from monoquant.schemes import get_scheme
        >>> int4 = get_scheme("int4")
        >>> ds = [(n, decide(n, torch.float32, (64, 576), int4)) for n in ("a.weight", "b.weight")]
        >>> [(w["category"], w["count"], w["example"]) for w in summarize_warnings(ds)]
        [('group-fallback', 2, 'a.weight')]
    """
    out: dict[str, dict[str, Any]] = {}
    for name, d in items:
        if not d.warn:
            continue
        key = d.category or "other"
        if key not in out:
            out[key] = {"category": key, "count": 0, "example": name, "reason": d.reason}
        out[key]["count"] += 1
    return list(out.values())
