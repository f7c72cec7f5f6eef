"""Read any monoquant output (or any compressed-tensors checkpoint) back, dense or as stored.

Example:
    >>> import monoquant
    >>> sd = monoquant.load("out/")                        # doctest: +SKIP  (dense state dict)
    >>> lazy = monoquant.load("out/", lazy=True)           # doctest: +SKIP  (one tensor per access)
    >>> raw = monoquant.load("out/", dequantize=False)     # doctest: +SKIP  (on-disk tensors)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import CheckpointError
from .kernels import get_kernel
from .layout import Group, dense_shape, find_groups, infer_scheme
from .schemes import Scheme


class OutputReader:
    """Index-aware access to the tensors of a safetensors checkpoint directory or file."""

    def __init__(self, path: str | os.PathLike[str]):
        from .remote import is_remote, scrub

        if is_remote(path):
            raise CheckpointError(
                f"{scrub(str(path))}: load() reads a local output; download it first (monoquant.stream and "
                "iter_quantized read an input checkpoint straight from a URL)"
            )
        self.path = Path(path)
        self.weight_map: dict[str, str] = {}
        self.metadata: dict[str, Any] = {}
        if self.path.is_file():
            self.root = self.path.parent
            with safe_open(str(self.path), framework="pt") as f:
                self.weight_map = {k: self.path.name for k in f.keys()}  # noqa: SIM118
        elif (self.path / "model.safetensors.index.json").exists():
            self.root = self.path
            try:
                index = json.loads((self.path / "model.safetensors.index.json").read_text())
                self.weight_map = dict(index["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{self.path}: unreadable index ({e})") from None
            self.metadata = index.get("metadata") or {}
        else:
            self.root = self.path
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no safetensors files and no index")
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():  # noqa: SIM118
                        self.weight_map[k] = f.name
        self.groups: dict[str, Group] = find_groups(self.weight_map)
        self._base_of = {n: b for b, g in self.groups.items() for n in g.names.values()}
        mq = self.metadata.get("monoquant") if isinstance(self.metadata, dict) else None
        self._schemes: dict[str, Scheme] = {}
        if isinstance(mq, dict):
            defs = {name: Scheme.from_dict(d) for name, d in (mq.get("schemes") or {}).items()}
            for base, sname in (mq.get("quantized") or {}).items():
                if sname in defs:
                    self._schemes[base] = defs[sname]
        self._open: dict[str, Any] = {}

    def raw(self, name: str) -> torch.Tensor:
        """One stored tensor, by its on-disk name."""
        fname = self.weight_map[name]
        h = self._open.get(fname)
        if h is None:
            if len(self._open) > 4:
                self._open.clear()
            h = self._open[fname] = safe_open(str(self.root / fname), framework="pt")
        return h.get_tensor(name)

    def scheme_of(self, base: str, parts: Mapping[str, torch.Tensor]) -> Scheme:
        return self._schemes.get(base) or infer_scheme(parts)

    def dense_names(self) -> list[str]:
        """Names of the dense state dict (quantized groups collapsed to their base name)."""
        out = []
        seen = set()
        for n in self.weight_map:
            base = self._base_of.get(n)
            if base is not None:
                if base not in seen:
                    seen.add(base)
                    out.append(base)
            else:
                out.append(n)
        return out

    def dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor of the dense state dict (dequantized when it is stored quantized)."""
        g = self.groups.get(name)
        if g is None:
            return self.raw(name)
        parts = {s: self.raw(n) for s, n in g.names.items()}
        scheme = self.scheme_of(name, parts)
        shape = tuple(int(v) for v in parts["_shape"].tolist()) if "_shape" in parts else dense_shape(parts)
        return get_kernel(scheme).dequantize(parts, shape, dtype)


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping that loads (and dequantizes) one tensor per access."""

    def __init__(self, reader: OutputReader, dequantize: bool, dtype: torch.dtype | None):
        self._r = reader
        self._deq = dequantize
        self._dtype = dtype
        self._keys = reader.dense_names() if dequantize else list(reader.weight_map)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._r.dense(key, self._dtype) if self._deq else self._r.raw(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load(
    path: str | os.PathLike[str],
    *,
    dequantize: bool = True,
    dtype: torch.dtype | None = None,
    lazy: bool = False,
) -> Mapping[str, torch.Tensor]:
    """Read a monoquant output directory (or file) back.

    Args:
        path: output directory (with ``model.safetensors.index.json``) or a safetensors file.
        dequantize: return the dense state dict in the original names; ``False`` returns the
            stored tensors as they are.
        dtype: dtype of dequantized tensors (default: the original weight dtype).
        lazy: return a mapping that reads one tensor per access (bounded memory).

    Returns:
        ``dict[str, Tensor]``, or a lazy read-only mapping when ``lazy``.
    """
    reader = OutputReader(path)
    lsd = LazyStateDict(reader, dequantize, dtype)
    return lsd if lazy else {k: lsd[k] for k in lsd}
