"""Bounded memory, proven under a hard cap: a checkpoint whose largest tensor is bigger than the
cap quantizes in a memory cgroup smaller than that tensor (page cache charged to the cgroup)."""

import json
import os
import sys

import pytest

from tests.cgroup import run_capped, why_unavailable
from tests.helpers import write_streamed_checkpoint

REASON = why_unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"no memory cgroup: {REASON}")]

CAP = 384 * 1024 * 1024  # importing torch alone takes ~220 MiB


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big") / "in"
    root.mkdir()
    tensors = [
        ("model.embed_tokens.weight", (65536, 2048)),  # 256 MiB, copied
        ("model.layers.0.mlp.up_proj.weight", (151552, 2048)),  # 592 MiB bf16: bigger than the cap
        ("model.layers.0.mlp.down_proj.weight", (2048, 8192)),
        ("model.layers.0.self_attn.q_proj.weight", (2048, 2048)),
        ("model.norm.weight", (2048,)),
    ]
    size = write_streamed_checkpoint(root / "model.safetensors", tensors)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert size > 850 * 1024 * 1024  # ~0.9 GiB
    return root


def evict(root):
    """Drop the input from the page cache so the capped run's reads are charged to its cgroup."""
    for p in root.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("scheme", ["--int8", "--int4", "--nvfp4"])
def test_quantizes_under_a_cap_smaller_than_the_largest_tensor(big, tmp_path, scheme):
    out = tmp_path / "out"
    evict(big)
    cmd = [
        sys.executable,
        "-m",
        "monoquant",
        "stream",
        str(big),
        str(out),
        scheme,
        "--json",
        "--max-shard-size",
        "200MB",
        "--overlap",
        "on",  # the most memory: writer thread, kernel helper thread and its scratch, four workspaces
    ]
    run = run_capped(cmd, CAP)
    assert run.returncode == 0 and not run.oom_killed, run.stderr[-2000:]
    assert run.peak <= CAP
    report = json.loads(run.stdout)
    assert report["complete"]
    # the run reports its own peak (anonymous memory far below the largest tensor)
    assert report["memory"]["peak_anon"] < 300 * 1024 * 1024
    assert report["memory"]["cgroup_peak"] is not None and report["memory"]["cgroup_peak"] <= CAP
    # the result is right: every tensor present and the big one quantized with the expected error
    stats = report["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert stats["sqnr_db"] > (38 if scheme == "--int8" else 17)  # nvfp4 on normal weights: ~20 dB
    verify = run_capped(
        [sys.executable, "-m", "monoquant", "verify", str(out), "--against", str(big), "--json"], CAP
    )
    assert verify.returncode == 0, verify.stderr[-2000:]
    v = json.loads(verify.stdout)
    assert v["ok"] and v["compared"] == 5
