"""Read any monoquant output (or any compressed-tensors checkpoint) back, dense or as stored.

Example:
    >>> import monoquant
    >>> sd = monoquant.load("out/")                        # dense state dict       # doctest: +SKIP
    >>> lazy = monoquant.load("out/", lazy=True)           # one tensor per access  # doctest: +SKIP
    >>> raw = monoquant.load("out/", dequantize=False)     # on-disk tensors        # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

import torch

from .errors import CheckpointError
from .outreader import OutputCheckpoint, open_output


def _open_local(path: str | os.PathLike[str]) -> OutputCheckpoint:
    from .remote import is_remote, scrub

    if is_remote(path):
        raise CheckpointError(
            f"{scrub(str(path))}: load() reads a local output; download it first (monoquant.stream and "
            "iter_quantized read an input checkpoint straight from a URL)"
        )
    return open_output(path)


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only mapping that loads (and dequantizes) one tensor per access."""

    def __init__(self, out: OutputCheckpoint, dequantize: bool, dtype: torch.dtype | None):
        self._r = out
        self._deq = dequantize
        self._dtype = dtype
        self._keys = out.dense_names() if dequantize else list(out.names)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._r.dense(key, self._dtype) if self._deq else self._r.stored(key)

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
    lsd = LazyStateDict(_open_local(path), dequantize, dtype)
    return lsd if lazy else {k: lsd[k] for k in lsd}
