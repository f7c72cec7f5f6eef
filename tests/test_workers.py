"""Partitioned jobs (DESIGN §6): ``--worker K/N`` processes on one output directory, ``--jobs N``,
per-shard locks. Whatever the split or the interleaving, the output is byte-identical to a single
run, each shard is written once, and whichever worker sees every shard done writes the index.

The CLI runs in child processes forked from ``tests/cli_zygote.py`` (started at the same moment,
they really run concurrently); orchestrated tests use progress-event hooks (touch a file, wait
for a file) to force one interleaving deterministically.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import monoquant
from monoquant.plan import INDEX_NAME
from tests.cli_helpers import STATE, Run, Zygote, assert_complete, shard_names, wait_for, zygote_for
from tests.helpers import read_dir_bytes, tiny_llama_sd, write_sharded

ARGS = ("--int8", "--max-shard-size", "2MB")


@pytest.fixture(scope="module")
def zyg(tmp_path_factory: pytest.TempPathFactory):
    with zygote_for(tmp_path_factory.mktemp("zygote")) as z:
        yield z


@pytest.fixture(scope="module")
def medium(zyg: Zygote, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """~40 MB of bf16 weights -> ~12 output shards, and the bytes of a single uninterrupted run."""
    d = tmp_path_factory.mktemp("medium")
    src = write_sharded(d / "in", tiny_llama_sd(layers=4, hidden=512, inter=1536, vocab=8000), shards=3)
    r = zyg.run("stream", src, d / "ref", *ARGS, "-q")
    assert r.returncode == 0, r.stderr
    ref = read_dir_bytes(d / "ref")
    assert len(shard_names(ref)) >= 9
    return src, ref


def report(r: Run) -> dict:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_workers_equal_a_single_run(zyg: Zygote, medium, tmp_path: Path, n: int) -> None:
    src, ref = medium
    out = tmp_path / "out"
    runs = [zyg.start("stream", src, out, *ARGS, "--worker", f"{k}/{n}", "--json") for k in range(n)]
    for r in runs:
        r.wait(300)
    reps = [report(r) for r in runs]
    n_shards = len(shard_names(ref))
    assert sum(r["shards_written"] for r in reps) == n_shards, "a shard was written twice or not at all"
    for k, r in enumerate(reps):
        mine = [i for i in range(n_shards) if i % n == k]
        assert r["shards_written"] == len(mine), f"worker {k}/{n} wrote shards outside its slice"
    assert any(r["complete"] for r in reps), "no worker wrote the index"
    assert_complete(out, ref, f"{n} concurrent workers")


def test_jobs_2_equals_a_single_run(zyg: Zygote, medium, tmp_path: Path) -> None:
    src, ref = medium
    r = report(zyg.run("stream", src, tmp_path / "out", *ARGS, "--jobs", "2", "--json"))
    assert r["complete"] and r["shards_written"] == len(shard_names(ref))
    assert_complete(tmp_path / "out", ref, "--jobs 2")


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_the_worker_that_sees_every_shard_done_writes_the_index(
    zyg: Zygote, medium, tmp_path: Path, order
) -> None:
    src, ref = medium
    out = tmp_path / "out"
    first, second = order
    r = zyg.run("stream", src, out, *ARGS, "--worker", f"{first}/2")
    assert r.returncode == 0, r.stderr
    assert "index pending" in r.stdout, r.stdout
    assert not (out / INDEX_NAME).exists(), "a worker wrote the index while shards of the other were missing"
    assert (out / STATE).exists()
    n_shards = len(shard_names(ref))
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == [
        n for i, n in enumerate(shard_names(ref)) if i % 2 == first
    ]
    rep = report(zyg.run("stream", src, out, *ARGS, "--worker", f"{second}/2", "--json"))
    assert rep["complete"] and rep["shards_written"] == len([i for i in range(n_shards) if i % 2 == second])
    assert_complete(out, ref, f"workers one after the other, {order}")
    # the first worker, rerun, finds a complete model and writes nothing
    rep = report(zyg.run("stream", src, out, *ARGS, "--worker", f"{first}/2", "--json"))
    assert rep["complete"] and rep["shards_written"] == 0
    assert_complete(out, ref, "first worker rerun")


def test_same_command_twice_at_once_corrupts_nothing(zyg: Zygote, medium, tmp_path: Path) -> None:
    """Two processes with the same slice (a retried CI job while the first still runs): per-shard
    locks keep them off each other's shard; both succeed; each shard is written once."""
    src, ref = medium
    out = tmp_path / "out"
    runs = [zyg.start("stream", src, out, *ARGS, "--json") for _ in range(2)]
    for r in runs:
        r.wait(300)
    reps = [report(r) for r in runs]
    assert any(r["complete"] for r in reps)
    assert sum(r["shards_written"] for r in reps) == len(shard_names(ref)), "a shard was written twice"
    assert_complete(out, ref, "same command twice at once")


# ---- forced interleavings (small checkpoint) -------------------------------------------------------
SMALL = ("--int8", "--max-shard-size", "300KB")


