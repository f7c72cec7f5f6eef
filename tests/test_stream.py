"""monoquant.stream / iter_quantized / plan / load on every input kind."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import monoquant
from monoquant import CheckpointError, OutputError
from monoquant.jobs import POOL_OVERLAP
from monoquant.outdir import CONFIG_KEYS
from monoquant.plan import INDEX_NAME
from tests.helpers import read_dir_bytes, tiny_llama_sd, write_sharded


@pytest.fixture(scope="module")
def sd():
    return tiny_llama_sd()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, sd):
    return write_sharded(tmp_path_factory.mktemp("ckpt") / "in", sd, shards=3)


def check_output(out, sd, scheme="int8", **opts):
    """Every shard loads, every input tensor is accounted for, bytes equal the in-memory API."""
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] > 0
    stored = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(out / fname), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for k in f.keys():  # noqa: SIM118
                assert index["weight_map"][k] == fname
                stored[k] = f.get_tensor(k)
    assert set(stored) == set(index["weight_map"])
    expected = monoquant.quantize(sd, scheme, **opts)
    assert set(expected) == set(stored)
    for k, v in expected.items():
        assert stored[k].dtype == v.dtype and stored[k].shape == v.shape, k
        assert torch.equal(
            stored[k].reshape(-1).view(torch.uint8), v.contiguous().reshape(-1).view(torch.uint8)
        ), k
    dense = monoquant.load(out)
    assert set(dense) == set(sd)
    return index


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8", "w8a8", "fp16", "int4-g64-asym", "int8-tensor"])
def test_stream_equals_in_memory_quantize(tmp_path, ckpt, sd, scheme):
    report = monoquant.stream(ckpt, tmp_path / "out", scheme, max_shard_size="400KB")
    assert report.complete and report.shards_written == report.plan["shards"] > 1
    check_output(tmp_path / "out", sd, scheme)
    # no state left behind; side files copied
    assert not (tmp_path / "out" / ".monoquant").exists()
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"fake": true}'


@pytest.mark.parametrize("kind", ["single", "noindex", "bin", "bin-sharded"])
def test_input_kinds(tmp_path, sd, kind):
    src = tmp_path / "in"
    if kind == "single":
        src.mkdir()
        save_file(sd, str(src / "model.safetensors"))
        src = src / "model.safetensors"
    elif kind == "noindex":
        write_sharded(src, sd, shards=2, index=False)
    elif kind == "bin":
        write_sharded(src, sd, shards=1, index=False, fmt="bin")
    else:
        write_sharded(src, sd, shards=3, fmt="bin")
    report = monoquant.stream(src, tmp_path / "out", "int4")
    assert report.complete
    check_output(tmp_path / "out", sd, "int4")


def test_quantization_config_in_config_json(tmp_path, ckpt, sd):
    monoquant.stream(ckpt, tmp_path / "out", "int4")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["format"] == "pack-quantized"
    assert group["weights"]["num_bits"] == 4 and group["weights"]["group_size"] == 128
    assert group["targets"] == ["Linear"]  # the class, as compressed-tensors writes it
    assert set(qc) <= set(CONFIG_KEYS) and "producer" not in qc  # vLLM parses this block
    quantized = {n[: -len(".weight")] for n in monoquant.quantize(sd, "int4").schemes}
    modules = {n.rsplit(".", 1)[0] for n in sd}
    # every dense 2-D weight is ignored explicitly (the class target would claim it)
    dense2d = {n[: -len(".weight")] for n, t in sd.items() if t.dim() == 2} - quantized
    ignored = {
        m for m in modules if any(re.match(t[len("re:") :], m) for t in qc["ignore"] if t.startswith("re:"))
    }
    assert ignored == dense2d and "lm_head" in ignored
    # tolerant of the base-model prefix transformers adds or strips (BertModel -> task class,
    # LlamaForCausalLM -> LlamaModel), and still matching nothing else
    (head,) = [t for t in qc["ignore"] if "lm_head" in t]
    for name in ("lm_head", "model.lm_head"):
        assert re.match(head[len("re:") :], name)
    assert not re.match(head[len("re:") :], "lm_head_2")


def test_two_runs_and_options_that_must_not_matter_give_identical_bytes(tmp_path, ckpt):
    monoquant.stream(ckpt, tmp_path / "a", "int4", max_shard_size="400KB")
    monoquant.stream(ckpt, tmp_path / "b", "int4", max_shard_size="400KB")
    monoquant.stream(ckpt, tmp_path / "c", "int4", max_shard_size="400KB", backend="pread", block_bytes=5000)
    monoquant.stream(
        ckpt, tmp_path / "d", "int4", max_shard_size="400KB", jobs=3, threads=2, stats="off", overlap=True
    )
    monoquant.stream(ckpt, tmp_path / "e", "int4", max_shard_size="400KB", overlap=False, block_bytes=1 << 20)
    a = read_dir_bytes(tmp_path / "a")
    for other in "bcde":
        assert read_dir_bytes(tmp_path / other) == a, other


def test_iter_quantized_yields_the_stream_output_in_plan_order(tmp_path, ckpt, sd):
    monoquant.stream(ckpt, tmp_path / "out", "int4")
    stored = monoquant.load(tmp_path / "out", dequantize=False)
    names = []
    for name, t in monoquant.iter_quantized(ckpt, "int4"):
        names.append(name)
        assert torch.equal(t.reshape(-1).view(torch.uint8), stored[name].reshape(-1).view(torch.uint8))
    assert sorted(names) == sorted(stored)
    p = monoquant.plan(ckpt, "int4")
    assert names == [o.name for t in p.tensors for o in t.outputs]


def test_dry_run_plan_writes_nothing_and_predicts_sizes(tmp_path, ckpt):
    p = monoquant.plan(ckpt, "int8", max_shard_size="400KB")
    assert not (tmp_path / "out").exists()
    monoquant.stream(ckpt, tmp_path / "out", "int8", max_shard_size="400KB")
    for s in p.shards:
        assert (tmp_path / "out" / s.filename).stat().st_size == s.file_size
    assert (
        p.totals()["bytes_out"]
        == json.loads((tmp_path / "out" / INDEX_NAME).read_text())["metadata"]["total_size"]
    )


def test_load_lazy_and_raw(tmp_path, ckpt, sd):
    monoquant.stream(ckpt, tmp_path / "out", "int8")
    lazy = monoquant.load(tmp_path / "out", lazy=True)
    assert set(lazy) == set(sd)
    w = lazy["model.layers.0.mlp.up_proj.weight"]
    assert w.shape == sd["model.layers.0.mlp.up_proj.weight"].shape and w.dtype == torch.bfloat16
    raw = monoquant.load(tmp_path / "out", dequantize=False)
    assert "model.layers.0.mlp.up_proj.weight_packed" in raw


def test_report_and_progress(tmp_path, ckpt):
    events = []
    r = monoquant.stream(ckpt, tmp_path / "out", "int4", max_shard_size="400KB", on_progress=events.append)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "finalized" in kinds
    assert kinds.count("shard_done") == r.plan["shards"]
    assert events[-2].kind == "finalized"
    tensor_events = [e for e in events if e.kind == "tensor"]
    assert tensor_events[-1].bytes_done == tensor_events[-1].bytes_total == r.bytes_in
    assert r.memory["peak_anon"] > 0 and r.memory["peak_rss"] > 0
    assert len(r.stats) == r.plan["quantized"] and 15 < r.mean_sqnr() < 25


def test_rerun_is_a_noop_and_other_options_are_refused(tmp_path, ckpt):
    out = tmp_path / "out"
    monoquant.stream(ckpt, out, "int8")
    before = read_dir_bytes(out)
    r = monoquant.stream(ckpt, out, "int8")
    assert r.complete and r.shards_written == 0
    assert read_dir_bytes(out) == before
    with pytest.raises(OutputError, match="another job"):
        monoquant.stream(ckpt, out, "int4")
    assert read_dir_bytes(out) == before
    r = monoquant.stream(ckpt, out, "int4", restart=True)
    assert r.complete
    check_output(out, tiny_llama_sd(), "int4")


@pytest.mark.parametrize("where", ["same", "inside", "contains", "file-dir"])
def test_output_overlapping_input_is_refused(tmp_path, ckpt, where):
    src = write_sharded(tmp_path / "m", tiny_llama_sd(layers=1), shards=1)
    dst = {"same": src, "inside": src / "q", "contains": tmp_path, "file-dir": src}[where]
    if where == "file-dir":
        src = src / "model-00001-of-00001.safetensors"
        before = read_dir_bytes(src.parent)
    else:
        before = read_dir_bytes(src)
    with pytest.raises(OutputError):
        monoquant.stream(src, dst, "int8")
    assert read_dir_bytes(src if src.is_dir() else src.parent) == before


def test_single_file_input_may_write_to_a_sibling_directory(tmp_path):
    src = (
        write_sharded(tmp_path / "m", tiny_llama_sd(layers=1), shards=1) / "model-00001-of-00001.safetensors"
    )
    assert monoquant.stream(src, src.parent.parent / "sibling", "int8").complete


def test_nonempty_foreign_output_is_refused(tmp_path, ckpt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        monoquant.stream(ckpt, out, "int8")
    assert (out / "notes.txt").read_text() == "mine"


def test_index_cross_checks(tmp_path, sd):
    src = write_sharded(tmp_path / "in", sd, shards=3)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    # a tensor listed in a shard that does not hold it
    bad = dict(index)
    bad["weight_map"] = dict(index["weight_map"], **{"model.norm.weight": "model-00001-of-00003.safetensors"})
    (src / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="does not hold it"):
        monoquant.plan(src)
    # a shard missing
    bad["weight_map"] = dict(index["weight_map"], **{"model.norm.weight": "model-00009-of-00009.safetensors"})
    (src / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="missing"):
        monoquant.plan(src)
    # a tensor in two shards
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    shard1 = src / "model-00001-of-00003.safetensors"
    from safetensors.torch import load_file

    extra = load_file(str(shard1))
    extra["model.norm.weight"] = sd["model.norm.weight"]
    save_file(extra, str(shard1))
    with pytest.raises(CheckpointError, match="two shards"):
        monoquant.plan(src)


def test_an_already_quantized_checkpoint_is_refused(tmp_path, ckpt):
    out = tmp_path / "out"
    monoquant.stream(ckpt, out, "int8")
    with pytest.raises(CheckpointError, match="already quantized"):
        monoquant.stream(out, tmp_path / "again", "int4")


def test_stats_modes(tmp_path, sd):
    src = write_sharded(
        tmp_path / "in",
        {"big.weight": torch.randn(4096, 512, generator=torch.Generator().manual_seed(3)).bfloat16()},
        shards=1,
    )
    name = "big.weight"
    exact = monoquant.stream(src, tmp_path / "e", "int4", stats="exact", block_bytes=64 << 10).stats[name]
    sample = monoquant.stream(src, tmp_path / "s", "int4", stats="sample", block_bytes=64 << 10).stats[name]
    assert exact.numel == 4096 * 512
    assert 0 < sample.numel < exact.numel / 4  # every 8th block measured
    assert sample.sqnr_db == pytest.approx(exact.sqnr_db, abs=0.3)
    assert monoquant.stream(src, tmp_path / "o", "int4", stats="off").stats == {}
    assert read_dir_bytes(tmp_path / "e") == read_dir_bytes(tmp_path / "s") == read_dir_bytes(tmp_path / "o")
    with pytest.raises(monoquant.MonoquantError, match="stats="):
        monoquant.stream(src, tmp_path / "x", "int4", stats="sometimes")


@pytest.mark.parametrize("scheme", ["int8", "int4-asym", "fp8", "nvfp4", "fp16"])
def test_kernel_helper_thread_gives_the_same_bytes_and_statistics(tmp_path, scheme):
    """With ``overlap`` on, every other block of a quantized tensor is computed on a helper
    thread: the bytes are those of the one-thread run, and the exact statistics the same figures
    (summed in another order), counts included."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1000, 256, generator=g) * 0.02
    w[::7, 3] = 1e-9  # flushed by casts, counted in underflow
    src = write_sharded(tmp_path / "in", {"a.weight": w.bfloat16(), "b.weight": w[:333].bfloat16()}, shards=1)
    kw = {"block_bytes": 16 << 10, "stats": "exact"}
    on = monoquant.stream(src, tmp_path / "on", scheme, overlap=True, **kw)
    off = monoquant.stream(src, tmp_path / "off", scheme, overlap=False, **kw)
    assert on.settings["overlap"] is True and off.settings["overlap"] is False
    assert read_dir_bytes(tmp_path / "on") == read_dir_bytes(tmp_path / "off")
    for name, st in off.stats.items():
        got = on.stats[name]
        assert (got.numel, got.max_abs_err, got.underflow, got.overflow) == (
            st.numel,
            st.max_abs_err,
            st.underflow,
            st.overflow,
        )
        assert (got.sum_sq, got.err_sq) == pytest.approx((st.sum_sq, st.err_sq), rel=1e-9)


