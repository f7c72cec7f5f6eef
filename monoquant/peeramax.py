"""The absmax of the other tensors sharing a per-tensor scale (NVFP4's global scale of a fused
layer, :mod:`monoquant.fusedscales`), read once per run for the streaming first pass."""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import nonfinite_error
from .numerics import NonFiniteError, absmax, as_rows
from .reader import RowReader

#: absmax of the other members of a shared-scale group, by the identity of their bytes (file, offset,
#: size, mtime): each member's first pass reads the others once per run, not once per member.
_PEER_AMAX: dict[tuple[Any, ...], float] = {}


def shared_absmax(members: tuple[Any, ...], own: Any, block_rows: int) -> float:
    """max |x| over the tensors of ``members`` other than ``own`` (TensorRefs), read through a
    separate ``pread`` reader: the run's mapping (and the pages it holds) is left alone.

    The values are cached by the identity of each tensor's bytes, so the members of one group
    read each other once.

    Raises:
        TensorValueError: a member holds NaN or Inf (the message names that member).
    """
    out = 0.0
    with RowReader("pread") as rd:
        for ref in members:
            if ref == own:
                continue
            try:
                if isinstance(ref.file, (str, os.PathLike)):
                    st = os.stat(ref.file)
                    version: tuple[Any, ...] = (st.st_size, st.st_mtime_ns)
                else:  # a RemotePath (s3://...): its size and version tag (ETag, generation)
                    version = (ref.file.size, ref.file.etag)
                key: tuple[Any, ...] = (str(ref.file), ref.name, ref.offset, ref.nbytes, *version)
            except (OSError, AttributeError):
                key = ()
            amax = _PEER_AMAX.get(key) if key else None
            if amax is None:
                amax = 0.0
                n = as_rows(ref.shape)[0]
                try:
                    for a in range(0, n, block_rows):
                        amax = max(amax, absmax(rd.rows(ref, a, min(a + block_rows, n))))
                except NonFiniteError:
                    bad = sum(
                        int((~torch.isfinite(rd.rows(ref, a, min(a + block_rows, n)))).sum())
                        for a in range(0, n, block_rows)
                    )
                    raise nonfinite_error(ref.name, bad, f"{ref.file.name}: ") from None
                if key:
                    if len(_PEER_AMAX) > 256:
                        _PEER_AMAX.clear()
                    _PEER_AMAX[key] = amax
            out = max(out, amax)
    return out
