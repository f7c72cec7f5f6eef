"""Crash safety and resume (DESIGN §6): SIGKILL the CLI anywhere, rerun the same command, and the
output is byte-for-byte the output of an uninterrupted run; a finished job leaves no state.

* Random moments: ``monoquant stream`` is SIGKILLed at >= 24 seeded-random moments across a
  multi-shard run (children of the CLI fork server, ``tests/cli_zygote.py``, plus a few runs of
  the installed console script), rerun after each kill; after every kill the files already in
  place are checked (a finished shard is final; an index means a complete model).
* Named moments: the same, killed at each step of the commit protocol (state written, mid-shard,
  renamed but not journaled, journaled, torn journal line, writability probe, around the renames
  of ``config.json`` and the index) so every window is hit every time.
* Options: a rerun with other options is refused with one line and exit 1; ``--restart`` works.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from monoquant.plan import INDEX_NAME
from tests.cli_helpers import (
    STATE,
    Zygote,
    assert_complete,
    assert_one_error_line,
    check_after_kill,
    popen_cli,
    shard_names,
    wait_for,
    zygote_for,
)
from tests.helpers import read_dir_bytes, tiny_llama_sd, write_sharded

SEED = 20240611


@pytest.fixture(scope="module")
def zyg(tmp_path_factory: pytest.TempPathFactory):
    with zygote_for(tmp_path_factory.mktemp("zygote")) as z:
        yield z


# ---- small checkpoint: named kill points, options --------------------------------------------------
SMALL_ARGS = ("--int8", "--max-shard-size", "300KB")


@pytest.fixture(scope="module")
def small(zyg: Zygote, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("small")
    src = write_sharded(d / "in", tiny_llama_sd(layers=2, hidden=256, inter=512, vocab=1000), shards=2)
    r = zyg.run("stream", src, d / "ref", *SMALL_ARGS, "-q")
    assert r.returncode == 0, r.stderr
    ref = read_dir_bytes(d / "ref")
    assert len(shard_names(ref)) >= 4
    return src, ref


POINTS = [
    ("after-prepare", None),
    ("mid-shard", 0),
    ("mid-shard", 2),
    ("after-rename", 1),
    ("after-record", 1),
    ("torn-record", 2),
    ("before-replace", "config.json"),
    ("before-replace", INDEX_NAME),
    ("after-replace", INDEX_NAME),
]


@pytest.mark.parametrize(
    ("point", "arg"), POINTS, ids=[f"{p}-{a}" if a is not None else p for p, a in POINTS]
)
def test_kill_at_each_commit_step_then_one_rerun_completes(
    zyg: Zygote, small, tmp_path: Path, point: str, arg
) -> None:
    src, ref = small
    before = read_dir_bytes(src)
    out = tmp_path / "out"
    r = zyg.run("stream", src, out, *SMALL_ARGS, "-q", hooks={"kill": point, "shard": arg})
    assert r.returncode == -9, f"the kill point {point} was not reached (exit {r.returncode}): {r.stderr}"
    check_after_kill(out, ref, point)
    if point == "mid-shard":
        assert list(out.glob("*.partial")), "expected a stale .partial from the killed run"
    r = zyg.run("stream", src, out, *SMALL_ARGS, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["complete"], f"after a kill at {point}, one rerun did not complete the job"
    assert not list(out.glob("*.partial")), "stale .partial left after the rerun"
    assert_complete(out, ref, f"killed at {point}, rerun once")
    # and a further rerun changes nothing
    r = zyg.run("stream", src, out, *SMALL_ARGS, "-q")
    assert r.returncode == 0, r.stderr
    assert_complete(out, ref, "second rerun")
    assert read_dir_bytes(src) == before


@pytest.mark.parametrize("state", ["unfinished", "finished"])
def test_rerun_with_other_options_is_refused_then_restart_works(
    zyg: Zygote, small, tmp_path: Path, state: str
) -> None:
    src, ref = small
    out = tmp_path / "out"
    hooks = {"kill": "mid-shard", "shard": 2} if state == "unfinished" else None
    r = zyg.run("stream", src, out, *SMALL_ARGS, "-q", hooks=hooks)
    assert r.returncode == (-9 if state == "unfinished" else 0), r.stderr
    before = read_dir_bytes(out)
    other = ("--int4", "--max-shard-size", "300KB")
    r = zyg.run("stream", src, out, *other)
    assert_one_error_line(r, str(out), "--restart")
    assert read_dir_bytes(out) == before, "the refused run changed the output directory"
    # the original command still finishes / is still complete
    r = zyg.run("stream", src, out, *other, "--restart", "-q")
    assert r.returncode == 0, r.stderr
    ref4 = tmp_path / "ref4"
    r = zyg.run("stream", src, ref4, *other, "-q")
    assert r.returncode == 0, r.stderr
    assert_complete(out, read_dir_bytes(ref4), "--restart with other options")
    # and back: the int8 job is refused now, --restart gives the int8 bytes again
    assert_one_error_line(zyg.run("stream", src, out, *SMALL_ARGS), str(out), "--restart")
    r = zyg.run("stream", src, out, *SMALL_ARGS, "--restart", "-q")
    assert r.returncode == 0, r.stderr
    assert_complete(out, ref, "--restart back to int8")


def test_kill_during_restart_never_leaves_an_index_without_its_model(
    zyg: Zygote, small, tmp_path: Path
) -> None:
    """``--restart`` over a finished model, killed after the old shards are gone: the directory
    must not still look complete (an index means a complete model); rerunning finishes the new job."""
    src, ref = small
    out = tmp_path / "out"
    assert zyg.run("stream", src, out, *SMALL_ARGS, "-q").returncode == 0
    other = ("--int4", "--max-shard-size", "300KB")
    r = zyg.run("stream", src, out, *other, "--restart", "-q", hooks={"kill": "after-discard"})
    assert r.returncode == -9, r.stderr
    check_after_kill(out, ref, "killed during --restart")
    r = zyg.run("stream", src, out, *other, "--restart", "-q")
    assert r.returncode == 0, r.stderr
    ref4 = tmp_path / "ref4"
    assert zyg.run("stream", src, ref4, *other, "-q").returncode == 0
    assert_complete(out, read_dir_bytes(ref4), "--restart rerun after a kill")


def test_stale_partials_are_removed_and_a_finished_job_leaves_no_state(
    zyg: Zygote, small, tmp_path: Path
) -> None:
    """Kill mid-shard twice at different shards (two stale partials of two runs), then finish."""
    src, ref = small
    out = tmp_path / "out"
    for shard in (1, 3):
        r = zyg.run("stream", src, out, *SMALL_ARGS, "-q", hooks={"kill": "mid-shard", "shard": shard})
        assert r.returncode == -9
    partials = sorted(p.name for p in out.glob("*.partial"))
    assert partials, "expected stale partial files"
    # a partial of the shard that the second run reached is there; so is the state
    assert (out / STATE / "journal.jsonl").exists()
    r = zyg.run("stream", src, out, *SMALL_ARGS, "-q")
    assert r.returncode == 0, r.stderr
    assert_complete(out, ref, "after two mid-shard kills")


# ---- random moments, big multi-shard run -----------------------------------------------------------
BIG_ARGS = ("--int8", "--max-shard-size", "3MB", "-q")


@pytest.fixture(scope="module")
def big(zyg: Zygote, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes], float]:
    """~100 MB of bf16 weights in 4 input shards -> ~24 output shards; returns (src, reference
    bytes, seconds of an uninterrupted run)."""
    d = tmp_path_factory.mktemp("big")
    src = write_sharded(d / "in", tiny_llama_sd(layers=6, hidden=768, inter=2048, vocab=8000), shards=4)
    times = []
    for i in range(2):  # the second run is warm (page cache), like the reruns
        t0 = time.monotonic()
        r = zyg.run("stream", src, d / f"ref{i}", *BIG_ARGS)
        times.append(time.monotonic() - t0)
        assert r.returncode == 0, r.stderr
    ref = read_dir_bytes(d / "ref1")
    assert read_dir_bytes(d / "ref0") == ref
    assert len(shard_names(ref)) >= 16
    return src, ref, times[1]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_gives_identical_bytes(zyg: Zygote, big, tmp_path: Path) -> None:
    src, ref, t_run = big
    before = {n: hash(b) for n, b in read_dir_bytes(src).items()}
    rng = random.Random(SEED)
    kills, series, log = 0, 0, []
    while kills < 24:
        out = tmp_path / f"series{series}"
        in_series = 0
        while True:
            run = zyg.start("stream", src, out, *BIG_ARGS)
            # uniform over a whole run; late moments finish a partly done job, so the series ends
            delay = rng.uniform(0.0, 1.05 * t_run) if in_series < 12 else 600.0
            try:
                rc = run.wait(timeout=delay)
            except subprocess.TimeoutExpired:  # still running at the chosen moment: kill it
                rc = run.kill()
                if rc == -9:
                    kills += 1
                    in_series += 1
                    done = len(list(out.glob("model-*-of-*.safetensors"))) if out.exists() else 0
                    log.append(f"series {series}: kill at {delay:.3f} s, {done} shards in place")
                    check_after_kill(out, ref, log[-1])
                    continue
            assert rc == 0, f"rerun failed (exit {rc}): {run.stderr}\n" + "\n".join(log)
            break
        assert_complete(out, ref, f"series {series} after {in_series} kills\n" + "\n".join(log))
        series += 1
    # the installed console script (a fresh interpreter each time), killed while working
    out = tmp_path / "console"
    t0 = time.monotonic()
    p = popen_cli("stream", src, out, *BIG_ARGS)
    wait_for(out / STATE / "plan.json", timeout=120)
    t_start = time.monotonic() - t0  # interpreter start, imports, plan
    for k in range(3):
        if k:
            p = popen_cli("stream", src, out, *BIG_ARGS)
            time.sleep(t_start)
        time.sleep(rng.uniform(0.0, 0.6 * t_run))
        if p.poll() is None:
            p.kill()
            kills += 1
        p.communicate()
        check_after_kill(out, ref, f"console kill {k}")
    p = popen_cli("stream", src, out, *BIG_ARGS)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert_complete(out, ref, "console script after kills")
    assert {n: hash(b) for n, b in read_dir_bytes(src).items()} == before, "the input changed"
    assert kills >= 24