def _layers(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Small tensors of one to three blocks, with 1-D norms (kept) between them, as a model's
    layers are laid out."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i in range(n):
        sd[f"layers.{i}.input_layernorm.weight"] = torch.ones(64).bfloat16()
        sd[f"layers.{i}.mlp.weight"] = (torch.randn(96 + 32 * (i % 3), 64, generator=g) * 0.02).bfloat16()
        sd[f"layers.{i}.attn.weight"] = (torch.randn(40, 64, generator=g) * 0.02).bfloat16()
    return sd


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_consecutive_small_tensors_share_the_kernel_threads_with_the_bytes_and_order_of_one(tmp_path, scheme):
    """With overlap on, the next tensor's blocks start while the previous tensor's last ones are
    computed: the bytes are those of the one-thread run, the statistics the same figures, and
    the tensors are reported finished in the same order."""
    src = write_sharded(tmp_path / "in", _layers(12, 5), shards=2)
    kw = {"block_bytes": 8 << 10, "stats": "exact"}
    seen: dict[str, list[str]] = {"on": [], "off": []}
    reports = {}
    for mode, overlap in (("on", True), ("off", False)):
        reports[mode] = monoquant.stream(
            src,
            tmp_path / mode,
            scheme,
            overlap=overlap,
            on_progress=lambda ev, m=mode: seen[m].append(ev.name) if ev.kind == "tensor" else None,
            **kw,
        )
    assert read_dir_bytes(tmp_path / "on") == read_dir_bytes(tmp_path / "off")
    assert seen["on"] == seen["off"] and len(seen["on"]) == 36
    assert list(reports["on"].stats) == list(reports["off"].stats)
    for name, st in reports["off"].stats.items():
        got = reports["on"].stats[name]
        assert (got.numel, got.max_abs_err) == (st.numel, st.max_abs_err)
        assert (got.sum_sq, got.err_sq) == pytest.approx((st.sum_sq, st.err_sq), rel=1e-9)


def _fails_cleanly(src, dst, match):
    """Stream ``src`` with overlap on, expecting the one-line error ``match``: every workspace
    of the job's pool went back, and no shard or partial file is left in ``dst``."""
    from monoquant.overlap import WorkspacePool

    sizes = []
    real = WorkspacePool.__init__

    def spy(self, size=2):
        real(self, size)
        sizes.append((self, size))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WorkspacePool, "__init__", spy)
        with pytest.raises(monoquant.MonoquantError, match=match):
            monoquant.stream(src, dst, "int8", overlap=True, block_bytes=8 << 10)
    pool, size = sizes[-1]
    assert size == POOL_OVERLAP and pool._free.qsize() == size  # every workspace went back
    assert not [p for p in dst.iterdir() if p.suffix in (".safetensors", ".partial")]


