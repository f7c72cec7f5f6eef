"""The one containment rule for input paths: nothing is read from outside the checkpoint.

Every file monoquant reads from an input directory (shards named by an index, weight files
found by listing, side files copied to the output) must resolve — after following symlinks —
inside that directory. The one exception is the Hugging Face hub cache, whose snapshot
directories (``models--org--name/snapshots/<revision>/``) hold symlinks into the same repository's
``blobs/`` directory: those targets are inside the checkpoint as downloaded.

Index entries are checked as written too: an absolute path or one with ``..`` is refused even
when it would land inside the directory. A violation is a :class:`CheckpointError` naming the
entry. A single file given as the input is read wherever it resolves (the user named it).

Example:
    >>> from pathlib import Path
    >>> index_entry(Path("/ckpt"), "model-00001-of-00002.safetensors", "model.safetensors.index.json")
    PosixPath('/ckpt/model-00001-of-00002.safetensors')
    >>> try:
    ...     index_entry(Path("/ckpt"), "../secret/model.safetensors", "model.safetensors.index.json")
    ... except CheckpointError as e:
    ...     print(str(e).replace("; ", ";\\n"))
    model.safetensors.index.json names shard '../secret/model.safetensors', which is outside /ckpt;
    an index may only name files inside its checkpoint directory
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from .errors import CheckpointError


def allowed_roots(root: Path) -> list[Path]:
    """Where files of the checkpoint directory ``root`` may resolve to."""
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # the HF hub cache: snapshots/<rev>/x -> ../../blobs/<sha>
        roots.append(real.parent.parent / "blobs")
    return roots


def is_inside(path: Path, root: Path) -> bool:
    """True when ``path`` resolves (symlinks followed) inside the checkpoint directory ``root``.
    Object storage has no symlinks: a remote key is inside when it lies under the root's prefix
    (index entries with ``..`` are refused before this, by :func:`index_entry`)."""
    if not isinstance(path, Path):  # a RemotePath (monoquant.remote)
        key, prefix = str(getattr(path, "path", "")), str(getattr(root, "path", ""))
        return getattr(path, "fs", None) is getattr(root, "fs", None) and (
            key == prefix or key.startswith(prefix.rstrip("/") + "/")
        )
    real = path.resolve()
    return any(real == r or r in real.parents for r in allowed_roots(root))


def check_inside(path: Path, root: Path, what: str) -> None:
    """Raise :class:`CheckpointError` when ``path`` resolves outside ``root``."""
    if not is_inside(path, root):
        where = path.resolve() if isinstance(path, Path) else path
        raise CheckpointError(
            f"{path}: {what} resolves to {where}, outside the checkpoint {root}; monoquant reads nothing "
            "from outside the input directory (replace the symlink with the file itself)"
        )


def index_entry(root: Path, entry: str, index_name: str) -> Path:
    """The path of a shard named by an index, refused when it is absolute, climbs out with
    ``..``, or resolves outside ``root``."""
    p = PurePosixPath(entry)
    if p.is_absolute() or ".." in p.parts or entry.strip() == "" or "\\" in entry:
        raise CheckpointError(
            f"{index_name} names shard {entry!r}, which is outside {root}; an index may only name files "
            "inside "
            "its checkpoint directory"
        )
    path = root / p.as_posix()  # str: a RemotePath root joins names, not PurePaths
    if path.exists() and not is_inside(path, root):
        raise CheckpointError(
            f"{index_name} names shard {entry!r}, which resolves to {path.resolve()}, outside {root}; an "
            "index "
            "may only name files inside its checkpoint directory"
        )
    return path
