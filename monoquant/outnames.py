"""The file names of an output directory, defined once.

* ``model-00001-of-00003.safetensors``: a shard (:func:`shard_name`);
* ``model-00001-of-00003.safetensors.partial``: a shard being written (:func:`partial_name`);
* ``model.safetensors.index.json``: the index, written last (:data:`INDEX_NAME`);
* ``config.json``: the input's config with its ``quantization_config``;
* ``.monoquant/``: the job state while a job is unfinished (:data:`STATE_DIR`).

Example:
    >>> shard_name(0, 3), partial_name(shard_name(2, 3))
    ('model-00001-of-00003.safetensors', 'model-00003-of-00003.safetensors.partial')
"""

from __future__ import annotations

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
STATE_DIR = ".monoquant"
PARTIAL_SUFFIX = ".partial"
_SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"


def shard_name(index: int, count: int) -> str:
    """The file name of shard ``index`` (from 0) of ``count``."""
    return _SHARD_NAME.format(index + 1, count)


def partial_name(filename: str) -> str:
    """The name a shard is written under until it is complete."""
    return filename + PARTIAL_SUFFIX
