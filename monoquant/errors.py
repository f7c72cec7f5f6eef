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


# The one message per kind of bad tensor value, shared by the in-memory and streaming paths.


def nonfinite_error(name: str, count: int, where: str = "") -> TensorValueError:
    """The one message for NaN/Inf in a weight."""
    return TensorValueError(
        f"{where}tensor {name!r} holds {count} NaN/Inf value(s); fix the checkpoint or "
        f"--exclude {name!r} to copy it unchanged"
    )


def fp16_overflow_error(name: str, detail: str, where: str = "") -> TensorValueError:
    """The one message for an fp16 cast out of range."""
    return TensorValueError(
        f"{where}tensor {name!r} does not fit float16 ({detail}); use bf16, "
        f"--exclude {name!r}, or --clamp-fp16 to saturate at ±65504"
    )


def decode_overflow_error(name: str, detail: str, where: str = "") -> TensorValueError:
    """The one message for a tensor whose output would decode to ``inf`` (or not fit its dtype)."""
    return TensorValueError(
        f"{where}tensor {name!r} cannot be stored safely: {detail}; --exclude {name!r} to copy it unchanged"
    )
