"""The head start (monoquant.headstart): the input files in reading order, nothing outside the
input, a budget that holds, really reading ahead, started by the CLI before torch is imported, and
invisible in the output bytes."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from monoquant import headstart
from monoquant.headstart import HeadStart, begin, budget, input_files
from tests.cli_helpers import ENV, run_cli
from tests.helpers import read_dir_bytes, tiny_llama_sd, write_sharded

MiB = 1 << 20


def _file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def _st(path: Path, header: int, data: int) -> Path:
    """A file laid out like a safetensors file: 8-byte length, ``header`` bytes, ``data`` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header.to_bytes(8, "little") + b"{}" + b" " * (header - 2) + os.urandom(data))
    return path


def _recorder() -> tuple[list[tuple[str, int, int]], object]:
    calls: list[tuple[str, int, int]] = []

    def advise(fd: int, off: int, n: int) -> None:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), off, n))

    return calls, advise


# ---- which files, in which order ----------------------------------------------------------------
def test_files_follow_the_index_sorted_as_the_reader_sorts_them(tmp_path: Path) -> None:
    for name in ("b.safetensors", "a.safetensors", "stray.safetensors"):
        _file(tmp_path / name, 1024)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}})
    )
    assert [p.name for p in input_files(tmp_path)] == ["a.safetensors", "b.safetensors"]


def test_files_without_an_index_single_files_and_what_gets_none(tmp_path: Path) -> None:
    d = tmp_path / "d"
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"):
        _file(d / name, 1024)
    _file(d / "config.json", 10)
    assert [p.name for p in input_files(d)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    one = d / "model-00001-of-00002.safetensors"
    assert input_files(one) == [one]
    bins = tmp_path / "bins"
    _file(bins / "pytorch_model.bin", 1024)
    assert input_files(bins) == []  # torch pickles: no head start
    assert input_files("s3://bucket/model/") == []
    assert input_files(tmp_path / "missing") == []


def test_nothing_outside_the_input_is_asked_for(tmp_path: Path) -> None:
    outside = _file(tmp_path / "secret" / "s.safetensors", 4 * MiB)
    d = tmp_path / "ckpt"
    _file(d / "a.safetensors", MiB)
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "../secret/s.safetensors"}}))
    assert input_files(d) == []  # an index naming a file outside: no head start at all
    index.unlink()
    (d / "link.safetensors").symlink_to(outside)
    assert [p.name for p in input_files(d)] == ["a.safetensors"]  # the symlink out is left alone
    (d / "link.safetensors").unlink()
    # an index that is itself a symlink out is not read, whatever it names (here: a shard inside)
    (tmp_path / "secret" / "index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors"}}))
    index.symlink_to(tmp_path / "secret" / "index.json")
    assert input_files(d) == []
    index.unlink()
    os.mkfifo(tmp_path / "secret" / "fifo.json")  # reading it would block forever
    index.symlink_to(tmp_path / "secret" / "fifo.json")
    assert input_files(d) == []


@pytest.mark.parametrize(
    "index",
    [
        {"weight_map": {"x": ["a.safetensors"]}},  # unhashable values
        {"weight_map": {"x": "a.safetensors", "y": 7}},  # values of mixed types
        {"weight_map": None},
        ["a.safetensors"],  # not an object
        "[" * 100000 + "]" * 100000,  # nested too deep for the JSON parser
    ],
)
def test_an_unusable_index_gives_none_and_the_cli_its_one_line_error(tmp_path: Path, index: object) -> None:
    d = write_sharded(tmp_path / "ckpt", tiny_llama_sd(), shards=2)
    text = index if isinstance(index, str) else json.dumps(index)
    (d / "model.safetensors.index.json").write_text(text)
    assert input_files(d) == []
    p = run_cli("stream", d, tmp_path / "out", "--int8", "-q")
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("monoquant: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert ("not valid JSON" if isinstance(index, str) else "weight_map") in p.stderr


def test_a_bin_index_means_torch_pickles_whatever_else_lies_there(tmp_path: Path) -> None:
    _file(tmp_path / "stray.safetensors", 1024)
    _file(tmp_path / "pytorch_model.bin", 1024)
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"x": "pytorch_model.bin"}})
    )
    assert input_files(tmp_path) == []  # the reader follows the .bin index


