"""Read-ahead of the input (monoquant.prefetch): bounded by its budget, really reading ahead, safe
to stop at any moment, and invisible in the output bytes."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
import torch

import monoquant
import monoquant.jobs
from monoquant.prefetch import ReadAhead, mapping_address
from monoquant.reader import RowReader, open_checkpoint
from tests.helpers import read_dir_bytes, tiny_llama_sd, write_sharded

MiB = 1 << 20


@pytest.fixture(scope="module")
def one_tensor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB bf16 tensor [8192, 4096] in one safetensors file."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("ra")
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(8192, 4096, generator=g).to(torch.bfloat16)}, str(d / "m.safetensors"))
    return d / "m.safetensors"


def mapped_rss(addr: int) -> int:
    """Resident bytes of the mapping that starts at ``addr`` (from /proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{addr:x}-"):
            for more in lines[i + 1 :]:
                if more.startswith("Rss:"):
                    return int(more.split()[1]) * 1024
    raise AssertionError(f"no mapping at {addr:x}")


def test_window_never_exceeds_the_budget(one_tensor: Path) -> None:
    size = one_tensor.stat().st_size
    fd = os.open(one_tensor, os.O_RDONLY)
    ra = ReadAhead(budget=8 * MiB, step=3 * MiB, method="willneed")
    try:
        ra.attach(fd, size)
        seen = []
        for pos in range(0, size, 4 * MiB):
            ra.consumed(pos)
            assert ra.wait_idle()
            seen.append(ra.ahead())
            assert ra.ahead() <= 8 * MiB
        assert ra.max_ahead <= 8 * MiB
        # it did read ahead: the full budget while the file lasted, and up to the end of the file
        assert max(seen) == 8 * MiB and ra.requests >= size // (3 * MiB)
        ra.consumed(size - MiB)
        assert ra.wait_idle() and ra.ahead() == MiB  # never beyond the end of the file
    finally:
        ra.close()
        os.close(fd)
    assert not [t for t in threading.enumerate() if t.name == "monoquant-readahead"]


def test_mapped_pages_stay_within_budget_plus_the_block_in_use(one_tensor: Path) -> None:
    """The mmap reader with read-ahead: at every block, what this process has mapped of the input
    is at most the block being used plus the budget (the reader releases consumed blocks), and
    the pages ahead are really there before the reader touches them."""
    budget, block_rows = 8 * MiB, 512  # 512 rows x 4096 x 2 bytes = 4 MiB blocks
    ckpt = open_checkpoint(one_tensor)
    ref = ckpt.tensors[0]
    row_bytes = ref.nbytes // ref.shape[0]
    populated = []
    with RowReader("mmap", readahead=budget) as rd:
        assert rd._ahead is not None
        rd._ahead.method = "populate"
        for a in range(0, ref.shape[0], block_rows):
            b = min(a + block_rows, ref.shape[0])
            x = rd.rows(ref, a, b)
            assert rd._ahead.wait_idle()
            rss = mapped_rss(mapping_address(rd._mm))
            # + one large folio: the kernel maps a file folio (up to 2 MiB on ext4/xfs) whole
            assert rss <= budget + (b - a) * row_bytes + 2 * MiB + 2 * 4096, (a, rss)
            populated.append(rss)
            float(x[0, 0])  # the block is used, then released as the pipeline does
            del x
            rd.release(ref, a * row_bytes, b * row_bytes)
    # MADV_POPULATE_READ exists on Linux >= 5.14; where it does, the window was mapped ahead
    if tuple(int(v) for v in re.findall(r"\d+", os.uname().release)[:2]) >= (5, 14):
        assert max(populated) >= budget, populated


def test_reader_closes_cleanly_while_a_request_is_in_flight(one_tensor: Path) -> None:
    """Closing the reader (unmapping, closing the fd) waits for the request in flight: no crash,
    no thread left behind, whatever the moment."""
    ckpt = open_checkpoint(one_tensor)
    ref = ckpt.tensors[0]
    for k in range(20):
        fd = os.open(one_tensor, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: requests take a while
        os.close(fd)
        with RowReader("mmap", readahead=64 * MiB) as rd:
            rd.rows(ref, 0, 1 + k)
    assert not [t for t in threading.enumerate() if t.name == "monoquant-readahead"]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        ReadAhead(budget=-1)
    with pytest.raises(ValueError):
        ReadAhead(step=0)
    with pytest.raises(ValueError):
        ReadAhead(method="fast")


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_output_is_the_same_with_and_without_read_ahead(tmp_path: Path, monkeypatch, backend: str) -> None:
    src = write_sharded(tmp_path / "in", tiny_llama_sd(layers=2, hidden=256, inter=512, vocab=2000), shards=3)
    outs = {}
    for ra in (0, 1 * MiB):
        monkeypatch.setattr(monoquant.jobs, "READAHEAD_BYTES", ra)
        out = tmp_path / f"out{ra}"
        rep = monoquant.stream(
            src, out, "int4", backend=backend, block_bytes=64 * 1024, max_shard_size="400KB"
        )
        assert rep.complete
        outs[ra] = read_dir_bytes(out)
    assert outs[0] == outs[1 * MiB]
