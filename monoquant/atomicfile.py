"""Replace a file atomically: a reader sees the old bytes or the new ones, never a mix, and a
crash at any moment leaves no temporary file in the target directory when ``tmp_dir`` is given.

A leaf module (it imports nothing from monoquant), so the job state, the output directory and the
remote-input record can all use it without an import cycle.

Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write(d / "index.json", b"{}")
    >>> (d / "index.json").read_bytes(), sorted(p.name for p in d.iterdir())
    (b'{}', ['index.json'])
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def atomic_write(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync directory).

    The temp file goes to ``tmp_dir`` (same filesystem; default: ``path``'s directory); give the
    job state directory so that a kill cannot leave it in the output."""
    tmp = (tmp_dir or path.parent) / f".{path.name}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
