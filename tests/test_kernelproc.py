"""The kernel helper process (:mod:`monoquant.kernelproc`): the same bytes and figures as the
helper thread, every unusual case computed in this process, and no child left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import monoquant
from monoquant import jobs
from monoquant.errors import MonoquantError
from monoquant.kernelproc import ENV, BlockJob, ProcessHelper, process_helper_allowed
from monoquant.schemes import get_scheme
from tests.helpers import command_stream, read_dir_bytes, tiny_llama_sd, write_sharded

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the process helper is Linux-only"
)

#: small blocks: every projection is several blocks, shared by both kernel workers
OPTS = {"block_bytes": 1 << 15, "overlap": True, "threads": 1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("kproc")
    return write_sharded(d / "in", tiny_llama_sd(layers=2, hidden=128, inter=256, vocab=300), shards=2)


@pytest.fixture
def helpers(monkeypatch: pytest.MonkeyPatch) -> list[jobs.KernelHelper]:
    """The kernel helpers the runs of a test made."""
    made: list[jobs.KernelHelper] = []
    real = jobs._kernel_helper

    def record(*args, **kwargs):
        h = real(*args, **kwargs)
        made.append(h)
        return h

    monkeypatch.setattr(jobs, "_kernel_helper", record)
    return made


def _run(src: Path, out: Path, scheme: str, monkeypatch: pytest.MonkeyPatch, process: bool, **kw):
    monkeypatch.setenv(ENV, "1" if process else "0")
    return monoquant.stream(src, out, scheme, **{**OPTS, **kw})


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4-asym", "w8a8", "int8-tensor", "fp8"])
def test_same_bytes_and_figures_as_the_thread(ckpt, tmp_path, monkeypatch, helpers, scheme) -> None:
    proc = _run(ckpt, tmp_path / "proc", scheme, monkeypatch, True)
    assert isinstance(helpers[-1], ProcessHelper)
    assert helpers[-1].blocks_done > 0  # the child computed blocks
    assert helpers[-1].pid is None  # and was collected
    thread = _run(ckpt, tmp_path / "thread", scheme, monkeypatch, False)
    assert not isinstance(helpers[-1], ProcessHelper)
    assert read_dir_bytes(tmp_path / "proc") == read_dir_bytes(tmp_path / "thread")
    figures = [{k: v.to_dict() for k, v in rep.stats.items()} for rep in (proc, thread)]
    assert figures[0] == figures[1]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_child_that_dies_or_hangs_leaves_the_run_to_the_threads(
    ckpt, tmp_path, monkeypatch, helpers, sig
) -> None:
    """SIGKILL of the child after a few blocks, or SIGSTOP (no answer: after BLOCK_SECONDS it is
    killed): the child is collected and the threads finish the run, with the same bytes."""
    from monoquant import kernelproc

    monkeypatch.setattr(kernelproc, "BLOCK_SECONDS", 0.5)
    real = ProcessHelper.compute
    calls = [0]

    def signal_on_third(self, task):
        calls[0] += 1
        if calls[0] == 3 and self.pid is not None:
            os.kill(self.pid, sig)
        return real(self, task)

    monkeypatch.setattr(ProcessHelper, "compute", signal_on_third)
    rep = _run(ckpt, tmp_path / "lost", "int8", monkeypatch, True)
    assert rep.complete
    h = helpers[-1]
    assert isinstance(h, ProcessHelper) and not h.alive and h.pid is None
    assert 0 < h.blocks_done < calls[0]
    monkeypatch.setattr(ProcessHelper, "compute", real)
    _run(ckpt, tmp_path / "ref", "int8", monkeypatch, False)
    assert read_dir_bytes(tmp_path / "lost") == read_dir_bytes(tmp_path / "ref")


def test_a_kernel_error_is_the_threads_error(tmp_path, monkeypatch, helpers) -> None:
    """A NaN in a shared block: the child answers 'compute it yourself', and the run fails with
    the error the thread helper gives."""
    w = torch.randn(256, 128).to(torch.bfloat16)
    w[200, 7] = float("nan")
    src = tmp_path / "nan"
    src.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(src / "model.safetensors"))
    errors = []
    for process in (True, False):
        with pytest.raises(MonoquantError) as e:
            _run(src, tmp_path / f"out{process}", "int8", monkeypatch, process)
        errors.append(str(e.value).replace(f"out{process}", "out"))
    assert isinstance(helpers[0], ProcessHelper) and helpers[0].pid is None
    assert errors[0] == errors[1] and "NaN" in errors[0]


def test_blocks_it_cannot_map_are_computed_here(tmp_path) -> None:
    """A job with no file identity, a wrong one, rows beyond the file, or one that does not
    pickle: computed in this process (the same thread), never by the child."""
    from monoquant.convert import TensorBlocks
    from monoquant.numerics import Workspace
    from monoquant.overlap import BlockTask

    f = tmp_path / "w.bin"
    f.write_bytes(bytes(4096))
    info = os.stat(f)
    h = ProcessHelper(slots=2, slot_bytes=1 << 16)
    try:
        mine, other = (info.st_dev, info.st_ino), (info.st_dev, info.st_ino + 1)
        cases = [(None, 4, None), (other, 4, None), (mine, 9999, None), (mine, 4, lambda: None)]
        for ident, rows, unpicklable in cases:
            job = BlockJob(get_scheme("int8"), None, False, 1, False, str(f), 0, 128, torch.float32, ident)
            if unpicklable is not None:
                job.tensor_scale = unpicklable  # type: ignore[assignment]

            def here(t, scratch):
                t.result = {"": torch.zeros(1)}
                t.done.set()

            t = BlockTask(0, rows, Workspace(), torch.zeros(rows, 128), here)
            t.ctx = TensorBlocks(lambda *a: None, None, job=job)
            h.share(t)
            assert t.done.wait(10) and t.result is not None and t.result[""].tolist() == [0.0]
        assert h.blocks_done == 0 and h.alive
    finally:
        h.shutdown()
    assert h.pid is None


def test_not_with_several_job_threads(ckpt, tmp_path, monkeypatch, helpers) -> None:
    """--jobs 2: the job threads would fork beside each other; each keeps a helper thread."""
    rep = _run(ckpt, tmp_path / "j2", "int8", monkeypatch, True, jobs=2, max_shard_size="100KB")
    assert rep.complete and len(helpers) == 2
    assert not any(isinstance(h, ProcessHelper) for h in helpers)


@pytest.mark.parametrize("case", ["torch pickles", "pread"])
def test_not_for_rows_it_cannot_map(tmp_path, monkeypatch, helpers, case) -> None:
    """Rows the child could not map itself (a .bin checkpoint, the pread reader): no process."""
    sd = tiny_llama_sd(layers=1, hidden=128, inter=256, vocab=300)
    if case == "torch pickles":
        src, kw = write_sharded(tmp_path / "in", sd, shards=1, fmt="bin"), {}
    else:
        src, kw = write_sharded(tmp_path / "in", sd, shards=1), {"backend": "pread"}
    assert _run(src, tmp_path / "out", "int8", monkeypatch, True, **kw).complete
    assert helpers and not any(isinstance(h, ProcessHelper) for h in helpers)


def test_used_only_where_allowed(monkeypatch) -> None:
    """The Python API forks only when asked to (the caller's process is not ours); the command
    asks unless told not to."""
    monkeypatch.delenv(ENV, raising=False)
    assert not process_helper_allowed("mmap", 1)
    monkeypatch.setenv(ENV, "1")
    assert process_helper_allowed("mmap", 1) == sys.platform.startswith("linux")
    assert not process_helper_allowed("pread", 1)
    assert not process_helper_allowed("mmap", 2)
    assert not process_helper_allowed("mmap", None)
    monkeypatch.setenv(ENV, "0")
    assert not process_helper_allowed("mmap", 1)


@pytest.mark.parametrize("setting", [None, "0"])
def test_the_command_forks_unless_told_not_to(tmp_path, setting) -> None:
    """The command's own entry point (``monoquant``, ``python -m monoquant``) makes a kernel
    process by default, and none with MONOQUANT_KERNEL_PROCESS=0."""
    src = write_sharded(tmp_path / "in", tiny_llama_sd(layers=1, hidden=128, inter=256, vocab=300), shards=1)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if setting is not None:
        env[ENV] = setting
    setup = (
        "import sys, monoquant.kernelproc as kp\n"
        "real = kp.ProcessHelper.__init__\n"
        "def spy(self, *a, **k):\n"
        "    sys.stderr.write('FORKED\\n')\n"
        "    real(self, *a, **k)\n"
        "kp.ProcessHelper.__init__ = spy\n"
    )
    err = command_stream(src, tmp_path / "out", setup, "--overlap", "on", env=env)
    assert ("FORKED" in err) == (setting is None)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"  # a zombie waiting for init: it is dead


@pytest.mark.slow
def test_the_child_dies_with_a_killed_run(tmp_path) -> None:
    """SIGKILL of the CLI in the middle of a run: its kernel process ends too (it holds nothing
    of the job: a rerun finds no lock held)."""
    sd = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(4096, 2048).bfloat16() for i in range(12)}
    src = tmp_path / "in"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"))
    env = {**os.environ, ENV: "1"}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monoquant",
            "stream",
            str(src),
            str(tmp_path / "out"),
            "--int8",
            "-q",
            "--overlap",
            "on",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        kids: list[int] = []
        while time.monotonic() < deadline and p.poll() is None:
            kids = _children(p.pid)
            if kids:
                break
            time.sleep(0.01)
        if not kids:
            pytest.skip("the run ended before its kernel process could be seen")
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(_gone(k) for k in kids):
            time.sleep(0.05)
        assert all(_gone(k) for k in kids)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    rep = monoquant.stream(src, tmp_path / "out", "int8")  # resumes: no lock is left held
    assert rep.complete and rep.shards_busy == 0


def test_a_helpers_own_pages_count_in_peak_anon(monkeypatch) -> None:
    """memwatch adds a registered helper's private pages (not the ones it shares with the run)."""
    from monoquant import memwatch

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; b = bytearray(64 << 20); sys.stdout.write('x\\n'); "
            "sys.stdout.flush(); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"x\n"  # allocated
        before = memwatch._helpers_kb()
        monkeypatch.setattr(memwatch, "HELPERS", {child.pid})
        added = memwatch._helpers_kb() - before
        assert 64 << 10 <= added < 200 << 10  # KiB: its 64 MiB buffer, and not much more
        memwatch.forget_helper(child.pid)
        assert memwatch._helpers_kb() == 0
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
