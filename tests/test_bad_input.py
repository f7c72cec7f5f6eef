"""Every bad input gets a clear error: exit code 1, one line ``monoquant: error: ...`` naming the file
or tensor, no traceback (``-v`` shows one), the input untouched, nothing half-written in the output.

Each case builds a broken checkpoint (or output directory) in code; the CLI runs in child
processes forked from a fork server that imported torch once (``tests/cli_zygote.py``); a few
cases also run through the installed console script to show that both give the same result.
``scripts/bad_inputs_table.py`` runs the same cases to write ``docs/bad-inputs.md``. Also: disk
full mid-run on a small tmpfs, a read-only output, and a hypothesis fuzz test of
:func:`monoquant.reader.parse_header`.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from monoquant.errors import CheckpointError, MonoquantError
from monoquant.plan import INDEX_NAME
from monoquant.reader import parse_header
from tests.cli_helpers import Zygote, assert_one_error_line, run_cli, tmpfs, zygote_for
from tests.helpers import read_dir_bytes, tiny_llama_sd, write_sharded

SHARD2 = "model-00002-of-00003.safetensors"


def small_sd() -> dict[str, torch.Tensor]:
    return tiny_llama_sd(layers=2, hidden=128, inter=256, vocab=300)


# ---- building blocks ----------------------------------------------------------------------------
def split_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_st(path: Path, header: dict | bytes, data: bytes, *, hlen: int | None = None) -> None:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if hlen is None else hlen) + hb + data)


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def sharded(d: Path) -> Path:
    return write_sharded(d / "in", small_sd(), shards=3)


class Evil:
    """Unpickling this would create a file: proof that monoquant never runs pickle code."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@dataclass
class Case:
    """One bad input. ``build(tmp)`` returns ``(src, dst)``; ``names`` must appear in the message."""

    id: str
    what: str
    build: Build
    names: tuple[str, ...]
    extra: tuple[str, ...] = ()
    mid_run: bool = False  # the error comes after some shards were written


Build = Callable[[Path], tuple[Path, Path]]


def _mutate(fn: Callable[[dict, bytes], tuple[dict | bytes, bytes, int | None]]) -> Build:
    """A case that rewrites the header (and maybe data) of shard 2 of a 3-shard checkpoint."""

    def build(d: Path) -> tuple[Path, Path]:
        src = sharded(d)
        header, data = split_st(src / SHARD2)
        h, data, hlen = fn(header, data)
        join_st(src / SHARD2, h, data, hlen=hlen)
        return src, d / "out"

    return build


def _truncated(keep: Callable[[int, int], int]) -> Build:
    def build(d: Path) -> tuple[Path, Path]:
        src = sharded(d)
        p = src / SHARD2
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        p.write_bytes(raw[: keep(n, len(raw))])
        return src, d / "out"

    return build


