"""A fork server for CLI tests: imports torch and monoquant once, then runs each requested
``monoquant ...`` command in a freshly forked child process (``monoquant.cli.main(argv)``, stdout and
stderr redirected to files, the real exit status reported back). A run costs milliseconds instead
of an interpreter start plus ``import torch``, so tests can afford dozens of kills and runs.

A child is a real process: its own pid, file descriptors, locks, exit code; SIGKILL kills it like
any other. Optional hooks (see :func:`install_hooks`) SIGKILL the child at a named point of the
pipeline or act on progress events; without hooks the child runs the unmodified CLI.

Protocol (JSON lines): request ``{"id", "argv", "hooks", "stdout", "stderr"}`` on stdin; replies
``{"id", "pid"}`` when forked and ``{"id", "status"}`` when the child ended (exit code, or
``-signal``). Run as a script: ``python tests/cli_zygote.py``.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import signal
import sys
import time
import traceback
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_file(path: str, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            sys.stderr.write(f"hooks: timed out waiting for {path}\n")
            sys.stderr.flush()
            os._exit(99)
        time.sleep(0.005)


def install_hooks(hooks: dict[str, Any]) -> None:
    """Patch the library in this (child) process.

    ``kill`` (with ``shard``): SIGKILL at ``after-prepare`` (state written), ``mid-shard`` (after
    the 2nd block written to shard N, or before finishing it), ``after-rename`` (shard N in place,
    not journaled), ``after-record`` (journaled), ``torn-record`` (half a journal line written),
    ``before-replace``/``after-replace`` (``shard`` is a file name: around the rename onto it),
    ``after-discard`` (``--restart`` removed the old state and shards).

    ``pause_before_prepare``: ``{"signal", "wait"}``: after the "already complete?" check, touch
    ``signal`` and wait for the file ``wait`` before creating the job state.

    ``events``: ``[{"kind", "name", "signal", "fill", "wait"}]``: on the first progress event of
    that kind (and name, when given) touch ``signal``, fill the disk with a file at ``fill``
    (until ENOSPC), then wait for the file ``wait`` (60 s at most, then exit 99).
    """
    import monoquant.journal as jn
    import monoquant.pipeline as pl
    import monoquant.writer as wr

    kill, shard = hooks.get("kill"), hooks.get("shard")
    if kill == "after-prepare":
        real_prepare = jn.JobState.prepare

        def prepare(self: Any, *a: Any, **k: Any) -> Any:
            real_prepare(self, *a, **k)
            _die()

        jn.JobState.prepare = prepare  # type: ignore[method-assign]
    elif kill == "mid-shard":
        real_write, real_finish = wr.ShardWriter.write, wr.ShardWriter.finish

        def write(self: Any, *a: Any, **k: Any) -> Any:
            real_write(self, *a, **k)
            if self.shard.index == shard:
                self._hook_n = getattr(self, "_hook_n", 0) + 1
                if self._hook_n >= 2:
                    _die()

        def finish(self: Any, *a: Any, **k: Any) -> Any:
            if self.shard.index == shard:
                _die()
            return real_finish(self, *a, **k)

        wr.ShardWriter.write, wr.ShardWriter.finish = write, finish  # type: ignore[method-assign]
    elif kill == "after-rename":
        real_finish2 = wr.ShardWriter.finish

        def finish2(self: Any, *a: Any, **k: Any) -> Any:
            r = real_finish2(self, *a, **k)
            if self.shard.index == shard:
                _die()
            return r

        wr.ShardWriter.finish = finish2  # type: ignore[method-assign]
    elif kill in ("after-record", "torn-record"):
        real_record = jn.JobState.record

        def record(self: Any, name: str, nbytes: int, digest: str) -> None:
            idx = next(s.index for s in self.plan.shards if s.filename == name)
            if kill == "torn-record" and idx == shard:
                line = json.dumps({"shard": name, "bytes": nbytes, "sha256": digest}) + "\n"
                with open(self.journal, "a") as f:
                    f.write(line[: len(line) // 2])
                _die()
            real_record(self, name, nbytes, digest)
            if idx == shard:
                _die()

        jn.JobState.record = record  # type: ignore[method-assign]
    elif kill in ("before-replace", "after-replace"):
        real_replace = os.replace

        def replace(a: Any, b: Any, *x: Any, **k: Any) -> None:
            hit = os.path.basename(b) == shard
            if hit and kill == "before-replace":
                _die()
            real_replace(a, b, *x, **k)
            if hit:
                _die()

        os.replace = replace  # type: ignore[assignment]
    elif kill == "after-discard":  # --restart removed the old state and shards, nothing else yet
        real_discard = jn.JobState.discard

        def discard(self: Any, *a: Any, **k: Any) -> None:
            real_discard(self, *a, **k)
            _die()

        jn.JobState.discard = discard  # type: ignore[method-assign]
    elif kill is not None:
        raise SystemExit(f"hooks: unknown kill point {kill!r}")

    pause = hooks.get("pause_before_prepare")
    if pause:  # after the "already complete?" check, before the job state is created
        real_prepare2 = jn.JobState.prepare

        def prepare2(self: Any, *a: Any, **k: Any) -> Any:
            pathlib.Path(pause["signal"]).touch()
            _wait_file(pause["wait"])
            return real_prepare2(self, *a, **k)

        jn.JobState.prepare = prepare2  # type: ignore[method-assign]

    rules = [dict(r) for r in hooks.get("events", [])]
    if not rules:
        return

    def fill(path: str) -> None:
        with open(path, "wb", buffering=0) as f:
            for block in (1 << 16, 4096, 1):
                try:
                    while True:
                        f.write(b"\0" * block)
                except OSError:
                    pass

    def on_event(ev: Any) -> None:
        for r in rules:
            if r.get("_done") or r["kind"] != ev.kind or r.get("name") not in (None, ev.name):
                continue
            r["_done"] = True
            if r.get("signal"):
                pathlib.Path(r["signal"]).touch()
            if r.get("fill"):
                fill(r["fill"])
            if r.get("wait"):
                _wait_file(r["wait"])

    real_stream = pl.stream

    def stream(*a: Any, on_progress: Any = None, **k: Any) -> Any:
        def cb(ev: Any) -> None:
            on_event(ev)
            if on_progress is not None:
                on_progress(ev)

        return real_stream(*a, on_progress=cb, **k)

    pl.stream = stream  # type: ignore[assignment]


def run_child(req: dict[str, Any]) -> None:
    """In the forked child: redirect stdio, install hooks, run the CLI, exit with its status."""
    code: int = 1
    try:
        for fd, key in ((1, "stdout"), (2, "stderr")):
            f = os.open(req[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler)
        install_hooks(req.get("hooks") or {})
        import monoquant.cli

        try:
            monoquant.cli.main(req["argv"], prog_name="monoquant")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                sys.stderr.write(f"{e.code}\n")
                code = 1
    except BaseException:
        traceback.print_exc()  # what an uncaught exception prints in a normal process
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _send(obj: dict[str, Any]) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def main() -> None:
    import torch

    import monoquant.cli
    import monoquant.pipeline

    torch.set_num_threads(1)
    del monoquant
    running: dict[int, int] = {}
    buf = b""
    eof = False
    while not (eof and not running):
        ready, _, _ = select.select([] if eof else [0], [], [], 0.002 if running else 0.5)
        if ready:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                eof = True
                for pid in running:
                    os.kill(pid, signal.SIGKILL)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    run_child(req)
                running[pid] = req["id"]
                _send({"id": req["id"], "pid": pid})
        while running:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            rid = running.pop(pid)
            status = os.WEXITSTATUS(st) if os.WIFEXITED(st) else -os.WTERMSIG(st)
            _send({"id": rid, "status": status})


if __name__ == "__main__":
    main()