def test_a_kernel_helper_that_cannot_start_fails_the_run_cleanly(tmp_path, monkeypatch):
    """No thread for the helper ("can't start new thread"): the run fails with that error instead
    of waiting for a block nobody computes, and leaves no shard or partial file."""
    import threading

    from monoquant.overlap import KernelHelper

    real = KernelHelper.__init__

    def no_thread(self):
        real(self)

        def submit(*a, **k):
            raise RuntimeError("can't start new thread")

        self._executor.submit = submit

    monkeypatch.setattr(KernelHelper, "__init__", no_thread)
    src = write_sharded(tmp_path / "in", _layers(3, 7), shards=1)
    box: dict[str, BaseException | None] = {"e": None}

    def run():
        try:
            monoquant.stream(src, tmp_path / "o", "int8", overlap=True, block_bytes=8 << 10)
        except BaseException as e:  # collected for the test
            box["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the run hung"
    assert isinstance(box["e"], RuntimeError) and "new thread" in str(box["e"])
    assert not [p for p in (tmp_path / "o").iterdir() if p.suffix in (".safetensors", ".partial")]


@pytest.mark.parametrize("bad", ["layers.4.mlp.weight", "layers.11.attn.weight"])
def test_a_nan_in_one_of_consecutive_tensors_names_that_tensor(tmp_path, bad):
    sd = _layers(12, 6)
    sd[bad][5, 7] = float("nan")
    src = write_sharded(tmp_path / "in", sd, shards=1)
    _fails_cleanly(src, tmp_path / "o", re.escape(bad) + r".*1 NaN")


@pytest.mark.parametrize("bad_block", [0, 1, 6])
def test_a_failure_on_either_thread_is_reported_and_nothing_is_left(tmp_path, bad_block):
    """NaN in a block the helper computes (even) or this thread computes (odd), or the last one:
    the same one-line error as without the helper, and no shard or partial file is left."""
    w = torch.randn(448, 64, generator=torch.Generator().manual_seed(1))
    rows_per_block = (8 << 10) // (64 * 2)
    w[bad_block * rows_per_block + 3, 5] = float("nan")
    src = write_sharded(tmp_path / "in", {"l.weight": w.bfloat16()}, shards=1)
    _fails_cleanly(src, tmp_path / "o", r"l\.weight.*NaN")


def test_a_write_failure_with_the_helper_returns_every_workspace(tmp_path):
    """The writer thread fails (disk full) while both kernel threads have blocks: the error
    reaches the caller and every workspace is back in the pool (a refused block's too)."""
    import errno

    from monoquant.overlap import WorkspacePool
    from monoquant.writer import ShardWriter

    g = torch.Generator().manual_seed(2)
    sd = {
        "a.weight": torch.randn(512, 64, generator=g).bfloat16(),
        "b.weight": torch.randn(512, 64, generator=g).bfloat16(),
    }
    src = write_sharded(tmp_path / "in", sd, shards=1)
    pools = []
    real_init, real_write = WorkspacePool.__init__, ShardWriter.write

    def spy(self, size=2):
        real_init(self, size)
        pools.append((self, size))

    def full(self, out, off, t):
        if out.name.startswith("b.") and off > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, out, off, t)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(WorkspacePool, "__init__", spy)
        mp.setattr(ShardWriter, "write", full)
        with pytest.raises((monoquant.MonoquantError, OSError)):
            monoquant.stream(src, tmp_path / "o", "int8", overlap=True, block_bytes=4 << 10)
    pool, size = pools[-1]
    assert size == POOL_OVERLAP and pool._free.qsize() == size


