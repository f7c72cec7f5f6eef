"""Run a command under a hard memory cap in a fresh cgroup (v1 or v2) and report its peak.

Used by the memory-bound tests; they skip, with the reason, where no memory cgroup can be made
(not root, no cgroup filesystem, read-only cgroupfs in a container).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


@dataclass
class CappedRun:
    returncode: int
    peak: int
    oom_killed: bool
    stdout: str
    stderr: str


def why_unavailable() -> str | None:
    """None when a memory cgroup can be created here, else the reason."""
    if os.geteuid() != 0:
        return "memory cgroups need root"
    base = V1 if V1.is_dir() else (V2 if (V2 / "cgroup.controllers").exists() else None)
    if base is None:
        return "no cgroup memory controller mounted"
    probe = base / f"monoquant-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        return f"cannot create a cgroup under {base} ({e.strerror})"
    return None


def run_capped(cmd: list[str], limit: int, timeout: float = 600) -> CappedRun:
    """Run ``cmd`` in a new memory cgroup limited to ``limit`` bytes (swap included)."""
    v1 = V1.is_dir()
    cg = (V1 if v1 else V2) / f"monoquant-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        if v1:
            (cg / "memory.limit_in_bytes").write_text(str(limit))
            sw = cg / "memory.memsw.limit_in_bytes"
            if sw.exists():
                with contextlib.suppress(OSError):
                    sw.write_text(str(limit))
        else:
            (cg / "memory.max").write_text(str(limit))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
        procs = str(cg / "cgroup.procs")
        wrapped = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *cmd]
        out = subprocess.run(wrapped, capture_output=True, text=True, timeout=timeout)
        if v1:
            peak = int((cg / "memory.max_usage_in_bytes").read_text())
            oom = "oom_kill 1" in (cg / "memory.oom_control").read_text() or out.returncode == -9
        else:
            peak = int((cg / "memory.peak").read_text()) if (cg / "memory.peak").exists() else -1
            events = (cg / "memory.events").read_text()
            oom = any(ln.startswith("oom_kill ") and not ln.endswith(" 0") for ln in events.splitlines())
        return CappedRun(out.returncode, peak, oom, out.stdout, out.stderr)
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)
