"""Job state under ``out_dir/.monoquant/``: the plan's fingerprint, a journal of finished shards,
and per-shard OS file locks.

* ``plan.json`` — fingerprint, format version, scheme, shard list. A rerun with another
  fingerprint is refused (:class:`PlanMismatchError`) unless ``restart`` discards the state.
* ``journal.jsonl`` — one line per finished shard: ``{"shard", "bytes", "sum64"}``, appended
  after the shard was fsynced and renamed, then fsynced itself. ``sum64`` is the shard digest of
  :func:`monoquant.writer.shard_digest` (a sha256 over the header and each tensor's
  :class:`~monoquant.sum64.Sum64` checksum). A rerun trusts a journaled shard only if its size
  and digest still check out (:func:`entry_matches`). Lines written by earlier versions carry
  ``crc32`` (the same digest over each tensor's CRC-32) or ``sha256`` (a sha256 of every byte)
  instead; they are still read and checked their own way, so an unfinished job of an earlier
  version resumes. A line with none of these (a later format) is not trusted: that shard is
  redone.
* ``locks/<shard>.lock`` — ``flock`` locks: two processes never write one shard, and a lock
  vanishes with the process that held it (SIGKILL included).

A finished job removes the state directory; the index is the completion marker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomicfile import atomic_write as atomic_write  # re-exported: callers import it from here
from .errors import OutputError, PlanMismatchError
from .outnames import STATE_DIR as STATE_DIR  # re-exported: callers import it from here
from .outnames import partial_name
from .plan import Plan, PlannedOutput, ShardPlan
from .schemes import FORMAT_VERSION

#: the journal field holding a shard's digest (:func:`monoquant.writer.shard_digest`)
DIGEST_FIELD = "sum64"
#: the fields journals of earlier versions hold instead (still checked): the digest over CRC-32s
#: (:func:`monoquant.writer.crc_shard_digest`), and before it a sha256 of every byte
CRC_DIGEST_FIELD = "crc32"
LEGACY_DIGEST_FIELD = "sha256"


class JobState:
    """The resumable state of one job in ``out_dir``."""

    def __init__(self, out_dir: Path, plan: Plan, files: list[str] | None = None):
        self.out_dir = out_dir
        self.plan = plan
        self.files = list(files or [])  # side files (relative paths) this job writes at the end
        self.dir = out_dir / STATE_DIR
        self.journal = self.dir / "journal.jsonl"
        self.locks = self.dir / "locks"

    def prepare(self, restart: bool = False) -> bool:
        """Create or check the state. Returns True when earlier state of this job was found."""
        from .ownership import check_state_dir

        check_state_dir(self.out_dir)
        plan_file = self.dir / "plan.json"
        if restart:
            self.discard()  # whatever is there, even without a plan.json (a kill during a restart)
        elif plan_file.exists():
            self.check_ours()
            self.locks.mkdir(parents=True, exist_ok=True)
            return True
        self.locks.mkdir(parents=True, exist_ok=True)
        desc: dict[str, Any] = {
            "fingerprint": self.plan.fingerprint,
            "format_version": FORMAT_VERSION,
            "source": self.plan.source,
            "scheme": self.plan.scheme.to_dict(),
            "shards": [s.filename for s in self.plan.shards],
            "files": self.files,
        }
        # create plan.json only if absent (a hard link cannot replace a file): of two runs started
        # at once into one new directory, exactly one writes its plan; the other compares with it
        tmp = self.dir / f".plan.json.{os.getpid()}.{threading.get_ident()}.tmp"
        atomic_write(tmp, json.dumps(desc, indent=1).encode())
        try:
            os.link(tmp, plan_file)
        except FileExistsError:
            self.check_ours()
            return True
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return False

    def recorded(self) -> dict[str, Any] | None:
        """``plan.json`` of the job in this directory, or ``None``."""
        try:
            old = json.loads((self.dir / "plan.json").read_text())
        except (OSError, ValueError):
            return None
        return old if isinstance(old, dict) else None

    def check_ours(self) -> None:
        """Raise :class:`PlanMismatchError` unless the state belongs to this plan (checked at the
        start and again under each shard's lock: another run may have replaced it)."""
        old = self.recorded()
        if old is not None and old.get("fingerprint") == self.plan.fingerprint:
            return
        raise PlanMismatchError(
            f"{self.out_dir} holds an unfinished job with other input or options; rerun the original "
            "command to finish it, or add --restart to discard it"
        )

    def owned(self) -> set[str]:
        """Files of ``out_dir`` recorded by the unfinished job here (its plan.json, and the list of
        an interrupted ``--restart``)."""
        out: set[str] = set()
        old = self.recorded() or {}
        for key in ("shards", "files"):
            vals = old.get(key)
            if isinstance(vals, list):
                out.update(v for v in vals if isinstance(v, str))
        out.update(partial_name(v) for v in list(out) if v.endswith(".safetensors"))
        try:
            extra = json.loads((self.dir / "discard.json").read_text())
            if isinstance(extra, list):
                out.update(v for v in extra if isinstance(v, str))
        except (OSError, ValueError):
            pass
        return out

    def note_discard(self, files: set[str]) -> None:
        """Record files to delete before deleting the record that lists them (a finished output's
        index), so that a kill in between leaves them listed."""
        atomic_write(self.dir / "discard.json", json.dumps(sorted(files)).encode())

    def discard(self) -> None:
        """Remove every shard of this output directory and the state's contents (``--restart``).

        Shards go first and the state directory itself stays, so that a kill in the middle leaves a
        directory that a rerun still recognises as a job in progress (not a foreign directory)."""
        from .ownership import check_state_dir, remove_owned

        check_state_dir(self.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        mine = {n for s in self.plan.shards for n in (s.filename, partial_name(s.filename))}
        remove_owned(self.out_dir, self.owned() | mine)
        for p in sorted(self.dir.iterdir(), key=lambda q: q.name in ("plan.json", "discard.json")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()

    def finished(self) -> dict[str, dict[str, Any]]:
        """Journal entries by shard file name (the last entry wins)."""
        out: dict[str, dict[str, Any]] = {}
        try:
            text = self.journal.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            try:
                e = json.loads(line)
            except ValueError:  # a torn last line after a crash: ignore it
                continue
            if isinstance(e, dict) and isinstance(e.get("shard"), str):
                out[e["shard"]] = e
        return out

    def record(self, shard: str, nbytes: int, digest: str) -> None:
        """Append one finished shard (its size and :func:`~monoquant.writer.shard_digest`) to the
        journal, durably."""
        line = json.dumps({"shard": shard, "bytes": nbytes, DIGEST_FIELD: digest}) + "\n"
        fd = os.open(self.journal, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line  # a torn last line from a crash: do not glue this entry to it
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[bool]:
        """Try to take the lock ``name`` without waiting; yields whether it was taken."""
        try:
            fd = os.open(self.locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except FileNotFoundError:  # the job was finished and its state removed meanwhile
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Remove the state directory (the job is complete)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def entry_matches(path: Path, shard: ShardPlan, outputs: list[PlannedOutput], entry: dict[str, Any]) -> bool:
    """Whether the file at ``path`` is still the shard a journal ``entry`` recorded: the planned
    size and the recorded size, then the digest recomputed from the file (a read of the shard).

    Entries of earlier versions (``crc32``, ``sha256``) are checked with their own digest; an
    entry with no digest this version knows is never trusted.

    Example:
        >>> entry = state.finished()[shard.filename]                    # doctest: +SKIP
        >>> entry_matches(out / shard.filename, shard, outputs, entry)   # doctest: +SKIP
        True
    """
    from .writer import crc_shard_digest, legacy_shard_digest, shard_digest

    try:
        if entry.get("bytes") != shard.file_size or path.stat().st_size != shard.file_size:
            return False
    except OSError:
        return False
    want = entry.get(DIGEST_FIELD)
    if isinstance(want, str):
        return shard_digest(path, shard, outputs) == want
    want = entry.get(CRC_DIGEST_FIELD)
    if isinstance(want, str):
        return crc_shard_digest(path, shard, outputs) == want
    want = entry.get(LEGACY_DIGEST_FIELD)
    if isinstance(want, str):
        return legacy_shard_digest(path, shard, outputs) == want
    return False


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` if needed and check that it is writable, with a clear error."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # O_TMPFILE: no name, so a kill leaves nothing
            pass
    except OSError as e:
        raise OutputError(
            f"{out_dir}: output directory is not writable ({e.strerror or e}); fix permissions or "
            "choose another"
        ) from None
