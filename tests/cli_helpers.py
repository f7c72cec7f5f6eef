"""Helpers for tests that run the real ``monoquant`` CLI in subprocesses (crash, workers, bad input).

* :func:`run_cli` / :func:`popen_cli` run ``monoquant ...`` (the installed console script, or
  ``python -m monoquant``).
* :class:`Zygote` runs the same CLI (``monoquant.cli.main``) in children forked from a process
  that has imported torch once (``tests/cli_zygote.py``), optionally with hooks that SIGKILL the
  child at a named point of the pipeline or act on progress events (touch a file, wait for a
  file, fill the disk). Exit codes and messages are the real ones.
* :func:`tmpfs` mounts a small tmpfs (root only) for disk-full and read-only tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monoquant.plan import INDEX_NAME
from tests.helpers import read_dir_bytes

STATE = ".monoquant"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
ENV.pop("PYTHONWARNINGS", None)


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("monoquant")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "monoquant"]


def run_cli(*args: object, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        stdin=subprocess.DEVNULL,
    )


def popen_cli(*args: object, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload]
        [*cli(), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        stdin=subprocess.DEVNULL,
        **kw,
    )


class Run:
    """One CLI run in a child of the :class:`Zygote` (``returncode``/``stdout``/``stderr`` like a
    ``CompletedProcess`` once it ended)."""

    def __init__(self, zyg: Zygote, rid: int, out: Path, err: Path):
        self.zyg, self.id, self.out, self.err = zyg, rid, out, err
        self.pid = -1
        self.returncode: int | None = None
        self.stdout = self.stderr = ""

    def poll(self) -> int | None:
        return self.zyg._status(self)

    def wait(self, timeout: float | None = 120) -> int:
        t0 = time.monotonic()
        while self.poll() is None:
            if timeout is not None and time.monotonic() - t0 > timeout:
                raise subprocess.TimeoutExpired(f"monoquant run {self.id}", timeout)
            time.sleep(0.002)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> int:
        """SIGKILL the run (if it is still running) and wait for it."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        return self.wait()


class Zygote:
    """Client of ``tests/cli_zygote.py``: runs ``monoquant`` commands in forked children."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("cli_zygote.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=ENV,
        )
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.pids: dict[int, int] = {}
        self.statuses: dict[int, int] = {}
        self.next_id = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.cond:
                if "pid" in msg:
                    self.pids[msg["id"]] = msg["pid"]
                else:
                    self.statuses[msg["id"]] = msg["status"]
                self.cond.notify_all()

    def start(self, *args: object, hooks: dict[str, object] | None = None) -> Run:
        with self.lock:
            rid = self.next_id
            self.next_id += 1
        run = Run(self, rid, self.dir / f"{rid}.out", self.dir / f"{rid}.err")
        run.out.write_bytes(b"")
        run.err.write_bytes(b"")  # there even if the child is killed before it opens them
        req = {
            "id": rid,
            "argv": [str(a) for a in args],
            "hooks": hooks or {},
            "stdout": str(run.out),
            "stderr": str(run.err),
        }
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        with self.cond:
            if not self.cond.wait_for(lambda: rid in self.pids, timeout=60):
                raise RuntimeError("the CLI fork server does not answer")
            run.pid = self.pids[rid]
        return run

    def _status(self, run: Run) -> int | None:
        with self.lock:
            st = self.statuses.get(run.id)
        if st is not None and run.returncode is None:
            run.stdout = run.out.read_text(errors="replace")
            run.stderr = run.err.read_text(errors="replace")
            run.returncode = st
        return run.returncode

    def run(self, *args: object, hooks: dict[str, object] | None = None, timeout: float = 120) -> Run:
        r = self.start(*args, hooks=hooks)
        try:
            r.wait(timeout)
        except subprocess.TimeoutExpired:
            r.kill()
            raise
        return r

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@contextlib.contextmanager
def zygote_for(tmp: Path) -> Iterator[Zygote]:
    z = Zygote(tmp)
    try:
        yield z
    finally:
        z.close()


def wait_for(path: Path, run: Run | None = None, timeout: float = 60) -> None:
    """Wait until ``path`` exists (fail early if ``run`` ends first)."""
    t0 = time.monotonic()
    while not path.exists():
        if run is not None and run.poll() is not None:
            raise AssertionError(f"run exited ({run.returncode}) before {path} appeared:\n{run.stderr}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.005)


PROGRESS = re.compile(r"^monoquant: +\d+\.\d%")


def assert_one_error_line(proc: Any, *names: str, allow_progress: bool = False) -> str:
    """Exit 1, exactly one stderr line ``monoquant: error: ...`` naming every one of ``names``, no
    traceback. With ``allow_progress``, progress lines may come before it. Returns the message."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in lines if ln.startswith("monoquant: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"want one error line, got:\n{proc.stderr}"
    others = lines[:-1]
    if allow_progress:
        assert all(PROGRESS.match(ln) for ln in others), f"unexpected stderr lines:\n{proc.stderr}"
    else:
        assert not others, f"want exactly one stderr line, got:\n{proc.stderr}"
    msg = errors[0]
    assert not re.search(r"[\x00-\x1f\x7f]", msg), f"control characters (ANSI codes?) in the message: {msg!r}"
    assert "[Errno" not in msg, f"a raw OS error, not a monoquant message (what, where, what to do): {msg}"
    for n in names:
        assert n in msg, f"the message does not name {n!r}: {msg}"
    return msg


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, ro: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` at ``path`` (needs root / CAP_SYS_ADMIN); skip with the reason
    when mounting is impossible here."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
        )
    except FileNotFoundError:
        pytest.skip("no mount(8) here: cannot create a small or read-only filesystem for this test")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---- comparing output directories -------------------------------------------------------------
def shard_names(files: dict[str, bytes]) -> list[str]:
    return sorted(n for n in files if n.startswith("model-") and n.endswith(".safetensors"))


def check_after_kill(out: Path, ref: dict[str, bytes], where: str) -> None:
    """What a killed run may leave: finished shards are final (byte-identical to the reference),
    and a directory with an index is a complete model."""
    if not out.exists():
        return
    for p in out.glob("model-*-of-*.safetensors"):
        assert p.name in ref, f"{where}: a shard {p.name} that the uninterrupted run does not have"
        assert p.read_bytes() == ref[p.name], (
            f"{where}: finished shard {p.name} differs from an uninterrupted run"
        )
    if (out / INDEX_NAME).exists():
        for n in [*shard_names(ref), "config.json", "tokenizer.json", INDEX_NAME]:
            assert (out / n).exists(), f"{where}: an index is there but {n} is missing"
            assert (out / n).read_bytes() == ref[n], f"{where}: an index is there but {n} differs"


def assert_complete(out: Path, ref: dict[str, bytes], where: str) -> None:
    if (out / STATE).exists():
        raise AssertionError(
            f"{where}: the finished job left {STATE}/ behind: {sorted(read_dir_bytes(out / STATE))}"
        )
    got = read_dir_bytes(out)
    extra, missing = sorted(set(got) - set(ref)), sorted(set(ref) - set(got))
    assert not extra and not missing, f"{where}: extra files {extra}, missing files {missing}"
    differ = [n for n in ref if got[n] != ref[n]]
    assert not differ, f"{where}: files differ from the uninterrupted run: {differ}"