# ---- the budget --------------------------------------------------------------------------------
def test_headers_first_then_the_data_in_order_until_the_budget(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", 1000, 5 * MiB)
    b = _st(tmp_path / "b.safetensors", 2000, 5 * MiB)
    calls, advise = _recorder()
    hs = HeadStart([a, b], budget=7 * MiB, step=2 * MiB, advise=advise)  # type: ignore[arg-type]
    hs.start().join(10)
    left = 7 * MiB - 1008 - 2008
    assert [(Path(p).name, off, n) for p, off, n in calls] == [
        ("a.safetensors", 0, 1008),  # every header first: the run reads them all before any data
        ("b.safetensors", 0, 2008),
        ("a.safetensors", 1008, 2 * MiB),
        ("a.safetensors", 1008 + 2 * MiB, 2 * MiB),
        ("a.safetensors", 1008 + 4 * MiB, MiB),
        ("b.safetensors", 2008, left - 5 * MiB),
    ]
    assert hs.requested == 7 * MiB


def test_a_header_length_beyond_the_file_asks_for_the_file_only(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((1 << 62).to_bytes(8, "little") + b"x" * 100)
    calls, advise = _recorder()
    HeadStart([bad], budget=MiB, advise=advise).start().join(10)  # type: ignore[arg-type]
    assert [(off, n) for _, off, n in calls] == [(0, 108)]


def test_only_regular_files_are_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "f.safetensors"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    calls, advise = _recorder()
    hs = HeadStart([fifo], budget=MiB, advise=advise).start()  # type: ignore[arg-type]
    hs.join(5)
    assert hs._thread is not None and not hs._thread.is_alive()
    assert calls == []


def test_stop_ends_the_requests(tmp_path: Path) -> None:
    a = _st(tmp_path / "a.safetensors", 100, 8 * MiB)
    gate, calls = threading.Event(), []

    def slow(fd: int, off: int, n: int) -> None:
        calls.append(off)
        gate.wait(5)

    hs = HeadStart([a], budget=8 * MiB, step=MiB, advise=slow).start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    hs.stop(timeout=0)  # while a request is in flight
    gate.set()
    hs.join(5)
    assert calls == [0]  # the request in flight finished; none followed
    assert hs.requested == 108  # the header (8 + 100 bytes), and no data


def test_budget_is_the_least_of_the_limit_memory_and_cgroup_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headstart, "_mem_available", lambda: 16 << 30)
    monkeypatch.setattr(headstart, "_cgroup_headroom", lambda: None)
    assert budget() == headstart.LIMIT  # 1 GiB
    monkeypatch.setattr(headstart, "_mem_available", lambda: 2 << 30)
    assert budget() == 256 * MiB  # an eighth of MemAvailable
    monkeypatch.setattr(headstart, "_cgroup_headroom", lambda: 400 * MiB)
    assert budget() == 100 * MiB  # a quarter of the room under a memory cap
    monkeypatch.setattr(headstart, "_cgroup_headroom", lambda: 0)
    assert budget() == 0


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_room_reads_the_tightest_limit_up_the_tree(tmp_path: Path, version: str) -> None:
    root = tmp_path / "cg"
    if version == "v1":
        table = "4:memory:/outer/job\n0::/\n"
        base, lim, use = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        base.mkdir(parents=True)
        (base / lim).write_text(str(1 << 62))  # v1's "no limit"
        (base / use).write_text("5")
    else:
        table = "0::/outer/job\n"
        base, lim, use = root, "memory.max", "memory.current"
        base.mkdir(parents=True)
        (base / "cgroup.controllers").write_text("memory\n")
    (base / "outer" / "job").mkdir(parents=True)
    (base / "outer" / lim).write_text(str(300 * MiB))
    (base / "outer" / use).write_text(str(100 * MiB))
    (base / "outer" / "job" / lim).write_text("max" if version == "v2" else str(1 << 62))
    (base / "outer" / "job" / use).write_text(str(50 * MiB))
    (tmp_path / "table").write_text(table)
    got = headstart._cgroup_headroom(str(root), str(tmp_path / "table"))
    assert got == 200 * MiB  # the outer cgroup's limit binds
    (base / "outer" / "job" / lim).write_text(str(80 * MiB))
    assert headstart._cgroup_headroom(str(root), str(tmp_path / "table")) == 30 * MiB
    # inactive page cache is room: the kernel reclaims it before failing an allocation
    stat_name, stat_key = ("memory.stat", "total_inactive_file" if version == "v1" else "inactive_file")
    (base / "outer" / "job" / stat_name).write_text(f"active_file 1\n{stat_key} {20 * MiB}\nfile 9\n")
    assert headstart._cgroup_headroom(str(root), str(tmp_path / "table")) == 50 * MiB
    (tmp_path / "table").write_text("0::/\n" if version == "v1" else "4:memory:/\n")
    assert headstart._cgroup_headroom(str(root), str(tmp_path / "table")) is None  # no hierarchy
    (tmp_path / "table").write_text(table)
    for d in (base / "outer", base / "outer" / "job"):
        (d / lim).write_text("max" if version == "v2" else str(1 << 62))
    assert headstart._cgroup_headroom(str(root), str(tmp_path / "table")) is None  # no limit anywhere


def test_cgroup_room_on_hybrid_hosts_comma_lists_and_bad_tables(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    (root / "unified" / "job").mkdir(parents=True)  # v2 mounted beside v1, no cgroup.controllers at the top
    (root / "unified" / "job" / "memory.max").write_text(str(100 * MiB))
    (root / "unified" / "job" / "memory.current").write_text(str(40 * MiB))
    (root / "memory" / "job").mkdir(parents=True)
    (root / "memory" / "job" / "memory.limit_in_bytes").write_text(str(64 * MiB))
    (root / "memory" / "job" / "memory.usage_in_bytes").write_text(str(60 * MiB))
    table = tmp_path / "table"
    table.write_text("0::/job\n")
    assert headstart._cgroup_headroom(str(root), str(table)) == 60 * MiB
    table.write_text("0::/job\n5:cpuacct,memory:/job\n")  # v1 memory in a comma list: the least room
    assert headstart._cgroup_headroom(str(root), str(table)) == 4 * MiB
    table.write_bytes(b"0::/caf\xe9\n")  # not UTF-8
    assert headstart._cgroup_headroom(str(root), str(table)) is None


# ---- when there is none ---------------------------------------------------------------------------
def test_begin_skips_workers_resumed_jobs_remote_inputs_and_the_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "ckpt"
    _file(src / "a.safetensors", MiB)
    out = tmp_path / "out"
    monkeypatch.setattr(headstart, "budget", lambda: 4 * MiB)
    hs = begin(str(src), str(out))
    assert hs is not None
    hs.join(10)
    assert hs.requested == MiB
    assert begin(str(src), str(out), worker="0/2") is None
    assert begin("s3://bucket/ckpt/", str(out)) is None
    (out / ".monoquant").mkdir(parents=True)
    assert begin(str(src), str(out)) is None  # a job to resume: its first shards may be done
    assert begin(str(src), str(out), restart=True) is not None
    for value in ("0", "off", "False", "no "):
        monkeypatch.setenv(headstart.ENV, value)
        assert begin(str(src), str(tmp_path / "fresh")) is None, value
    monkeypatch.setenv(headstart.ENV, "1")
    assert begin(str(src), str(tmp_path / "fresh")) is not None


def test_begin_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "ckpt"
    _file(src / "a.safetensors", MiB)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert begin(str(src), str(tmp_path / "out")) is None


# ---- it really reads ahead ---------------------------------------------------------------------
def _resident(path: Path) -> list[bool]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    size = path.stat().st_size
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            buf = ctypes.c_char.from_buffer(mm)
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
            del buf
            assert rc == 0, os.strerror(ctypes.get_errno())
            return [bool(v & 1) for v in vec]
        finally:
            mm.close()


def test_the_first_bytes_reach_the_page_cache(tmp_path: Path) -> None:
    f = _file(tmp_path / "a.safetensors", 32 * MiB)
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if any(_resident(f)):
        pytest.skip("this filesystem keeps the file in memory (tmpfs?): nothing to read ahead")
    hs = HeadStart([f], budget=8 * MiB, step=2 * MiB).start()
    hs.join(10)
    per_mib = MiB // mmap.PAGESIZE
    deadline = time.monotonic() + 10
    while True:  # WILLNEED starts the reads and returns: wait for them
        pages = _resident(f)
        if all(pages[: 8 * per_mib]) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not any(pages):
        pytest.skip("this filesystem ignores WILLNEED (nothing was read): nothing to measure")
    assert all(pages[: 8 * per_mib]), f"{sum(pages[: 8 * per_mib])} of {8 * per_mib} pages read"
    assert not any(pages[24 * per_mib :]), "read far beyond the budget"


# ---- the CLI starts it before torch, and the bytes do not depend on it ---------------------------
def _spied_stream(
    *args: object, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``monoquant stream ARGS`` in a fresh interpreter with ``headstart.begin`` spied on;
    returns the process and one line per call: whether torch was loaded then, and whether a head
    start began."""
    code = (
        "import sys, monoquant.headstart as h\n"
        "real = h.begin\n"
        "def spy(*a, **k):\n"
        "    hs = real(*a, **k)\n"
        "    t = 'torch' in sys.modules\n"
        "    print('HEADSTART torch loaded:', t, 'started:', hs is not None, file=sys.stderr)\n"
        "    return hs\n"
        "h.begin = spy\n"
        "from monoquant.cli import main\n"
        f"main(['stream', *{[str(a) for a in args]!r}])\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env or ENV, timeout=300
    )
    return p, [ln for ln in p.stderr.splitlines() if ln.startswith("HEADSTART")]


def test_the_cli_starts_it_before_importing_torch(tmp_path: Path) -> None:
    src = write_sharded(tmp_path / "ckpt", tiny_llama_sd(), shards=2)
    p, calls = _spied_stream(src, tmp_path / "out", "--int8", "-q")
    assert p.returncode == 0, p.stderr
    assert calls == ["HEADSTART torch loaded: False started: True"]


@pytest.mark.parametrize("extra", [["--dry-run"], ["--target-bpw", "6"], ["--worker", "0/2"]])
def test_the_cli_starts_none_for_plans_mixed_precision_and_workers(tmp_path: Path, extra: list[str]) -> None:
    src = write_sharded(tmp_path / "ckpt", tiny_llama_sd(), shards=2)
    p, calls = _spied_stream(src, tmp_path / "out", "--int8", "-q", *extra)
    assert p.returncode == 0, p.stderr
    assert calls in ([], ["HEADSTART torch loaded: False started: False"])


def test_output_bytes_are_the_same_without_it(tmp_path: Path) -> None:
    src = write_sharded(tmp_path / "ckpt", tiny_llama_sd(), shards=2)
    a, b = tmp_path / "a", tmp_path / "b"
    p, calls = _spied_stream(src, a, "--int4", "-q")
    assert p.returncode == 0 and calls == ["HEADSTART torch loaded: False started: True"], p.stderr
    off, calls = _spied_stream(src, b, "--int4", "-q", env={**ENV, headstart.ENV: "0"})
    assert off.returncode == 0 and calls == ["HEADSTART torch loaded: False started: False"], off.stderr
    assert read_dir_bytes(a) == read_dir_bytes(b)
