"""Input paths and other bad inputs of issue 15 that are not plain "one error line" cases:
what is allowed (HF cache symlinks, subdirectories, Trainer folders), truncation while reading,
Ctrl-C during start-up, API misuse, and CLI usage errors."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import monoquant
from monoquant import CheckpointError, MonoquantError
from monoquant.cli import main
from monoquant.reader import open_checkpoint
from monoquant.verify import verify
from tests.cli_helpers import popen_cli
from tests.helpers import tiny_llama_sd, write_sharded


def small() -> dict[str, torch.Tensor]:
    return tiny_llama_sd(layers=1, hidden=128, inter=256, vocab=300)


def test_hf_cache_snapshot_symlinks_into_blobs_are_inside(tmp_path: Path) -> None:
    """models--x/snapshots/<rev>/file -> ../../blobs/<sha>: the hub cache layout is allowed."""
    repo = tmp_path / "models--org--tiny"
    src = write_sharded(tmp_path / "plain", small(), shards=2)
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"sha{i}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    out = tmp_path / "out"
    assert monoquant.stream(snap, out, "int8").complete
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert verify(out, against=snap).ok


def test_index_entry_in_a_real_subdirectory_is_read(tmp_path: Path) -> None:
    src = write_sharded(tmp_path / "in", small(), shards=2)
    ip = src / "model.safetensors.index.json"
    index = json.loads(ip.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (src / "sub").mkdir()
    (src / first).rename(src / "sub" / first)
    index["weight_map"] = {k: (f"sub/{v}" if v == first else v) for k, v in index["weight_map"].items()}
    ip.write_text(json.dumps(index))
    ck = open_checkpoint(src)
    assert {r.file.parent.name for r in ck.tensors} == {"sub", "in"}
    assert monoquant.stream(src, tmp_path / "out", "int8").complete


def test_trainer_checkpoint_folder_ignores_training_state(tmp_path: Path) -> None:
    """An HF Trainer checkpoint-N folder: model weights next to optimizer/scheduler/RNG state."""
    src = tmp_path / "checkpoint-500"
    src.mkdir()
    torch.save(small(), src / "pytorch_model.bin")
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), src / "optimizer.pt")
    torch.save(torch.optim.lr_scheduler.StepLR(opt, 1).state_dict(), src / "scheduler.pt")
    torch.save({"python": (1, 2), "cpu": torch.get_rng_state()}, src / "rng_state.pth")
    (src / "training_args.bin").write_bytes(b"\x80\x04not a zip")
    (src / "trainer_state.json").write_text("{}")
    r = CliRunner().invoke(main, ["stream", str(src), str(tmp_path / "out"), "--int8"])
    assert r.exit_code == 0, r.output
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        assert f"note: ignored {name} (training state, not model weights)" in r.output
    assert verify(tmp_path / "out", against=src).ok


def test_mmap_input_truncated_while_read_is_a_clear_error(tmp_path: Path) -> None:
    """The input shrinks while it is read: no SIGBUS, a CheckpointError, no .partial. In a child
    process: a SIGBUS there must not take the test runner down."""
    src = tmp_path / "in"
    src.mkdir()
    save_file({f"l{i}.weight": torch.randn(256, 512) for i in range(4)}, str(src / "model.safetensors"))
    code = textwrap.dedent(f"""
        import os, monoquant
        src, out = {str(src)!r}, {str(tmp_path / "out")!r}
        def cut(ev):
            if ev.kind == "tensor":
                os.truncate(os.path.join(src, "model.safetensors"), 4096)
        try:
            monoquant.stream(
                src, out, "int8", backend="mmap", overlap=False, block_bytes=65536, on_progress=cut
            )
            print("no error")
        except monoquant.CheckpointError as e:
            print("error:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.startswith("error: ") and "shrank" in r.stdout and "model.safetensors" in r.stdout, (
        r.stdout
    )
    assert not list((tmp_path / "out").glob("*.partial"))


@pytest.mark.parametrize("delay", [0.4, 1.0])
def test_ctrl_c_during_startup_is_one_line(tmp_path: Path, delay: float) -> None:
    src = write_sharded(tmp_path / "in", small(), shards=1)
    p = popen_cli("stream", src, tmp_path / "out", "--int8")
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the run finished before the signal")
    assert p.returncode == 130, (p.returncode, err)
    assert err.strip().splitlines() == ["monoquant: interrupted; rerun the same command to resume"], err


