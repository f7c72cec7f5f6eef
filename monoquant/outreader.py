"""The one reader of outputs: index, shards, scheme metadata, and decoding of quantized tensors.

:func:`monoquant.load` and :func:`monoquant.verify.verify` (and ``monoquant inspect``) read an
output through this module, so the layout is decoded in one place:

* the shards and the index are opened with :func:`monoquant.reader.open_checkpoint` (headers
  only, cross-checked against the index);
* the quantized tensors are found by their on-disk names (:func:`monoquant.layout.find_groups`);
* each one's scheme comes from the index metadata monoquant writes (``metadata.monoquant``:
  ``schemes`` by name, ``quantized`` base name -> scheme name), or, without it (another writer,
  a single file), is inferred from the shapes and dtypes of its parts;
* a tensor is read with :class:`monoquant.reader.RowReader` and decoded with the kernel of its
  scheme.

Example:
    >>> import torch, monoquant
    >>> from tempfile import mkdtemp
    >>> from safetensors.torch import save_file
    >>> d = mkdtemp()
    >>> save_file({"l.weight": torch.randn(16, 64), "n.weight": torch.ones(16)}, d + "/m.safetensors")
    >>> out = mkdtemp() + "/out"; _ = monoquant.stream(d, out, "int4", group_size=32)
    >>> o = open_output(out)
    >>> o.dense_names(), o.entries()["l.weight"].scheme.name
    (['l.weight', 'n.weight'], 'int4-g32')
    >>> o.dense("l.weight").shape, o.stored("l.weight_packed").dtype
    (torch.Size([16, 64]), torch.int32)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .kernels import as_rows
from .layout import Group, dense_shape, dequantize_group, find_groups, infer_scheme
from .outnames import INDEX_NAME
from .reader import Checkpoint, RowReader, TensorRef, open_checkpoint
from .schemes import Scheme


@dataclass
class QuantizedEntry:
    """A quantized tensor found in a checkpoint: its base name, parts and scheme."""

    base: str
    parts: dict[str, TensorRef]
    scheme: Scheme
    shape: tuple[int, ...]


def known_schemes(metadata: Any) -> dict[str, Scheme]:
    """Base name -> scheme, as an index's ``metadata.monoquant`` records them (empty without)."""
    mq = metadata.get("monoquant") if isinstance(metadata, dict) else None
    if not isinstance(mq, dict):
        return {}
    defs = {n: Scheme.from_dict(d) for n, d in (mq.get("schemes") or {}).items()}
    return {b: defs[s] for b, s in (mq.get("quantized") or {}).items() if s in defs}


def quantized_entries(ckpt: Checkpoint, reader: RowReader) -> dict[str, QuantizedEntry]:
    """Find the quantized tensors of an opened checkpoint and their schemes (reads only the tiny
    ``weight_shape`` tensors; schemes come from the index metadata when monoquant wrote it)."""
    refs = {r.name: r for r in ckpt.tensors}
    known = known_schemes(ckpt.index_metadata)
    out: dict[str, QuantizedEntry] = {}
    for base, g in find_groups(refs).items():
        parts = {s: refs[n] for s, n in g.names.items()}
        if "_shape" in parts:
            shape_t = reader.rows(parts["_shape"], 0, 1).reshape(-1)
            shape = tuple(int(v) for v in shape_t.tolist())
        else:
            shape = dense_shape(parts)
        scheme = known.get(base)
        if scheme is None:
            scheme = infer_scheme(_meta_parts(parts, shape))
        out[base] = QuantizedEntry(base, parts, scheme, shape)
    return out


def _meta_parts(parts: dict[str, TensorRef], shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins for :func:`infer_scheme` (meta tensors; ``_shape`` as values)."""
    out = {s: torch.empty(r.shape, dtype=r.dtype, device="meta") for s, r in parts.items() if s != "_shape"}
    if "_shape" in parts:
        out["_shape"] = torch.tensor(shape)
    return out


class OutputCheckpoint:
    """An output directory (or one safetensors file) opened for reading, headers only.

    Attributes:
        ckpt: the opened checkpoint (tensor locations, index metadata).
        refs: stored name -> :class:`~monoquant.reader.TensorRef`.
        groups: base name -> the stored names of each quantized tensor.
    """

    def __init__(self, ckpt: Checkpoint, indexed: bool):
        self.ckpt = ckpt
        self.refs: dict[str, TensorRef] = {r.name: r for r in ckpt.tensors}
        # the order of the index (monoquant writes it sorted), or file by file
        key = (lambda n: n) if indexed else (lambda n: (self.refs[n].file.name, n))
        self.names: list[str] = sorted(self.refs, key=key)
        self.groups: dict[str, Group] = find_groups(self.refs)
        self._base_of = {n: b for b, g in self.groups.items() for n in g.names.values()}
        self._known = known_schemes(ckpt.index_metadata)

    @property
    def metadata(self) -> dict[str, Any]:
        """The index ``metadata`` (empty without an index)."""
        return self.ckpt.index_metadata

    def entries(self, reader: RowReader | None = None) -> dict[str, QuantizedEntry]:
        """Every quantized tensor: its parts, scheme and dense shape."""
        if reader is not None:
            return quantized_entries(self.ckpt, reader)
        with RowReader("pread") as rd:
            return quantized_entries(self.ckpt, rd)

    def plain(self) -> dict[str, TensorRef]:
        """The stored tensors that are no part of a quantized tensor (copied or cast)."""
        return {n: r for n, r in self.refs.items() if n not in self._base_of}

    def stored(self, name: str) -> torch.Tensor:
        """One stored tensor, by its on-disk name (a new tensor, nothing stays open)."""
        ref = self.refs[name]
        if ref.nbytes == 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        with RowReader("pread") as rd:
            rows, _ = as_rows(ref.shape)
            return rd.rows(ref, 0, rows).reshape(ref.shape).clone()

    def dense_names(self) -> list[str]:
        """Names of the dense state dict (quantized groups collapsed to their base name)."""
        out = []
        seen = set()
        for n in self.names:
            base = self._base_of.get(n)
            if base is not None:
                if base not in seen:
                    seen.add(base)
                    out.append(base)
            else:
                out.append(n)
        return out

    def dense(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor of the dense state dict (decoded when it is stored quantized)."""
        g = self.groups.get(name)
        if g is None:
            return self.stored(name)
        parts = {s: self.stored(n) for s, n in g.names.items()}
        return dequantize_group(parts, self._known.get(name), dtype)


def open_output(path: str | os.PathLike[str]) -> OutputCheckpoint:
    """Open an output directory (with or without its index) or one safetensors file.

    Raises:
        CheckpointError: nothing readable there, corrupt headers, an index that does not match
            its shards, or weights that are not safetensors.
    """
    p = Path(path)
    ckpt = open_checkpoint(p)
    if not all(r.is_safetensors for r in ckpt.tensors):
        raise CheckpointError(f"{p}: no safetensors files and no index")
    return OutputCheckpoint(ckpt, indexed=p.is_dir() and (p / INDEX_NAME).exists())
