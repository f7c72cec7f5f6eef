"""monoquant: quantize PyTorch checkpoints out of core, into compressed-tensors format.

Example:
    >>> import torch, monoquant
    >>> qsd = monoquant.quantize({"fc.weight": torch.randn(32, 128)}, "int4", group_size=32)
    >>> sorted(qsd)
    ['fc.weight_packed', 'fc.weight_scale', 'fc.weight_shape']
"""

from __future__ import annotations

import warnings as _warnings
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

with _warnings.catch_warnings():
    # torch warns "Failed to initialize NumPy" at import when numpy is not installed; monoquant
    # never uses numpy (it is not a dependency), so a clean install must not print that
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch as _torch  # noqa: F401

from .errors import CheckpointError as CheckpointError
from .errors import MonoquantError as MonoquantError
from .errors import OutputError as OutputError
from .errors import PlanMismatchError as PlanMismatchError
from .errors import SchemeError as SchemeError
from .errors import TensorValueError as TensorValueError
from .errors import VerifyError as VerifyError
from .inmemory import QuantizedStateDict as QuantizedStateDict
from .inmemory import dequantize as dequantize
from .inmemory import quantize as quantize
from .loader import load as load
from .pipeline import ProgressEvent as ProgressEvent
from .pipeline import Report as Report
from .pipeline import iter_quantized as iter_quantized
from .pipeline import plan as plan
from .pipeline import stream as stream
from .rules import Rules as Rules
from .schemes import PRESETS as PRESETS
from .schemes import Scheme as Scheme
from .schemes import get_scheme as get_scheme

try:
    __version__ = _version("monoquant")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"
