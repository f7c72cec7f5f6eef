"""Resume trusts a journaled shard only while the file is the one that was journaled.

A first run with ``worker=(0, 2)`` writes and journals half of the shards and leaves the job
unfinished (no index); the shards are then changed behind the journal's back, and a rerun of the
whole job must redo exactly the changed shards and still give the bytes of an uninterrupted run.
Journals of earlier versions (a ``crc32`` field, the digest over CRC-32s; a ``sha256`` field, a
sha256 of every byte) are still read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import monoquant
from monoquant.journal import STATE_DIR, entry_matches
from monoquant.pipeline import plan as make_plan
from monoquant.writer import crc_shard_digest, legacy_shard_digest, shard_digest
from tests.helpers import read_dir_bytes, tiny_llama_sd, write_sharded

OPTS = {"max_shard_size": "300KB", "overlap": False}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("journal")
    src = write_sharded(d / "in", tiny_llama_sd(layers=2, hidden=256, inter=512, vocab=1000), shards=2)
    rep = monoquant.stream(src, d / "ref", "int8", **OPTS)
    assert rep.complete and rep.shards_written >= 6
    return src, read_dir_bytes(d / "ref")


def half_done(src: Path, out: Path) -> list[str]:
    """Run worker 0 of 2: its shards are written and journaled, the job stays unfinished."""
    rep = monoquant.stream(src, out, "int8", worker=(0, 2), **OPTS)
    assert not rep.complete and rep.shards_written >= 3
    journal = out / STATE_DIR / "journal.jsonl"
    return [json.loads(line)["shard"] for line in journal.read_text().splitlines()]


def flip_last_byte(f: Path) -> None:
    with open(f, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0x01]))


def truncate(f: Path) -> None:
    os.truncate(f, f.stat().st_size - 1)


def zero_middle(f: Path) -> None:
    """A torn write as a crash could leave it: a page of zeros, size unchanged."""
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2 // 4096 * 4096)
        fh.write(b"\0" * 4096)


@pytest.mark.parametrize("damage", [flip_last_byte, truncate, zero_middle])
def test_changed_journaled_shard_is_redone_and_output_is_identical(ckpt, tmp_path: Path, damage) -> None:
    src, ref = ckpt
    out = tmp_path / "out"
    done = half_done(src, out)
    damage(out / done[1])
    rep = monoquant.stream(src, out, "int8", **OPTS)
    assert rep.complete
    # the damaged shard and worker 1's shards were written; the intact journaled ones were skipped
    assert rep.shards_skipped == len(done) - 1
    assert read_dir_bytes(out) == ref


def test_shard_replaced_by_another_models_shard_of_the_same_shape_is_redone(ckpt, tmp_path: Path) -> None:
    """Same names, shapes and plan, other weights: same header and size, other bytes."""
    src, ref = ckpt
    other = write_sharded(
        tmp_path / "other", tiny_llama_sd(layers=2, hidden=256, inter=512, vocab=1000, seed=7)
    )
    monoquant.stream(other, tmp_path / "other_out", "int8", **OPTS)
    out = tmp_path / "out"
    done = half_done(src, out)
    victim = out / done[0]
    replacement = (tmp_path / "other_out" / done[0]).read_bytes()
    assert replacement != victim.read_bytes() and len(replacement) == victim.stat().st_size
    victim.write_bytes(replacement)
    rep = monoquant.stream(src, out, "int8", **OPTS)
    assert rep.shards_skipped == len(done) - 1
    assert read_dir_bytes(out) == ref


def rewrite_journal(out: Path, fn) -> None:
    j = out / STATE_DIR / "journal.jsonl"
    lines = [fn(json.loads(line)) for line in j.read_text().splitlines()]
    j.write_text("".join(json.dumps(e) + "\n" for e in lines))


@pytest.mark.parametrize(
    ("field", "digest_of", "changed"),
    [("crc32", crc_shard_digest, 0), ("sha256", legacy_shard_digest, -1)],
    ids=["crc32", "sha256"],
)
def test_journal_of_an_earlier_version_is_still_read(ckpt, tmp_path: Path, field, digest_of, changed) -> None:
    """Entries of earlier versions, a ``crc32`` field (the digest over CRC-32s, the version
    before) or a ``sha256`` one (before that), are checked with their own digest: intact shards
    are kept, a changed one is redone, and the bytes are an uninterrupted run's."""
    src, ref = ckpt
    out = tmp_path / "out"
    done = half_done(src, out)
    p = make_plan(src, "int8", max_shard_size=OPTS["max_shard_size"])
    by_name = {s.filename: s for s in p.shards}

    def earlier(e: dict) -> dict:
        s = by_name[e["shard"]]
        outputs = [o for i in s.tensors for o in p.tensors[i].outputs]
        digest = digest_of(out / s.filename, s, outputs)
        assert digest and digest != e["sum64"]
        return {"shard": e["shard"], "bytes": e["bytes"], field: digest}

    rewrite_journal(out, earlier)
    flip_last_byte(out / done[changed])
    rep = monoquant.stream(src, out, "int8", **OPTS)
    assert rep.complete
    assert rep.shards_skipped == len(done) - 1
    assert read_dir_bytes(out) == ref


