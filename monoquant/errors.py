"""The one exception hierarchy of monoquant.

Every error the library raises on purpose derives from :class:`MonoquantError`, so a caller (and the
CLI) can catch one type. Messages say what went wrong, where (file, tensor) and what to do.
"""

from __future__ import annotations


class MonoquantError(Exception):
    """Base class of every error monoquant raises on purpose."""


class SchemeError(MonoquantError, ValueError):
    """An unknown scheme name or an impossible combination of scheme options."""


class OptionError(MonoquantError, ValueError):
    """An option value out of range (``jobs=0``, ``max_shard_size=0``, a size of ``1e400``, ...)."""


class CheckpointError(MonoquantError):
    """The input checkpoint is missing, unreadable, malformed or inconsistent."""


class TensorValueError(MonoquantError, ValueError):
    """A tensor's values cannot be converted as asked (NaN/Inf, fp16 overflow)."""


class OutputError(MonoquantError):
    """The output directory cannot be used (inside the input, not writable, disk full, ...)."""


class PlanMismatchError(OutputError):
    """The output directory holds state of a different job (other input or options)."""


class VerifyError(MonoquantError):
    """An output directory is inconsistent (index, headers, sizes or config disagree)."""