@pytest.fixture(scope="module")
def small(zyg: Zygote, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("small")
    src = write_sharded(d / "in", tiny_llama_sd(layers=2, hidden=256, inter=512, vocab=1000), shards=2)
    r = zyg.run("stream", src, d / "ref", *SMALL, "-q")
    assert r.returncode == 0, r.stderr
    p = monoquant.plan(src, "int8", max_shard_size="300KB")
    first_tensor = [p.tensors[s.tensors[0]].ref.name for s in p.shards]
    names = [s.filename for s in p.shards]
    assert len(names) >= 4
    return src, read_dir_bytes(d / "ref"), first_tensor, names


def test_a_process_never_redoes_a_shard_another_finished_meanwhile(
    zyg: Zygote, small, tmp_path: Path
) -> None:
    """P1 holds shard 1's lock (paused inside it); P2 skips that shard as busy, writes all the
    others and cannot write the index. P1 resumes: it must finish its shard, *skip* the shards P2
    journaled meanwhile, and write the index."""
    src, ref, first_tensor, names = small
    out, sig, go = tmp_path / "out", tmp_path / "p1-in-shard-1", tmp_path / "go"
    hold = {"kind": "tensor", "name": first_tensor[0], "signal": str(sig), "wait": str(go)}
    p1 = zyg.start("stream", src, out, *SMALL, "--json", hooks={"events": [hold]})
    wait_for(sig, p1)
    r2 = report(zyg.run("stream", src, out, *SMALL, "--json"))
    assert r2["shards_busy"] == 1 and r2["shards_written"] == len(names) - 1 and not r2["complete"], r2
    assert not (out / INDEX_NAME).exists()
    go.touch()
    p1.wait()
    r1 = report(p1)
    assert r1["complete"], r1
    assert (r1["shards_written"], r1["shards_skipped"]) == (1, len(names) - 1), (
        f"P1 rewrote shards P2 had already finished: {r1['shards_written']} written, "
        f"{r1['shards_skipped']} skipped (the journal is read once at start, not after taking each shard's "
        "lock)"
    )
    assert_complete(out, ref, "forced interleaving")


def test_a_late_process_does_not_fail_after_another_finished_the_job(
    zyg: Zygote, small, tmp_path: Path
) -> None:
    """P1 pauses in shard 1; P2 writes the others up to the last shard and pauses there; P1
    finishes shard 1 and goes on to shard 2, which P2 has finished; P2 then completes the job
    (index, state removed). P1 must end cleanly (exit 0), not fail or write into the finished
    model."""
    src, ref, first_tensor, names = small
    out = tmp_path / "out"
    f = {k: tmp_path / k for k in ("p1-in-1", "go-1", "p1-at-2", "go-2", "p2-in-last")}
    p1 = zyg.start(
        "stream",
        src,
        out,
        *SMALL,
        "--json",
        hooks={
            "events": [
                {
                    "kind": "tensor",
                    "name": first_tensor[0],
                    "signal": str(f["p1-in-1"]),
                    "wait": str(f["go-1"]),
                },
                {
                    "kind": "tensor",
                    "name": first_tensor[1],
                    "signal": str(f["p1-at-2"]),
                    "wait": str(f["go-2"]),
                },
                {"kind": "shard_skipped", "name": names[1], "signal": str(f["p1-at-2"])},
            ]
        },
    )
    wait_for(f["p1-in-1"], p1)
    p2 = zyg.start(
        "stream",
        src,
        out,
        *SMALL,
        "--json",
        hooks={
            "events": [
                {
                    "kind": "tensor",
                    "name": first_tensor[-1],
                    "signal": str(f["p2-in-last"]),
                    "wait": str(f["p1-at-2"]),
                },
            ]
        },
    )
    wait_for(f["p2-in-last"], p2)
    f["go-1"].touch()
    p2.wait(120)
    r2 = report(p2)
    assert r2["complete"] and r2["shards_busy"] == 1, r2
    f["go-2"].touch()
    p1.wait(120)
    assert p1.returncode == 0, f"P1 failed after P2 completed the job: {p1.stderr.strip()}"
    r1 = json.loads(p1.stdout)
    assert r1["shards_written"] == 1, f"P1 rewrote {r1['shards_written'] - 1} shard(s) P2 had finished"
    assert_complete(out, ref, "late process")


def test_a_worker_starting_while_another_finishes_leaves_the_model_alone(
    zyg: Zygote, small, tmp_path: Path
) -> None:
    """B checks "already complete?" (no), then pauses; A runs the whole job (index written, state
    removed); B resumes: it must write nothing and leave no job state in the finished model."""
    src, ref, _, _ = small
    out, sig, go = tmp_path / "out", tmp_path / "b-checked", tmp_path / "go"
    pause = {"pause_before_prepare": {"signal": str(sig), "wait": str(go)}}
    b = zyg.start("stream", src, out, *SMALL, "--json", hooks=pause)
    wait_for(sig, b)
    assert report(zyg.run("stream", src, out, *SMALL, "--json"))["complete"]
    assert_complete(out, ref, "A alone")
    go.touch()
    b.wait(120)
    rb = report(b)
    assert rb["complete"], rb
    assert rb["shards_written"] == 0, f"B rewrote {rb['shards_written']} shard(s) of the finished model"
    assert_complete(out, ref, "after B")
