"""Which files of an input directory (without an index) hold the model's weights.

Rules, in order:

1. ``*.safetensors`` files if there are any, else torch zip checkpoints (``.bin``, ``.pt``,
   ``.pth``).
2. Files a Hugging Face Trainer (or accelerate) saves next to the model and that hold no model
   weights — ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``,
   ``training_args.bin``, ``optimizer.bin``, ``random_states_*.pkl`` — are ignored, with a note.
3. The remaining files must form one series: their names equal once digits are ignored
   (``model-00001-of-00002.safetensors`` + ``model-00002-of-00002.safetensors``, or
   ``consolidated.00.pth`` + ``consolidated.01.pth``). Two layouts side by side (``pytorch_model.bin``
   and ``consolidated.00.pth``: the same model saved twice, in different tensor names) are refused:
   merging them would write both copies into one output.

Example:
    >>> from pathlib import Path
    >>> found = [Path("ckpt/pytorch_model.bin"), Path("ckpt/optimizer.pt")]
    >>> files, notes = select_weight_files(Path("ckpt"), found)
    >>> [f.name for f in files], notes
    (['pytorch_model.bin'], ['ignored optimizer.pt (training state, not model weights)'])
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .containment import check_inside
from .errors import CheckpointError

TRAINING_STATE = re.compile(
    r"(optimizer|scheduler|scaler)\.(pt|bin|pth)|rng_state(_\d+)?\.pth|training_args\.bin|random_states_\d+\.pkl"
)


def series_key(name: str) -> str:
    """A file name with its digit runs blanked (shards of one series share it)."""
    return re.sub(r"\d+", "#", name)


def select_weight_files(root: Path, files: list[Path]) -> tuple[list[Path], list[str]]:
    """Filter candidate weight files of ``root`` (see the module rules); returns the files and
    notes about what was ignored."""
    notes = [
        f"ignored {p.name} (training state, not model weights)"
        for p in files
        if TRAINING_STATE.fullmatch(p.name)
    ]
    keep = [p for p in files if not TRAINING_STATE.fullmatch(p.name)]
    families: dict[str, list[str]] = {}
    for p in keep:
        families.setdefault(series_key(p.name), []).append(p.name)
    if len(families) > 1:
        shown = ", ".join(names[0] for names in families.values())
        raise CheckpointError(
            f"{root}: holds weight files of {len(families)} different layouts ({shown}), probably the same "
            "model "
            "saved twice; point monoquant at one file, or move the other files away"
        )
    return keep, notes


def find_index(root: Any) -> Any | None:
    """The index a checkpoint directory is read through: its first ``*.safetensors.index.json``,
    else its first ``*.bin.index.json``; ``None`` without one (``root``: a ``Path`` or a remote
    path)."""
    found = sorted(root.glob("*.safetensors.index.json")) or sorted(root.glob("*.bin.index.json"))
    return found[0] if found else None


def read_index(root: Any, index_path: Any) -> dict[str, Any]:
    """The index ``index_path`` of ``root`` as a JSON object whose ``weight_map`` maps tensor
    names to shard entries (strings both).

    Raises:
        CheckpointError: the index resolves outside ``root``, is not JSON, or has no such
            ``weight_map``.
    """
    check_inside(index_path, root, "index")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise CheckpointError(f"{index_path}: not valid JSON ({e}); re-download the index") from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()
    ):
        raise CheckpointError(f"{index_path}: no valid 'weight_map' object; the index is corrupt")
    return index


def listed_weight_files(root: Any) -> list[Any]:
    """The weight files of a directory without an index, before :func:`select_weight_files`:
    its ``*.safetensors`` files, else its torch zip checkpoints, sorted by name."""
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if not files:
        files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".bin", ".pt", ".pth"))
    return files