def _lane_spy(mp):
    """Record the tensors each copy lane is given."""
    from monoquant.copylane import CopyLane

    seen: list[list[str]] = []
    real = CopyLane.__init__

    def spy(self, tensors, write, **kw):
        seen.append([pt.ref.name for pt in tensors])
        real(self, tensors, write, **kw)

    mp.setattr(CopyLane, "__init__", spy)
    return seen


def _lanes_alive() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name == "monoquant-copy"]


def test_kept_tensors_on_the_copy_lane_give_the_same_bytes_and_digests(tmp_path):
    """With overlap on, large kept tensors (embeddings, lm_head) are written by a copy lane
    while the kernels quantize the rest: the same files, the same journal digests and byte
    counts as the one-thread run."""
    from monoquant.journal import JobState

    src = write_sharded(tmp_path / "in", tiny_llama_sd(), shards=2)
    records: list[tuple[str, int, str]] = []
    real_record = JobState.record

    def record(self, name, size, digest):
        records.append((name, size, digest))
        real_record(self, name, size, digest)

    kw = {"block_bytes": 16 << 10}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(JobState, "record", record)
        seen = _lane_spy(mp)
        on = monoquant.stream(src, tmp_path / "on", "int8", overlap=True, **kw)
        lanes_on = list(seen)
        off = monoquant.stream(src, tmp_path / "off", "int8", overlap=False, **kw)
    assert sorted(n for names in lanes_on for n in names) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert len(seen) == len(lanes_on)  # overlap off: no lane
    assert read_dir_bytes(tmp_path / "on") == read_dir_bytes(tmp_path / "off")
    half = len(records) // 2
    assert records[:half] == records[half:] and len(records) == 2 * half > 0
    assert (on.bytes_in, on.bytes_out, sorted(on.stats)) == (off.bytes_in, off.bytes_out, sorted(off.stats))
    assert not _lanes_alive()


