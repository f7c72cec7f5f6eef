"""monoquant: quantize PyTorch checkpoints out of core, into compressed-tensors format.

Example:
    >>> import torch, monoquant
    >>> qsd = monoquant.quantize({"fc.weight": torch.randn(32, 128)}, "int4", group_size=32)
    >>> sorted(qsd)
    ['fc.weight_packed', 'fc.weight_scale', 'fc.weight_shape']
"""

from __future__ import annotations

import sys
import types
import warnings as _warnings
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError as CheckpointError
from .errors import MonoquantError as MonoquantError
from .errors import OptionError as OptionError
from .errors import OutputError as OutputError
from .errors import PlanMismatchError as PlanMismatchError
from .errors import SchemeError as SchemeError
from .errors import TensorValueError as TensorValueError
from .errors import VerifyError as VerifyError

# torch warns "Failed to initialize NumPy" when it is imported without numpy; monoquant never uses
# numpy (not a dependency), so a clean install must not print that. torch is imported lazily
# (below), so the filter is installed for the process, for exactly that message.
_warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

# The rest of the API imports torch (a second or two): loaded on first use, so that the CLI can
# answer --help fast and turn a Ctrl-C during that import into one line instead of a traceback.
_LAZY = {
    "QuantizedStateDict": "inmemory",
    "dequantize": "inmemory",
    "quantize": "inmemory",
    "load": "loader",
    "ProgressEvent": "pipeline",
    "Report": "pipeline",
    "iter_quantized": "pipeline",
    "stream": "pipeline",
    "Rules": "rules",
    "PRESETS": "schemes",
    "Scheme": "schemes",
    "get_scheme": "schemes",
}

if TYPE_CHECKING:  # pragma: no cover
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


class _Package(types.ModuleType):
    """``monoquant.plan`` is the function :func:`monoquant.pipeline.plan`, though a submodule
    ``monoquant.plan`` exists: importing that submodule must not rebind the package attribute."""

    @property
    def plan(self) -> Any:
        from .pipeline import plan

        return plan

    @plan.setter
    def plan(self, value: Any) -> None:  # the import system setting the submodule: keep the function
        pass


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name == "__version__":  # importlib.metadata costs ~30 ms at every start: only when asked
        globals()[name] = value = _package_version()
        return value
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'monoquant' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("monoquant")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0.0.0+unknown"