def test_entry_without_a_known_digest_is_not_trusted(ckpt, tmp_path: Path) -> None:
    src, ref = ckpt
    out = tmp_path / "out"
    done = half_done(src, out)
    rewrite_journal(out, lambda e: {"shard": e["shard"], "bytes": e["bytes"], "xxh3": "0" * 16})
    rep = monoquant.stream(src, out, "int8", **OPTS)
    assert done and rep.shards_skipped == 0
    assert rep.shards_written == len(make_plan(src, "int8", max_shard_size=OPTS["max_shard_size"]).shards)
    assert read_dir_bytes(out) == ref


def test_digest_checks_every_tensor_and_the_header(ckpt, tmp_path: Path) -> None:
    """shard_digest reads the file: one flipped byte in any output tensor, or in the header,
    changes it; the digests of the earlier versions (over CRC-32s, over sha256s) see it too."""
    src, _ = ckpt
    out = tmp_path / "out"
    half_done(src, out)
    p = make_plan(src, "int8", max_shard_size=OPTS["max_shard_size"])
    s = p.shards[0]
    path = out / s.filename
    outputs = [o for i in s.tensors for o in p.tensors[i].outputs]
    entry = json.loads((out / STATE_DIR / "journal.jsonl").read_text().splitlines()[0])
    assert entry["shard"] == s.filename
    assert entry_matches(path, s, outputs, entry)
    good, good_legacy = shard_digest(path, s, outputs), legacy_shard_digest(path, s, outputs)
    good_crc = crc_shard_digest(path, s, outputs)
    assert good == entry["sum64"]
    assert len({good, good_legacy, good_crc}) == 3
    data_start = 8 + len(s.header)
    original = path.read_bytes()
    places = [4 + 8, *(data_start + o.offset + o.nbytes // 2 for o in outputs if o.nbytes)]
    for pos in places:
        with open(path, "r+b") as fh:
            fh.seek(pos)
            fh.write(bytes([original[pos] ^ 0x80]))
        assert shard_digest(path, s, outputs) != good, pos
        assert legacy_shard_digest(path, s, outputs) != good_legacy, pos
        assert crc_shard_digest(path, s, outputs) != good_crc, pos
        assert not entry_matches(path, s, outputs, entry)
        path.write_bytes(original)
    assert entry_matches(path, s, outputs, entry)


def test_digest_does_not_depend_on_block_size(ckpt, tmp_path: Path) -> None:
    """The writer's running checksums over blocks of 64 KiB and of 4 MiB give the same journal."""
    src, _ = ckpt
    for bb, name in ((1 << 16, "a"), (1 << 22, "b")):
        monoquant.stream(src, tmp_path / name, "int8", worker=(0, 2), block_bytes=bb, **OPTS)
    ja = (tmp_path / "a" / STATE_DIR / "journal.jsonl").read_text()
    jb = (tmp_path / "b" / STATE_DIR / "journal.jsonl").read_text()
    assert ja and ja == jb
