"""The finished output directory: index, ``config.json`` with ``quantization_config``, side files.

The ``quantization_config`` is written the way compressed-tensors' own writer writes it (checked
against compressed-tensors 0.17, which vLLM 0.32 pins, and 0.20; see ``docs/format.md``):
``quant_method: compressed-tensors``, ``quantization_status: compressed``, ``format`` in every
config group *and* at top level, only keys both versions' ``QuantizationConfig`` know (no
provenance: vLLM parses this block and fails on keys it does not expect, e.g. a string
``producer``). Targets are the class name ``Linear`` (engines rename and fuse layers: vLLM's
BERT names its fused q/k/v ``attention.output.qkv_proj``, which only a class target matches)
plus an ``ignore`` list of every Linear-like module left dense; see :func:`config_targets` for
several config groups.

The index ``metadata`` holds ``total_size`` (transformers needs a ``metadata`` object) and a
``monoquant`` block with the provenance: version, fingerprint, options, each quantized tensor's
scheme and the same quantization description, so an input without ``config.json`` still yields
a self-describing output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .atomicfile import atomic_write
from .dtypes import dtype_name
from .errors import OutputError
from .outnames import CONFIG_NAME, INDEX_NAME, STATE_DIR
from .plan import Plan, module_of
from .schemes import FORMAT_VERSION, Scheme


def check_paths(src: Path, dst: Path) -> None:
    """Refuse an output equal to, inside, or containing the input (for a single-file input:
    the file itself or the directory holding it; a sibling directory is fine)."""
    if dst.exists() and not dst.is_dir():
        raise OutputError(f"{dst}: exists and is not a directory; choose a new output directory")
    s = src.resolve()
    d = dst.resolve()
    if s.is_file():
        if d == s or d == s.parent or d in s.parents:
            raise OutputError(
                f"{dst}: the output directory holds the input file {src}; choose a new directory"
            )
        return
    if d == s:
        raise OutputError(f"{dst}: the output directory is the input; choose a new directory")
    if s in d.parents:
        raise OutputError(
            f"{dst}: the output directory is inside the input {src}; choose a directory outside it"
        )
    if d in s.parents:
        raise OutputError(
            f"{dst}: the output directory contains the input {src}; choose a directory beside it"
        )


#: keys of ``quantization_config`` both compressed-tensors 0.17 and 0.20 know (the
#: ``QuantizationConfig`` fields plus the writer's ``sparsity_config``/``transform_config``);
#: a test validates the written config against the installed compressed-tensors and vLLM
CONFIG_KEYS = (
    "quant_method",
    "format",
    "quantization_status",
    "config_groups",
    "ignore",
    "kv_cache_scheme",
    "global_compression_ratio",
    "sparsity_config",
    "transform_config",
)


def quantization_config(plan: Plan) -> dict[str, Any] | None:
    """The compressed-tensors ``quantization_config`` of a plan (``None`` for casts)."""
    schemes: dict[str, Scheme] = {}
    by_scheme: dict[str, list[str]] = {}
    quantized = [t for t in plan.tensors if t.decision.action == "quantize" and t.decision.scheme is not None]
    for t in quantized:
        s = t.decision.scheme
        assert s is not None  # filtered above
        schemes[s.name] = s
        by_scheme.setdefault(s.name, []).append(module_of(t.ref.name))
    if not by_scheme:
        return None
    modules = [module_of(t.ref.name) for t in plan.tensors]
    # every dense 2-D weight's module is listed in ``ignore``: the class target ``Linear`` would
    # otherwise claim it (e.g. one left dense by --exclude or a group-size mismatch)
    qnames = {t.ref.name for t in quantized}
    dense = sorted(
        {
            module_of(t.ref.name)
            for t in plan.tensors
            if t.ref.name not in qnames
            and t.ref.name.endswith(".weight")
            and len(t.ref.shape) == 2
            and t.ref.dtype.is_floating_point
        }
    )
    targets, ignore = config_targets(by_scheme, dense, modules)
    config_groups = {}
    for i, name in enumerate(sorted(by_scheme)):
        s = schemes[name]
        config_groups[f"group_{i}"] = {
            "targets": targets[name],
            "weights": s.ct_weights_args(),
            "input_activations": s.ct_input_args(),
            "output_activations": None,
            "format": s.format,
        }
    formats = {schemes[n].format for n in by_scheme}
    qc = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
    assert tuple(qc) == CONFIG_KEYS
    return qc


def config_targets(
    by_scheme: dict[str, list[str]], dense: list[str], modules: Iterable[str]
) -> tuple[dict[str, list[str]], list[str]]:
    """The ``targets`` of each scheme's config group, and the ``ignore`` list.

    The group with the most modules targets the class ``Linear``; any other group (mixed
    precision) names its modules with :func:`module_targets` regexes. compressed-tensors and vLLM
    both try name and regex targets before class targets, so each module gets its own group's
    scheme. ``ignore`` names every dense 2-D weight's module, plus ``lm_head`` when the checkpoint
    has none (tied to the embeddings: the model still builds an ``lm_head`` Linear).

    Example:
        >>> t, ign = config_targets({"int4": ["m.l0.q", "m.l0.k"], "int8": ["m.l1.q"]}, ["m.l1.k"],
        ...                         ["m.l0.q", "m.l0.k", "m.l1.q", "m.l1.k"])
        >>> print(t["int4"], *t["int8"], *ign)
        ['Linear'] re:^(?:.*\\.)?l1\\.q$ lm_head re:^(?:.*\\.)?l1\\.k$
    """
    modules = list(modules)
    major = max(sorted(by_scheme), key=lambda n: len(by_scheme[n]))
    named = module_targets([m for n, ms in by_scheme.items() if n != major for m in ms], modules)
    targets = {n: ["Linear"] if n == major else sorted({named[m] for m in ms}) for n, ms in by_scheme.items()}
    ignore = set(module_targets(dense, modules).values())
    if not any(m == "lm_head" or m.endswith(".lm_head") for m in modules):
        ignore.add("lm_head")
    return targets, sorted(ignore)


def module_targets(quantized: list[str], modules: Iterable[str]) -> dict[str, str]:
    """The config-group target of each quantized module path.

    transformers changes module paths when a checkpoint is loaded into another class: it adds
    the base-model prefix (a ``BertModel`` checkpoint in ``BertForSequenceClassification``:
    ``encoder.layer.0...`` becomes ``bert.encoder.layer.0...``) or strips it (a
    ``LlamaForCausalLM`` checkpoint in ``LlamaModel``: ``model.layers.0...`` becomes
    ``layers.0...``), and compressed-tensors matches targets against those paths. A target
    anchored on the checkpoint path then matches nothing and every quantized Linear is left
    randomly initialised. So a target accepts any leading components and, when what remains
    still has two components and is a suffix of no other module of this checkpoint, the path
    without its first component. Where even the full path is a dot-suffix of another module
    path, the target stays anchored (exact).

    Example:
        >>> t = module_targets(["model.layers.0.q_proj"], ["model.layers.0.q_proj", "lm_head"])
        >>> print(t["model.layers.0.q_proj"])
        re:^(?:.*\\.)?layers\\.0\\.q_proj$
    """
    counts = Counter(suffix for m in set(modules) for suffix in _dot_suffixes(m))
    out = {}
    for path in quantized:
        _first, dot, rest = path.partition(".")
        if dot and "." in rest and counts[rest] == 1:
            out[path] = r"re:^(?:.*\.)?" + re.escape(rest) + "$"
        elif counts[path] == 1:
            out[path] = r"re:^(?:.*\.)?" + re.escape(path) + "$"
        else:
            out[path] = "re:^" + re.escape(path) + "$"
    return out


def _dot_suffixes(path: str) -> set[str]:
    """``a.b.c`` -> ``{a.b.c, b.c, c}``."""
    parts = path.split(".")
    return {".".join(parts[i:]) for i in range(len(parts))}


def _version() -> str:
    from . import __version__

    return __version__


def index_json(plan: Plan) -> dict[str, Any]:
    """The ``model.safetensors.index.json`` object of a plan."""
    weight_map = {}
    for t in plan.tensors:
        for o in t.outputs:
            weight_map[o.name] = plan.shards[t.shard].filename
    total = sum(s.data_size for s in plan.shards)
    tensors = {
        t.ref.name: t.decision.scheme.name
        for t in plan.tensors
        if t.decision.action == "quantize" and t.decision.scheme
    }
    schemes = {s.name: s.to_dict() for s in plan.schemes_used().values()}
    return {
        "metadata": {
            "total_size": total,
            "monoquant": {
                "version": _version(),
                "format_version": FORMAT_VERSION,
                "fingerprint": plan.fingerprint,
                "scheme": plan.scheme.name,
                "schemes": schemes,
                "quantized": tensors,
                "quantization_config": quantization_config(plan),
            },
        },
        "weight_map": dict(sorted(weight_map.items())),
    }


def output_config(plan: Plan, config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The input ``config.json`` updated for the output (``None`` when the input has none)."""
    if config is None:
        return None
    cfg = dict(config)
    qc = quantization_config(plan)
    if qc is not None:
        cfg["quantization_config"] = qc
    else:
        cfg.pop("quantization_config", None)
    cast_to = plan.scheme.dtype if plan.scheme.kind == "cast" else None
    if cast_to is not None:
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = dtype_name(cast_to)
    return cfg


