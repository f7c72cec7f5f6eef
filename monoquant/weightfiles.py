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

import re
from pathlib import Path

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