@pytest.mark.parametrize("command", ["stream", "verify", "inspect"])
def test_ctrl_c_inside_the_torch_import_is_one_line(tmp_path: Path, command: str) -> None:
    """A Ctrl-C that lands while torch is being imported (inside numpy's C initialisation it
    used to come out as an ImportError and a traceback, exit code 1) is held until the import
    is done, then ends the command with its one line and exit code 130. The signal is sent from
    an import hook inside numpy's C initialisation (torch imports numpy when it is installed;
    without it, as torch starts importing its storage module)."""
    src = write_sharded(tmp_path / "in", small(), shards=1)
    # imported by numpy._core._multiarray_umath's initialisation, in C
    target = "numpy._core._exceptions" if importlib.util.find_spec("numpy") else "torch.storage"
    args = {
        "stream": ["stream", str(src), str(tmp_path / "out"), "--int8"],
        "verify": ["verify", str(src)],
        "inspect": ["inspect", str(src)],
    }[command]
    code = textwrap.dedent(f"""
        import importlib.abc, os, signal, sys

        class Hook(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == {target!r}:
                    sys.meta_path.remove(self)
                    os.kill(os.getpid(), signal.SIGINT)
                    print("sent", file=sys.stderr)
                return None

        sys.meta_path.insert(0, Hook())
        sys.argv = ["monoquant", *{args!r}]
        from monoquant.cli import entry
        entry()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == [
        "sent",
        "monoquant: interrupted; rerun the same command to resume",
    ], r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"jobs": 0}, "jobs=0"),
        ({"threads": 0}, "threads=0"),
        ({"max_shard_size": 0}, "positive"),
        ({"max_shard_size": "1e400"}, "1e400"),
        ({"block_bytes": 0}, "block_bytes=0"),
        ({"jobs": 1.5}, "jobs=1.5"),
    ],
)
def test_api_rejects_bad_counts(tmp_path: Path, kw: dict, match: str) -> None:
    src = write_sharded(tmp_path / "in", small(), shards=1)
    with pytest.raises(MonoquantError, match=match):
        monoquant.stream(src, tmp_path / "out", "int8", **kw)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("sd", "match"),
    [
        ({"a": 3}, "not a tensor"),
        ({1: torch.ones(2, 2)}, "must be str"),
        ({"a.weight": torch.empty(4, 8, device="meta")}, "meta device"),
        ({"a.weight": torch.ones(4, 8).to_sparse()}, "sparse"),
        ([torch.ones(2)], "mapping"),
    ],
)
def test_quantize_rejects_bad_state_dicts(sd: object, match: str) -> None:
    with pytest.raises(monoquant.TensorValueError, match=match):
        monoquant.quantize(sd, "int8")  # type: ignore[arg-type]


def test_quantize_fp16_of_an_empty_tensor() -> None:
    out = monoquant.quantize({"e": torch.empty(0, 3)}, "fp16")
    assert out["e"].shape == (0, 3) and out["e"].dtype == torch.float16


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--int8", "--int4"], "--int8 and --int4 conflict"),
        (["--scheme", "int4", "--fp8"], "conflict"),
        (["--fp16", "--target-bpw", "5"], "--target-bpw"),
        (["--bf16", "--min-sqnr", "30"], "--min-sqnr"),
    ],
)
def test_conflicting_scheme_options_are_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    src = write_sharded(tmp_path / "in", small(), shards=1)
    r = CliRunner().invoke(main, ["stream", str(src), str(tmp_path / "out"), *args])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_mixed_headline_says_what_was_written(tmp_path: Path) -> None:
    src = write_sharded(tmp_path / "in", small(), shards=1)
    r = CliRunner().invoke(main, ["stream", str(src), str(tmp_path / "out"), "--int4", "--min-sqnr", "30"])
    assert r.exit_code == 0, r.output
    head = next(ln for ln in r.output.splitlines() if ln.startswith("monoquant: complete"))
    assert "(mixed precision: int8 x7; int4-g128 requested)" in head, head


class Custom:
    """Pickled by reference: a weights-only load refuses it."""


def test_rejected_pickle_message_is_complete(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    torch.save({"w": torch.zeros(2, 2), "c": Custom()}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(src)
    msg = str(e.value)
    assert "\n" not in msg and "Custom" in msg and "arbitrary code" in msg and msg.endswith("environment")


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "OUT", "--against", "IN", "--min-sqnr", "nan"],
        ["stream", "IN", "OUT", "--int4", "--min-sqnr", "nan"],
        ["stream", "IN", "OUT", "--int4", "--target-bpw", "inf"],
    ],
)
def test_non_finite_thresholds_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    src = write_sharded(tmp_path / "in", small(), shards=1)
    argv = [str(src) if a == "IN" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 2 and "not a finite number" in r.output, r.output
    with pytest.raises(MonoquantError, match="finite"):
        monoquant.plan(src, "int4", min_sqnr=float("nan"))


def test_inspect_refuses_an_index_entry_outside(tmp_path: Path) -> None:
    """``inspect`` used to read the outside header and die with KeyError; now one line."""
    from tests.cli_helpers import assert_one_error_line, run_cli

    src = write_sharded(tmp_path / "in", small(), shards=2)
    ip = src / "model.safetensors.index.json"
    index = json.loads(ip.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "secret").mkdir()
    (src / first).rename(tmp_path / "secret" / first)
    index["weight_map"] = {k: (f"../secret/{v}" if v == first else v) for k, v in index["weight_map"].items()}
    ip.write_text(json.dumps(index))
    assert_one_error_line(run_cli("inspect", src), f"../secret/{first}", "outside")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"group_size": "abc"}, "group size"),
        ({"group_size": 63.5}, "group size"),
        ({"include": 5}, "glob"),
        ({"exclude": [None]}, "glob"),
        ({"target_bpw": "5"}, "must be a number"),
        ({"min_sqnr": "x"}, "must be a number"),
    ],
)
def test_api_rejects_bad_option_types(tmp_path: Path, kw: dict, match: str) -> None:
    src = write_sharded(tmp_path / "in", small(), shards=1)
    with pytest.raises(MonoquantError, match=match):
        monoquant.stream(src, tmp_path / "out", "int4", **kw)
