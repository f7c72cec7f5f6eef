"""The output directory: monoquant touches only what it wrote (issue 15, monoquant/ownership.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import monoquant
from monoquant import OutputError, PlanMismatchError
from monoquant.plan import INDEX_NAME
from monoquant.verify import verify
from tests.cli_helpers import zygote_for
from tests.helpers import read_dir_bytes, tiny_llama_sd, write_sharded


def _ckpt(root: Path, *, seed: int = 0, side: dict[str, str] | None = None, config: bool = True) -> Path:
    src = write_sharded(root, tiny_llama_sd(layers=1, hidden=128, inter=256, vocab=300, seed=seed), shards=2)
    if not config:
        (src / "config.json").unlink(missing_ok=True)
    for rel, text in (side or {}).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    return src


def test_symlinked_state_dir_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    src = _ckpt(tmp_path / "in")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model-00001-of-00001.safetensors").write_text("precious")
    (victim / "plan.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".monoquant").symlink_to(victim)
    before = read_dir_bytes(victim)
    for restart in (False, True):
        with pytest.raises(OutputError, match="symlink"):
            monoquant.stream(src, out, "int8", restart=restart)
    assert read_dir_bytes(victim) == before
    assert (out / ".monoquant").is_symlink() and sorted(os.listdir(out)) == [".monoquant"]


@pytest.mark.parametrize(
    "name",
    [
        "model-00001-of-00001.safetensors",
        "model-00007-of-00009.safetensors",
        "model-00001-of-00001.safetensors.partial",
    ],
)
def test_files_named_like_shards_are_foreign(tmp_path: Path, name: str) -> None:
    src = _ckpt(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("someone else's")
    with pytest.raises(OutputError, match="not empty"):
        monoquant.stream(src, out, "int8", max_shard_size="5GB")
    assert (out / name).read_text() == "someone else's"


def test_restart_into_another_models_output_leaves_nothing_stale(tmp_path: Path) -> None:
    """Model A (with tokenizer, README, modules.json, a pooling config) is replaced by model B
    (no config.json, no side files): none of A's files may remain, including its config.json
    with the old quantization_config."""
    a = _ckpt(
        tmp_path / "a",
        side={"tokenizer.json": "{}", "README.md": "A", "modules.json": "[]", "1_Pooling/config.json": "{}"},
    )
    b = _ckpt(tmp_path / "b", seed=1, config=False)
    out = tmp_path / "out"
    monoquant.stream(a, out, "int4", max_shard_size="100KB")
    assert (out / "1_Pooling" / "config.json").exists() and (out / "config.json").exists()
    with pytest.raises(OutputError, match="another job"):
        monoquant.stream(b, out, "int8")
    monoquant.stream(b, out, "int8", restart=True)
    ref = tmp_path / "ref"
    monoquant.stream(b, ref, "int8")
    assert read_dir_bytes(out) == read_dir_bytes(ref)
    assert not (out / "config.json").exists() and not (out / "1_Pooling").exists()
    assert verify(out, against=b).ok


def test_restart_refuses_foreign_files_next_to_a_finished_model(tmp_path: Path) -> None:
    a = _ckpt(tmp_path / "a")
    out = tmp_path / "out"
    monoquant.stream(a, out, "int4")
    (out / "notes.txt").write_text("the user's own")
    before = read_dir_bytes(out)
    with pytest.raises(OutputError, match=r"notes\.txt"):
        monoquant.stream(a, out, "int8", restart=True)
    assert read_dir_bytes(out) == before  # nothing deleted, not even the old model's files


def test_restart_never_deletes_through_a_listed_path_outside(tmp_path: Path) -> None:
    """A tampered index listing ``../victim.txt`` as a side file: not ours, never deleted."""
    a = _ckpt(tmp_path / "a")
    out = tmp_path / "out"
    monoquant.stream(a, out, "int4")
    (tmp_path / "victim.txt").write_text("keep")
    ip = out / INDEX_NAME
    index = json.loads(ip.read_text())
    index["metadata"]["monoquant"]["files"] += ["../victim.txt", str(tmp_path / "victim.txt")]
    ip.write_text(json.dumps(index))
    monoquant.stream(a, out, "int8", restart=True)
    assert (tmp_path / "victim.txt").read_text() == "keep"


def test_two_schemes_started_into_one_new_output(tmp_path: Path) -> None:
    """Started at the same moment, int8 and int4 into one new OUT: exactly one succeeds; the
    other fails clearly (never exit 0 with the other scheme's model in OUT).

    Both run as CLI processes forked from the CLI fork server (tests/cli_zygote.py), which never
    computes with torch before forking: forking this test process, whose OpenMP thread pool is
    running, can deadlock the children."""
    src = _ckpt(tmp_path / "in")
    with zygote_for(tmp_path / "zygote") as zyg:
        for trial in range(3):
            out = tmp_path / f"out{trial}"
            runs = {s: zyg.start("stream", src, out, f"--{s}", "--json") for s in ("int8", "int4")}
            for r in runs.values():
                r.wait(300)
            ok = [s for s, r in runs.items() if r.returncode == 0]
            detail = {s: (r.returncode, r.stderr[-400:]) for s, r in runs.items()}
            assert len(ok) == 1, detail
            loser = runs["int4" if ok[0] == "int8" else "int8"]
            assert loser.returncode == 1 and "monoquant: error:" in loser.stderr, detail
            assert "Traceback" not in loser.stderr, detail
            assert json.loads(runs[ok[0]].stdout)["complete"] is True, detail
            meta = json.loads((out / INDEX_NAME).read_text())["metadata"]["monoquant"]
            assert meta["scheme"].startswith(ok[0]), (detail, meta["scheme"])
            assert verify(out, against=src).ok


def test_state_replaced_under_a_running_job_is_detected(tmp_path: Path) -> None:
    """Another run's --restart with other options replaces plan.json while this job runs: the
    job stops at its next shard with a clear error instead of mixing the two."""
    src = _ckpt(tmp_path / "in")
    out = tmp_path / "out"
    seen: list[str] = []

    def hijack(ev: monoquant.ProgressEvent) -> None:
        if ev.kind == "shard_done" and not seen:
            seen.append(ev.name)
            plan = out / ".monoquant" / "plan.json"
            d = json.loads(plan.read_text())
            d["fingerprint"] = "0" * 64
            plan.write_text(json.dumps(d))

    with pytest.raises(PlanMismatchError, match="other input or options"):
        monoquant.stream(src, out, "int8", max_shard_size="100KB", on_progress=hijack)
    assert seen and not (out / INDEX_NAME).exists()


def test_free_space_check_counts_side_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as sh

    src = _ckpt(tmp_path / "in", side={"big.txt": "x" * (8 << 20)})
    out = tmp_path / "out"
    real = sh.disk_usage
    shards = 2 << 20  # more than the shards need, less than shards + the 8 MiB side file

    def fake(p: object) -> object:
        u = real(p)
        return type(u)(u.total, u.used, shards)

    monkeypatch.setattr(sh, "disk_usage", fake)
    with pytest.raises(OutputError, match="free"):
        monoquant.stream(src, out, "int8")
    assert not [p for p in out.rglob("*") if p.is_file() and ".monoquant" not in p.parts]


def test_side_file_copy_failure_leaves_no_hidden_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    src = _ckpt(tmp_path / "in", side={"tokenizer.json": "{}"})
    out = tmp_path / "out"
    real = shutil.copyfile

    def boom(a: object, b: object) -> object:
        real(a, b)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", boom)  # the side-file copy (monoquant.remote.copy_file)
    with pytest.raises(monoquant.MonoquantError, match=r"disk full|No space"):
        monoquant.stream(src, out, "int8")
    monkeypatch.undo()
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".monoquant"]
    assert not hidden and not [p for p in (out / ".monoquant").iterdir() if p.name.endswith(".tmp")]
    # the rerun finishes the job
    assert monoquant.stream(src, out, "int8").complete and verify(out, against=src).ok


def test_rerun_after_a_kill_during_finalize_accepts_its_own_side_files(tmp_path: Path) -> None:
    """Side files copied, index not yet written (a kill): they are listed in plan.json as ours."""
    src = _ckpt(tmp_path / "in", side={"tokenizer.json": "{}"})
    out = tmp_path / "out"
    p = monoquant.plan(src, "int8")
    from monoquant.journal import JobState

    st = JobState(out, p, ["config.json", "tokenizer.json"])
    out.mkdir()
    st.prepare()
    (out / "tokenizer.json").write_text("{}")
    (out / "config.json").write_text("{}")
    assert monoquant.stream(src, out, "int8").complete
    assert (out / "tokenizer.json").read_text() == "{}"


def test_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    src = _ckpt(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".monoquant").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        monoquant.stream(src, out, "int8")


def test_zero_state_tensor_unaffected(tmp_path: Path) -> None:
    """Sanity: a plain run still writes a complete, verifiable output with the files listed."""
    src = _ckpt(tmp_path / "in", side={"tokenizer.json": "{}"})
    out = tmp_path / "out"
    monoquant.stream(src, out, "int8")
    meta = json.loads((out / INDEX_NAME).read_text())["metadata"]["monoquant"]
    assert meta["files"] == ["config.json", "tokenizer.json"]
    assert not (out / ".monoquant").exists()
    assert torch.is_tensor(monoquant.load(out)["model.embed_tokens.weight"])


@pytest.mark.parametrize("planted", ["locks", "journal.jsonl"])
def test_links_planted_inside_the_state_dir_are_refused(tmp_path: Path, planted: str) -> None:
    """A real .monoquant holding a symlink (locks/ or the journal) pointing elsewhere: refused,
    nothing written through it."""
    src = _ckpt(tmp_path / "in")
    out = tmp_path / "out"
    (out / ".monoquant").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    if planted == "locks":
        elsewhere.mkdir()
    else:
        elsewhere.write_text("")
    (out / ".monoquant" / planted).symlink_to(elsewhere)
    with pytest.raises(OutputError, match="symlink"):
        monoquant.stream(src, out, "int8")
    assert (elsewhere.is_dir() and not list(elsewhere.iterdir())) or (
        elsewhere.is_file() and elsewhere.read_text() == ""
    )
