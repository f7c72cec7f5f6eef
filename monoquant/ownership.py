"""The one output-ownership rule: monoquant touches only what it wrote, in a directory it owns.

* ``OUT/.monoquant`` (the job state) must be a real directory: a symlink, or a file, there is
  refused before anything is written or deleted, and never followed.
* A file in ``OUT`` is *ours* when monoquant's own records list it: the shard names (and
  ``.partial`` files) and side files of the plan being run, those recorded in the unfinished
  job's ``plan.json`` (and ``discard.json`` of an interrupted ``--restart``), or, in a finished
  output, the index, its shards, ``config.json`` and the side files its index lists under
  ``metadata.monoquant.files``. Anything else is *foreign*: a new job, or a ``--restart``, refuses
  to start while foreign files are present (a file named like a shard of another model included),
  so nothing stale can end up next to the new model and nothing monoquant did not write is ever
  deleted.
* ``--restart`` deletes exactly the files owned by the job it replaces (a relative path without
  ``..``, reached without passing through a symlink), then empty directories they leave.

Example:
    >>> from pathlib import Path
    >>> safe_relpath("tokenizer.json"), safe_relpath("../etc/passwd"), safe_relpath("/etc/passwd")
    (True, False, False)
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .errors import OutputError
from .outnames import CONFIG_NAME, INDEX_NAME, STATE_DIR, partial_name
from .plan import Plan


def check_state_dir(out_dir: Path) -> None:
    """Refuse an ``OUT/.monoquant`` that is a symlink or not a directory (never follow it)."""
    p = out_dir / STATE_DIR
    if p.is_symlink():
        raise OutputError(
            f"{p}: is a symlink; monoquant keeps its job state only in a real directory and never follows a "
            "link "
            "there: remove the link (not its target) or choose another output directory"
        )
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p}: exists and is not a directory; remove it or choose another output directory")
    if p.is_dir():  # nothing in it may lead outside either (a planted locks/ or journal link)
        for q in [*p.iterdir(), *((p / "locks").iterdir() if (p / "locks").is_dir() else [])]:
            if q.is_symlink():
                raise OutputError(
                    f"{q}: is a symlink; monoquant's job state holds only its own files: remove the link "
                    "(not its "
                    "target) or choose another output directory"
                )


def safe_relpath(rel: str) -> bool:
    """A relative POSIX path that stays inside the directory it is relative to."""
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def present_files(out_dir: Path) -> set[str]:
    """Every non-directory entry under ``out_dir`` (symlinks included, not followed), as relative
    POSIX paths, the state directory excluded."""
    found: set[str] = set()
    if not out_dir.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(out_dir, followlinks=False):
        rel_dir = Path(dirpath).relative_to(out_dir)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != STATE_DIR]
        for d in list(dirnames):
            if (Path(dirpath) / d).is_symlink():  # a link to a directory is an entry, not a tree
                dirnames.remove(d)
                found.add((rel_dir / d).as_posix())
        found.update((rel_dir / f).as_posix() for f in filenames)
    return found


def planned_files(plan: Plan, side: Iterable[str]) -> set[str]:
    """What the run of ``plan`` writes: shards (and their ``.partial``), side files, config, index."""
    out = {INDEX_NAME, CONFIG_NAME, *side}
    for s in plan.shards:
        out.update((s.filename, partial_name(s.filename)))
    return out


def finished_files(out_dir: Path) -> set[str]:
    """The files a finished monoquant output owns, from its index (empty if it has none)."""
    try:
        index = json.loads((out_dir / INDEX_NAME).read_text())
        meta = index["metadata"]["monoquant"]
        wmap = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    files = {INDEX_NAME, CONFIG_NAME}
    if isinstance(wmap, dict):
        files.update(v for v in wmap.values() if isinstance(v, str))
    listed = meta.get("files") if isinstance(meta, dict) else None
    if isinstance(listed, list):
        files.update(f for f in listed if isinstance(f, str))
    return {f for f in files if safe_relpath(f)}


def refuse_foreign(out_dir: Path, foreign: set[str], why: str) -> None:
    """Raise the one "not ours" error when ``foreign`` is not empty."""
    if not foreign:
        return
    shown = ", ".join(sorted(foreign)[:3]) + (" ..." if len(foreign) > 3 else "")
    raise OutputError(
        f"{out_dir} {why} ({shown}) that monoquant did not write for this job; move them away or choose an "
        "empty "
        "or new output directory"
    )


def remove_owned(out_dir: Path, files: Iterable[str]) -> None:
    """Delete the listed files of ``out_dir`` (never through a symlinked directory, never outside),
    then the directories they leave empty."""
    root = out_dir.resolve()
    dirs: set[Path] = set()
    for rel in sorted(set(files)):
        if not safe_relpath(rel) or rel.split("/")[0] == STATE_DIR:
            continue
        p = out_dir / rel
        parent = p.parent
        if any(q.is_symlink() for q in [parent, *parent.parents] if q != out_dir and out_dir in q.parents):
            continue
        if p.parent.resolve() != root and root not in p.parent.resolve().parents:
            continue
        if p.is_symlink() or p.is_file():
            with contextlib.suppress(OSError):
                p.unlink()
            if parent != out_dir:
                dirs.add(parent)
    for d in sorted(dirs, key=lambda q: len(q.parts), reverse=True):
        while d != out_dir and out_dir in d.parents:
            try:
                d.rmdir()
            except OSError:
                break
            d = d.parent