def _tensor_in_shard2() -> str:
    names = list(small_sd())
    per = -(-len(names) // 3)  # as write_sharded splits them
    return names[per + 3]  # a 2-D weight that the int8 scheme quantizes


T2 = _tensor_in_shard2()


def _unknown_dtype(h: dict, data: bytes):
    h[T2]["dtype"] = "F4_E2M1X"
    return h, data, None


def _shape_mismatch(h: dict, data: bytes):
    h[T2]["shape"] = [h[T2]["shape"][0] + 1, *h[T2]["shape"][1:]]
    return h, data, None


def _overlap(h: dict, data: bytes):
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, b = names[0], names[1]
    # b now starts 2 bytes before a ends (same size, still inside the data section)
    size_b = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    start = h[a]["data_offsets"][1] - 2
    h[b]["data_offsets"] = [start, start + size_b]
    return h, data, None


def _out_of_file(h: dict, data: bytes):
    last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    b, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [b + 4096, e + 4096]
    return h, data, None


def _header_not_json(h: dict, data: bytes):
    raw = json.dumps(h).encode()
    return b"{not json" + raw[9:], data, None


def _header_not_object(h: dict, data: bytes):
    return b"[1, 2, 3]", data, None


def _header_beyond(h: dict, data: bytes):
    raw = json.dumps(h).encode()
    return raw, data, len(raw) + len(data) + 1000


def _header_implausible(h: dict, data: bytes):
    return json.dumps(h).encode(), data, 1 << 40


def _bad_offsets_type(h: dict, data: bytes):
    h[T2]["data_offsets"] = "0-10"
    return h, data, None


def _edit_index(fn: Callable[[dict, Path], None]) -> Build:
    def build(d: Path) -> tuple[Path, Path]:
        src = sharded(d)
        ip = src / "model.safetensors.index.json"
        index = json.loads(ip.read_text())
        fn(index, src)
        ip.write_text(json.dumps(index))
        return src, d / "out"

    return build


def _index_missing_shard(index: dict, src: Path) -> None:
    index["weight_map"][T2] = "model-00009-of-00009.safetensors"


def _index_wrong_shard(index: dict, src: Path) -> None:
    index["weight_map"][T2] = "model-00001-of-00003.safetensors"


def _index_unlisted(index: dict, src: Path) -> None:
    del index["weight_map"][T2]


def _index_not_json(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    (src / "model.safetensors.index.json").write_text('{"weight_map": {')
    return src, d / "out"


def _index_too_deep(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    (src / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    return src, d / "out"


def _dup_indexed(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    p1 = src / "model-00001-of-00003.safetensors"
    t = load_file(str(p1))
    t[T2] = small_sd()[T2]
    save_file(t, str(p1), metadata={"format": "pt"})
    return src, d / "out"


def _dup_no_index(d: Path) -> tuple[Path, Path]:
    src = write_sharded(d / "in", small_sd(), shards=3, index=False)
    p1 = src / "model-00001-of-00003.safetensors"
    t = load_file(str(p1))
    t[T2] = small_sd()[T2]
    save_file(t, str(p1), metadata={"format": "pt"})
    return src, d / "out"


def _bin_evil(d: Path) -> tuple[Path, Path]:
    src = d / "in"
    src.mkdir(parents=True)
    evil = Evil()
    Evil.marker = str(d / "PWNED")
    torch.save({"w": torch.zeros(4, 4), "x": evil}, src / "pytorch_model.bin")
    return src, d / "out"


class Custom:
    """A plain custom class: torch.save pickles it by reference (not weights-only)."""

    def __init__(self) -> None:
        self.lr = 0.1


def _bin_custom(d: Path) -> tuple[Path, Path]:
    src = d / "in"
    src.mkdir(parents=True)
    torch.save({"w": torch.zeros(4, 4), "optimizer_cfg": Custom()}, src / "pytorch_model.bin")
    return src, d / "out"


def _bin_legacy(d: Path) -> tuple[Path, Path]:
    src = d / "in"
    src.mkdir(parents=True)
    torch.save({"w": torch.zeros(4, 4)}, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    return src, d / "out"


def _bin_list(d: Path) -> tuple[Path, Path]:
    src = d / "in"
    src.mkdir(parents=True)
    torch.save([torch.zeros(4, 4)], src / "pytorch_model.bin")
    return src, d / "out"


def _bin_non_tensor(d: Path) -> tuple[Path, Path]:
    src = d / "in"
    src.mkdir(parents=True)
    torch.save({"w": torch.zeros(4, 4), "step": 7}, src / "pytorch_model.bin")
    return src, d / "out"


def _bin_odd_tensor(make: Callable[[], torch.Tensor]) -> Build:
    def build(d: Path) -> tuple[Path, Path]:
        src = d / "in"
        src.mkdir(parents=True)
        torch.save({"w": torch.zeros(4, 4), "odd.weight": make()}, src / "pytorch_model.bin")
        return src, d / "out"

    return build


def _bin_truncated(d: Path) -> tuple[Path, Path]:
    src = write_sharded(d / "in", small_sd(), shards=1, index=False, fmt="bin")
    (p,) = src.glob("*.bin")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return src, d / "out"


def _empty_dir(d: Path) -> tuple[Path, Path]:
    (d / "in").mkdir()
    (d / "in" / "README.md").write_text("no weights here")
    return d / "in", d / "out"


def _missing_input(d: Path) -> tuple[Path, Path]:
    return d / "does-not-exist", d / "out"


def _no_tensors(d: Path) -> tuple[Path, Path]:
    (d / "in").mkdir()
    join_st(d / "in" / "model.safetensors", {"__metadata__": {"format": "pt"}}, b"")
    return d / "in", d / "out"


def _bad_config(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    (src / "config.json").write_text('{"model_type": "llama",')
    return src, d / "out"


def _nan_weight(d: Path) -> tuple[Path, Path]:
    sd = small_sd()
    sd[T2] = sd[T2].clone()
    sd[T2][3, 5] = float("nan")
    return write_sharded(d / "in", sd, shards=3), d / "out"


def _out_same(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    return src, src


def _out_inside(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    return src, src / "quantized"


def _out_contains(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    return src, d


def _out_holds_file(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    return src / SHARD2.replace("00002", "00001"), src


def _out_is_file(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    (d / "out").write_text("a file, not a directory")
    return src, d / "out"


def _out_foreign(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("mine")
    return src, d / "out"


def _bad_worker(d: Path) -> tuple[Path, Path]:
    return sharded(d), d / "out"


def _index_entry(entry: Callable[[Path], str]) -> Build:
    """The index names shard 2 by ``entry(d)``: a path outside the checkpoint holding a real copy."""

    def build(d: Path) -> tuple[Path, Path]:
        src = sharded(d)
        outside = d / "secret"
        outside.mkdir()
        (outside / SHARD2).write_bytes((src / SHARD2).read_bytes())
        ip = src / "model.safetensors.index.json"
        index = json.loads(ip.read_text())
        name = entry(d)
        index["weight_map"] = {k: (name if v == SHARD2 else v) for k, v in index["weight_map"].items()}
        ip.write_text(json.dumps(index))
        return src, d / "out"

    return build


def _symlinked_subdir(d: Path) -> str:
    (d / "in" / "sub").symlink_to(d / "secret")
    return f"sub/{SHARD2}"


def _side_symlink(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    (d / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (src / "tokenizer.json").unlink(missing_ok=True)
    (src / "tokenizer.json").symlink_to(d / "passwd")
    return src, d / "out"


def _weight_symlink(d: Path) -> tuple[Path, Path]:
    src = write_sharded(d / "in", small_sd(), shards=1, index=False)
    (src / "model-00001-of-00001.safetensors").rename(d / "elsewhere.safetensors")
    (src / "model-00001-of-00001.safetensors").symlink_to(d / "elsewhere.safetensors")
    return src, d / "out"


def _two_layouts(d: Path) -> tuple[Path, Path]:
    src = d / "in"
    src.mkdir(parents=True)
    torch.save({"model.w": torch.zeros(4, 4)}, src / "pytorch_model.bin")
    torch.save({"w": torch.zeros(4, 4)}, src / "consolidated.00.pth")
    return src, d / "out"


def _symlinked_state(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    (d / "victim").mkdir()
    (d / "victim" / "model-00001-of-00001.safetensors").write_text("not yours")
    (d / "out").mkdir()
    (d / "out" / ".monoquant").symlink_to(d / "victim")
    return src, d / "out"


def _foreign_shard_name(d: Path) -> tuple[Path, Path]:
    src = sharded(d)
    (d / "out").mkdir()
    (d / "out" / "model-00007-of-00009.safetensors").write_text("someone else's shard")
    return src, d / "out"


CASES = [
    Case(
        "truncated-data",
        "a shard cut short inside its data",
        _truncated(lambda n, size: size - 1000),
        (SHARD2, "truncated"),
    ),
    Case(
        "truncated-header",
        "a shard cut short inside its header",
        _truncated(lambda n, size: 8 + n // 2),
        (SHARD2,),
    ),
    Case("truncated-4-bytes", "a shard of 4 bytes", _truncated(lambda n, size: 4), (SHARD2,)),
    Case(
        "header-beyond-file", "header length field larger than the file", _mutate(_header_beyond), (SHARD2,)
    ),
    Case("header-implausible", "header length field of 1 TiB", _mutate(_header_implausible), (SHARD2,)),
    Case("header-not-json", "header bytes are not JSON", _mutate(_header_not_json), (SHARD2, "JSON")),
    Case(
        "header-not-object",
        "header is JSON but not an object (`[1, 2, 3]`)",
        _mutate(_header_not_object),
        (SHARD2,),
    ),
    Case(
        "unknown-dtype", "a tensor with dtype `F4_E2M1X`", _mutate(_unknown_dtype), (SHARD2, T2, "F4_E2M1X")
    ),
    Case("shape-vs-bytes", "shape x dtype size ≠ data_offsets span", _mutate(_shape_mismatch), (SHARD2, T2)),
    Case(
        "overlapping-offsets", "two tensors whose byte ranges overlap", _mutate(_overlap), (SHARD2, "overlap")
    ),
    Case("offsets-beyond-file", "data_offsets past the end of the file", _mutate(_out_of_file), (SHARD2,)),
    Case("offsets-not-list", "data_offsets is a string", _mutate(_bad_offsets_type), (SHARD2, T2)),
    Case(
        "index-missing-shard",
        "the index names a shard file that is absent",
        _edit_index(_index_missing_shard),
        ("model-00009-of-00009.safetensors",),
    ),
    Case(
        "index-tensor-not-in-shard",
        "the index puts a tensor in a shard that does not hold it",
        _edit_index(_index_wrong_shard),
        (T2, "model-00001-of-00003.safetensors"),
    ),
    Case(
        "index-tensor-unlisted",
        "a shard holds a tensor the index does not list",
        _edit_index(_index_unlisted),
        (T2,),
    ),
    Case("index-not-json", "the index file is not JSON", _index_not_json, ("model.safetensors.index.json",)),
    Case(
        "index-too-deep",
        "the index is JSON nested too deep to parse",
        _index_too_deep,
        ("model.safetensors.index.json",),
    ),
    Case("tensor-in-two-shards", "the same tensor in two shards (with index)", _dup_indexed, (T2,)),
    Case("tensor-in-two-files", "the same tensor in two shards (no index)", _dup_no_index, (T2,)),
    Case(
        "bin-pickle-runs-code",
        "a .bin whose pickle would call `open()` on load",
        _bin_evil,
        ("pytorch_model.bin", "io.open", "arbitrary code"),
    ),
    Case(
        "bin-custom-class",
        "a .bin holding an object of a custom class (not weights-only)",
        _bin_custom,
        ("pytorch_model.bin", "Custom"),
    ),
    Case(
        "bin-legacy-format",
        "a .bin in the legacy (non-zip) torch format",
        _bin_legacy,
        ("pytorch_model.bin",),
    ),
    Case("bin-not-a-dict", "a .bin holding a list of tensors", _bin_list, ("pytorch_model.bin",)),
    Case(
        "bin-non-tensor-entry",
        "a .bin state dict with an int entry",
        _bin_non_tensor,
        ("pytorch_model.bin", "step"),
    ),
    Case(
        "bin-sparse-tensor",
        "a .bin holding a sparse tensor",
        _bin_odd_tensor(lambda: torch.ones(4, 8).to_sparse()),
        ("pytorch_model.bin", "odd.weight", "sparse"),
    ),
    Case(
        "bin-meta-tensor",
        "a .bin holding a meta tensor (no data)",
        _bin_odd_tensor(lambda: torch.empty(4, 8, device="meta")),
        ("pytorch_model.bin", "odd.weight", "meta"),
    ),
    Case("bin-truncated", "a .bin cut in half", _bin_truncated, ("pytorch_model-00001-of-00001.bin",)),
    Case("empty-dir", "a directory without weights", _empty_dir, ("{src}",)),
    Case("missing-input", "an input path that does not exist", _missing_input, ("{src}",)),
    Case("no-tensors", "a safetensors file with no tensors", _no_tensors, ("{src}",)),
    Case("config-not-json", "config.json is not valid JSON", _bad_config, ("config.json",)),
    Case(
        "nan-weight", "a NaN in a weight that is quantized (found mid-run)", _nan_weight, (T2,), mid_run=True
    ),
    Case("out-is-input", "output directory = input directory", _out_same, ("{dst}", "input")),
    Case("out-inside-input", "output directory inside the input", _out_inside, ("{dst}", "inside")),
    Case("out-contains-input", "output directory contains the input", _out_contains, ("{dst}", "contains")),
    Case(
        "out-holds-input-file",
        "single-file input, output = its directory",
        _out_holds_file,
        ("{dst}", "input"),
    ),
    Case("out-is-a-file", "output path is an existing regular file", _out_is_file, ("{dst}",)),
    Case("out-not-empty", "output directory holds unrelated files", _out_foreign, ("{dst}", "notes.txt")),
    Case("bad-worker", "`--worker 3/2`", _bad_worker, ("3/2",), extra=("--worker", "3/2")),
    Case(
        "index-entry-parent",
        "an index entry `../secret/model-….safetensors`",
        _index_entry(lambda d: f"../secret/{SHARD2}"),
        (f"../secret/{SHARD2}", "outside"),
    ),
    Case(
        "index-entry-absolute",
        "an index entry that is an absolute path",
        _index_entry(lambda d: str(d / "secret" / SHARD2)),
        ("outside",),
    ),
    Case(
        "index-entry-symlinked-dir",
        "an index entry `sub/…` where `sub` is a symlink to another directory",
        _index_entry(_symlinked_subdir),
        (f"sub/{SHARD2}", "outside"),
    ),
    Case(
        "side-file-symlink",
        "a side file (`tokenizer.json`) that is a symlink to a file outside the input",
        _side_symlink,
        ("tokenizer.json", "outside"),
    ),
    Case(
        "weight-file-symlink",
        "a weight file that is a symlink to a file outside the input",
        _weight_symlink,
        ("model-00001-of-00001.safetensors", "outside"),
    ),
    Case(
        "two-layouts",
        "`pytorch_model.bin` and `consolidated.00.pth` side by side",
        _two_layouts,
        ("pytorch_model.bin", "consolidated.00.pth"),
    ),
    Case(
        "max-shard-size-1e400",
        "`--max-shard-size 1e400`",
        _bad_worker,
        ("1e400",),
        extra=("--max-shard-size", "1e400"),
    ),
    Case(
        "max-shard-size-0",
        "`--max-shard-size 0`",
        _bad_worker,
        ("0", "positive"),
        extra=("--max-shard-size", "0"),
    ),
    Case(
        "state-dir-symlink",
        "`OUT/.monoquant` is a symlink to another directory",
        _symlinked_state,
        (".monoquant", "symlink"),
    ),
    Case(
        "out-foreign-shard-name",
        "output holds a file named like a shard of another model",
        _foreign_shard_name,
        ("model-00007-of-00009.safetensors",),
    ),
]
BY_ID = {c.id: c for c in CASES}


@dataclass
class Outcome:
    case: Case
    root: Path
    src: Path
    dst: Path
    before: dict[str, bytes]
    after: dict[str, bytes]
    plain: object
    verbose: object
    dst_after: dict[str, bytes] | None
    dst_before: dict[str, bytes]


def snapshot(p: Path) -> dict[str, bytes]:
    if p.is_file():
        return {p.name: p.read_bytes()}
    return read_dir_bytes(p) if p.exists() else {}


def run_case(z: Zygote, case: Case, root: Path) -> Outcome:
    root.mkdir(parents=True, exist_ok=True)
    src, dst = case.build(root)
    # the "input" whose bytes must not change: the whole directory holding the input
    in_root = src.parent if src.is_file() or not src.exists() else src
    before = snapshot(in_root)
    dst_before = snapshot(dst)
    args = ["stream", src, dst, "--int8", "--max-shard-size", "40KB", *case.extra]
    plain = z.run(*args)
    dst_after = snapshot(dst) if dst.is_dir() and dst != in_root and in_root not in dst.parents else None
    verbose = z.run(*args, "-v")
    after = snapshot(in_root)
    return Outcome(case, root, src, dst, before, after, plain, verbose, dst_after, dst_before)


@pytest.fixture(scope="module")
def zyg(tmp_path_factory: pytest.TempPathFactory):
    with zygote_for(tmp_path_factory.mktemp("zygote")) as z:
        yield z


@pytest.fixture(scope="module")
def outcomes(zyg: Zygote, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad")
    return {c.id: run_case(zyg, c, root / c.id) for c in CASES}


@pytest.mark.parametrize("cid", [c.id for c in CASES])
def test_bad_input_gives_one_clear_line_and_touches_nothing(outcomes: dict[str, Outcome], cid: str) -> None:
    o = outcomes[cid]
    names = [n.format(src=o.src, dst=o.dst) for n in o.case.names]
    msg = assert_one_error_line(o.plain, *names, allow_progress=o.case.mid_run)
    assert len(msg) < 400, f"message too long: {msg}"
    # -v: the same line, after a traceback
    v = o.verbose
    assert v.returncode == 1, v.stderr  # type: ignore[attr-defined]
    assert "Traceback (most recent call last)" in v.stderr, v.stderr  # type: ignore[attr-defined]
    assert v.stderr.splitlines()[-1] == msg, v.stderr  # type: ignore[attr-defined]
    # the input is untouched
    assert o.after == o.before, "the input directory changed"
    # nothing half-done in the output: no index, no partial, and only finished shards
    if o.dst_after is not None:
        assert INDEX_NAME not in o.dst_after
        assert not [n for n in o.dst_after if n.endswith(".partial")]
        if not o.case.mid_run:
            new = {n for n in o.dst_after if n not in o.dst_before and not n.startswith(".monoquant")}
            assert not new, f"files written before the error: {sorted(new)}"


def test_bad_pickle_code_never_runs(outcomes: dict[str, Outcome]) -> None:
    o = outcomes["bin-pickle-runs-code"]
    assert not (o.src.parent / "PWNED").exists(), "the pickle's code ran"
    assert "weights-only" in o.plain.stderr  # type: ignore[attr-defined]


def test_bad_input_found_before_any_shard_is_written(outcomes: dict[str, Outcome]) -> None:
    """Input problems that headers/side files reveal must stop the run before the long job
    (DESIGN §2 "validate"): no shard may exist in the output afterwards."""
    for cid in ("config-not-json", "no-tensors"):
        o = outcomes[cid]
        shards = [] if not o.dst.is_dir() else sorted(p.name for p in o.dst.glob("model-*.safetensors"))
        assert not shards, f"{cid}: shards written before the error was found: {shards}"


def test_nan_run_keeps_finished_shards_intact(
    zyg: Zygote, outcomes: dict[str, Outcome], tmp_path: Path
) -> None:
    o = outcomes["nan-weight"]
    ref = tmp_path / "ref"
    clean = write_sharded(tmp_path / "in", small_sd(), shards=3)
    r = zyg.run("stream", clean, ref, "--int8", "--max-shard-size", "40KB", "-q")
    assert r.returncode == 0, r.stderr
    assert o.dst_after is not None
    shards = sorted(n for n in o.dst_after if n.startswith("model-") and n.endswith(".safetensors"))
    assert shards, "the NaN tensor is not in the first output shard: expected some finished shards"
    for n in shards:
        assert o.dst_after[n] == (ref / n).read_bytes(), n


@pytest.mark.parametrize("cid", ["header-not-json", "bin-truncated", "out-inside-input"])
def test_console_script_gives_the_same_result(outcomes: dict[str, Outcome], tmp_path: Path, cid: str) -> None:
    """The real ``monoquant`` executable (a fresh interpreter) prints the same line and exits 1."""
    case = BY_ID[cid]
    src, dst = case.build(tmp_path)
    r = run_cli("stream", src, dst, "--int8", "--max-shard-size", "40KB", *case.extra)
    msg = assert_one_error_line(r, *[n.format(src=src, dst=dst) for n in case.names])
    o = outcomes[cid]
    want = o.plain.stderr.strip()  # type: ignore[attr-defined]
    assert msg.replace(str(tmp_path), "<tmp>") == want.replace(str(o.root), "<tmp>")
    v = run_cli("stream", src, dst, "--int8", "--max-shard-size", "40KB", "-v", *case.extra)
    assert v.returncode == 1 and "Traceback (most recent call last)" in v.stderr
    assert v.stderr.splitlines()[-1] == msg


# ---- output directory not writable, disk full ---------------------------------------------------
@pytest.fixture(scope="module")
def src_and_ref(zyg: Zygote, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    d = tmp_path_factory.mktemp("full")
    src = write_sharded(d / "in", tiny_llama_sd(layers=2, hidden=256, inter=512, vocab=1000), shards=2)
    r = zyg.run("stream", src, d / "ref", "--int8", "--max-shard-size", "300KB", "-q")
    assert r.returncode == 0, r.stderr
    return src, read_dir_bytes(d / "ref")


@pytest.mark.parametrize("where", ["new-dir-on-ro-fs", "ro-fs-root"])
def test_read_only_output_is_a_clear_error(zyg: Zygote, tmp_path: Path, src_and_ref, where: str) -> None:
    """Root ignores permission bits, so a read-only mount is what denies writes here."""
    src, _ = src_and_ref
    before = read_dir_bytes(src)
    with tmpfs(tmp_path / "ro", "1m", ro=True) as mnt:
        dst = mnt / "out" if where == "new-dir-on-ro-fs" else mnt
        r = zyg.run("stream", src, dst, "--int8")
        assert_one_error_line(r, str(dst), "not writable")
        v = zyg.run("stream", src, dst, "--int8", "-v")
        assert v.returncode == 1 and "Traceback" in v.stderr
        assert not (mnt / "out").exists() and not list(mnt.iterdir())
    assert read_dir_bytes(src) == before


def test_disk_full_mid_run_then_rerun_completes(zyg: Zygote, tmp_path: Path, src_and_ref) -> None:
    """Fill the disk as soon as the first shard is finished: a clear error naming the shard, the
    finished shard intact, no partial, no index; free the space and rerun: identical output."""
    src, ref = src_and_ref
    before = read_dir_bytes(src)
    size_out = sum(len(b) for b in ref.values())
    with tmpfs(tmp_path / "small", f"{size_out + (3 << 20)}") as mnt:
        dst, filler = mnt / "out", mnt / "filler"
        hooks = {"events": [{"kind": "shard_done", "fill": str(filler)}]}
        r = zyg.run("stream", src, dst, "--int8", "--max-shard-size", "300KB", hooks=hooks)
        msg = assert_one_error_line(r, "disk full", allow_progress=True)
        assert "model-00002-of-" in msg, msg
        done = sorted(p.name for p in dst.glob("model-*.safetensors"))
        assert done == [min(n for n in ref if n.startswith("model-"))], done
        for n in done:
            assert (dst / n).read_bytes() == ref[n], f"{n} damaged by the failed run"
        assert not list(dst.glob("*.partial")), "partial shard left behind after disk full"
        assert not (dst / INDEX_NAME).exists()
        filler.unlink()
        r = zyg.run("stream", src, dst, "--int8", "--max-shard-size", "300KB", "-q")
        assert r.returncode == 0, r.stderr
        assert read_dir_bytes(dst) == ref
    assert read_dir_bytes(src) == before


def test_not_enough_space_is_found_before_writing(zyg: Zygote, tmp_path: Path, src_and_ref) -> None:
    src, _ = src_and_ref
    with tmpfs(tmp_path / "tiny", "256k") as mnt:
        r = zyg.run("stream", src, mnt / "out", "--int8", "--max-shard-size", "300KB")
        assert_one_error_line(r, str(mnt / "out"), "free")
        assert not list((mnt / "out").glob("model-*"))


# ---- fuzzing the header parser ------------------------------------------------------------------
def _valid_header() -> tuple[bytes, int]:
    h = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "BF16", "shape": [4, 8], "data_offsets": [0, 64]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [64, 76]},
        "c": {"dtype": "I8", "shape": [2, 2], "data_offsets": [76, 80]},
    }
    return json.dumps(h).encode(), 80


def _check(raw: bytes, data_len: int) -> None:
    try:
        out = parse_header(raw, data_len, where="f.safetensors: ")
    except CheckpointError as e:
        assert str(e) and "\n" not in str(e)
        return
    # accepted: every entry must be consistent with the data section
    assert isinstance(out, dict)
    spans = []
    for _name, (dtype, shape, b, e) in out.items():
        assert isinstance(dtype, torch.dtype) and 0 <= b <= e <= data_len
        n = 1
        for s in shape:
            n *= s
        assert n * torch.empty((), dtype=dtype).element_size() == e - b
        spans.append((b, e))
    spans.sort()
    assert all(b1 >= e0 for (_, e0), (b1, _) in itertools.pairwise(spans))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
dtypes = st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "F8_E4M3", "I64", "X", "", "f32"])
dtypes = dtypes | json_values
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": dtypes,
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-5, 2**20), min_size=0, max_size=3) | json_values,
    },
)
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(0, 1 << 20))
def test_fuzz_parse_header_random_bytes(raw: bytes, data_len: int) -> None:
    _check(raw, data_len)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values | headers, st.integers(0, 1 << 20))
def test_fuzz_parse_header_random_json(obj: object, data_len: int) -> None:
    _check(json.dumps(obj).encode(), data_len)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_parse_header_mutated_valid(data: st.DataObject) -> None:
    raw, data_len = _valid_header()
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "digit"]))
        i = data.draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "flip" and b:
            b[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            b[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and b:
            del b[i : i + data.draw(st.integers(1, 4))]
        elif op == "digit":
            digits = [k for k, c in enumerate(b) if chr(c).isdigit()]
            if digits:
                b[data.draw(st.sampled_from(digits))] = ord(str(data.draw(st.integers(0, 9))))
    _check(bytes(b), data.draw(st.sampled_from([data_len, data_len - 1, data_len + 7, 0])))


def test_fuzz_check_accepts_the_valid_header() -> None:
    raw, n = _valid_header()
    assert set(parse_header(raw, n)) == {"a", "b", "c"}
    with pytest.raises(MonoquantError):
        parse_header(raw, n - 1)