def test_a_write_failure_on_the_copy_lane_stops_the_kernels_at_once(tmp_path):
    """Disk full while the lane writes: the one-line error (naming the tensor) reaches the caller
    within a few blocks of the kernels (not at the end of the shard), no shard or partial file is
    left, and the lane's thread is gone."""
    import errno
    import threading

    from monoquant.formats.integer import IntKernel
    from monoquant.writer import ShardWriter

    src = write_sharded(tmp_path / "in", tiny_llama_sd(layers=4), shards=1)
    real_pwrite, real_q = ShardWriter._pwrite, IntKernel.quantize_block
    failed = threading.Event()
    after = []

    def full(self, data, pos):
        if threading.current_thread().name == "monoquant-copy":
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(self, data, pos)

    def count(self, *a, **kw):
        if failed.is_set():
            after.append(1)
        return real_q(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        seen = _lane_spy(mp)
        mp.setattr(ShardWriter, "_pwrite", full)
        mp.setattr(IntKernel, "quantize_block", count)
        with pytest.raises(
            monoquant.MonoquantError, match=r"disk full while writing (lm_head|model\.embed_tokens)\.weight"
        ):
            monoquant.stream(src, tmp_path / "o", "int8", overlap=True, block_bytes=16 << 10)
    assert seen and failed.is_set()
    assert len(after) <= 8  # the shard has hundreds of blocks; the loop stopped at its next ones
    assert not [p for p in (tmp_path / "o").iterdir() if p.suffix in (".safetensors", ".partial")]
    assert not _lanes_alive()


def test_a_kernel_failure_stops_the_copy_lane(tmp_path):
    """NaN in a weight the kernels quantize while the lane is still writing: the usual one-line
    error, the lane stops after the block it is on (it does not write the rest of its tensors
    into a file being removed) and is waited for, and nothing of the shard is left."""
    import threading
    import time

    from monoquant.copylane import CopyLane
    from monoquant.writer import ShardWriter

    sd = tiny_llama_sd()
    sd["model.layers.0.mlp.up_proj.weight"][7, 3] = float("nan")
    src = write_sharded(tmp_path / "in", sd, shards=1)
    real_pwrite, real_stop = ShardWriter._pwrite, CopyLane.stop
    go = threading.Event()
    lane_writes = []

    real_abort = ShardWriter.abort
    alive_at_abort = []

    def held(self, data, pos):
        if threading.current_thread().name == "monoquant-copy":
            assert go.wait(10), "the lane was never told to stop"
            time.sleep(0.2)  # a slow disk: the write is still going when the lane is told to stop
            lane_writes.append(pos)
        return real_pwrite(self, data, pos)

    def stop(self):
        go.set()  # the kernels failed: let the lane's held write go, then stop it
        real_stop(self)

    def abort(self):
        alive_at_abort.extend(_lanes_alive())  # the file must not be closed under the lane
        real_abort(self)

    with pytest.MonkeyPatch.context() as mp:
        seen = _lane_spy(mp)
        mp.setattr(ShardWriter, "_pwrite", held)
        mp.setattr(ShardWriter, "abort", abort)
        mp.setattr(CopyLane, "stop", stop)
        with pytest.raises(monoquant.MonoquantError, match=r"up_proj\.weight.*NaN"):
            monoquant.stream(src, tmp_path / "o", "int8", overlap=True, block_bytes=16 << 10)
    assert seen and go.is_set()
    assert len(lane_writes) == 1 and not alive_at_abort  # the block it was on (of 64), then joined
    assert not [p for p in (tmp_path / "o").iterdir() if p.suffix in (".safetensors", ".partial")]
    assert not _lanes_alive()