def finalize(
    out_dir: Path, plan: Plan, side_files: list[Path], src_root: Path, config: dict[str, Any] | None
) -> None:
    """Copy side files, write ``config.json``, then the index (last, atomically). The index lists
    the side files (``metadata.monoquant.files``): a later ``--restart`` deletes exactly those."""
    scratch = out_dir / STATE_DIR  # removed with the job state: no temp file outlives a kill
    tmp: Path | None = None
    written = []
    from .remote import copy_file  # side files of a remote checkpoint are read by ranges too

    try:
        for p in side_files:
            rel = p.relative_to(src_root)
            written.append(rel.as_posix())
            if rel.as_posix() == CONFIG_NAME:
                continue
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = scratch / f".{dst.name}.{os.getpid()}.tmp"
            copy_file(p, tmp)
            os.replace(tmp, dst)
            tmp = None
        cfg = output_config(plan, config)
        if cfg is not None:
            atomic_write(out_dir / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode(), scratch)
        index = index_json(plan)
        index["metadata"]["monoquant"]["files"] = sorted(written)
        atomic_write(out_dir / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode(), scratch)
    except OSError as e:
        from .writer import os_error

        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise os_error(e, out_dir, "writing the index and side files") from None


def completed_fingerprint(out_dir: Path) -> str | None:
    """Fingerprint recorded in a finished output's index, or ``None`` when there is none."""
    p = out_dir / INDEX_NAME
    try:
        meta = json.loads(p.read_text())["metadata"]["monoquant"]
        return str(meta["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
