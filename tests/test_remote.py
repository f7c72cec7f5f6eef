"""Reading checkpoints straight from object storage (docs/remote.md), against a real S3 protocol
server started here on 127.0.0.1 (moto's server mode, with signature and IAM checks on; see
``tests/s3server.py``). No network beyond the loopback interface.

* Byte identity: a sharded checkpoint with index, a single file and a directory without index,
  read from ``s3://``, give the very bytes of the local run (every file of the output); the
  plan, ``inspect`` and ``verify --against`` work on the URL.
* Resume: SIGKILL at named moments and at a random one, rerun: byte-identical, finished shards
  not read again (the bytes fetched by a resumed run are counted); an object replaced between the
  runs is refused (``--restart`` takes the new one); the fleet recipe with no shared volume.
* Other URLs: a single-file ``http://`` URL on a range-capable server (tokens never shown).
* Permanent errors, one line and exit 1, naming the object: missing prefix, missing shard,
  access denied by policy, unknown credentials (never printed), truncated object, object
  replaced while being read, torch ``.bin`` (refused: no byte ranges), remote output, and the
  missing extra. Transient errors are retried with back-off.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("s3fs", reason="the remote extra (fsspec, s3fs) is not installed")
pytest.importorskip("moto", reason="moto[server] (test extra) is not installed")

import monoquant
from monoquant.errors import CheckpointError, OutputError
from monoquant.plan import INDEX_NAME
from monoquant.remote import RangeReader, RemotePath, scrub, with_retries
from tests import cli_helpers
from tests.cli_helpers import STATE, Zygote, assert_complete, assert_one_error_line, check_after_kill
from tests.helpers import read_dir_bytes, tiny_llama_sd, write_sharded
from tests.s3server import S3Server

# small chunks and a short read-ahead: many range requests, chunk boundaries inside tensors
SMALL_WINDOW = {"MONOQUANT_REMOTE_CHUNK": "65536", "MONOQUANT_REMOTE_AHEAD": "2"}


@pytest.fixture(scope="module")
def srv() -> Any:
    with S3Server() as s:
        yield s


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, srv: S3Server) -> tuple[Path, str]:
    """A sharded checkpoint with index, side files in a subdirectory too, on disk and in the bucket."""
    root = write_sharded(tmp_path_factory.mktemp("remote") / "llama", tiny_llama_sd(layers=3), 3)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    return root, srv.upload_dir(root, "models/llama")


@pytest.fixture
def aws_env(srv: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {**srv.env, **SMALL_WINDOW}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="module")
def zyg(tmp_path_factory: pytest.TempPathFactory, srv: S3Server) -> Any:
    """The CLI fork server, with the bucket's credentials and endpoint in its environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_helpers, "ENV", {**cli_helpers.ENV, **srv.env, **SMALL_WINDOW})
        z = Zygote(tmp_path_factory.mktemp("zyg"))
    try:
        yield z
    finally:
        z.close()


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory: pytest.TempPathFactory, ckpt: tuple[Path, str]) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    monoquant.stream(ckpt[0], out, "int8", max_shard_size="600KB")
    return read_dir_bytes(out)


def _json_out(run: Any) -> dict[str, Any]:
    return json.loads(run.stdout)


# ---- byte identity --------------------------------------------------------------------------------
def test_sharded_from_s3_matches_local_run(
    zyg: Zygote, tmp_path: Path, ckpt: tuple[Path, str], local_ref: dict[str, bytes]
) -> None:
    _, url = ckpt
    r = zyg.run("stream", url + "/", tmp_path / "out", "--int8", "--max-shard-size", "600KB", "--json")
    assert r.returncode == 0, r.stderr
    assert len([n for n in local_ref if n.startswith("model-")]) >= 3
    assert "tokenizer/vocab.txt" in local_ref
    assert_complete(tmp_path / "out", local_ref, "s3 run")
    rep = _json_out(r)
    assert rep["complete"] and rep["shards_written"] >= 3


@pytest.mark.parametrize(
    ("scheme", "opts"),
    [
        ("int4", {}),
        ("fp8", {}),  # a tensor scale: every tensor is read twice
        ("fp16", {"jobs": 2, "max_shard_size": "600KB"}),  # two readers at once
        ("int8", {"target_bpw": 6.0}),  # mixed precision samples rows first
        ("nvfp4a16", {}),  # q/k/v and gate/up share a global scale: the peers are read from s3:// too
        ("mxfp4a16", {"target_bpw": 5.0}),  # mixed among the float formats (nvfp4 included)
        ("int8", {"block_bytes": 64 << 10, "overlap": True}),  # kept tensors on the copy lane: a 2nd reader
    ],
)
def test_schemes_from_s3_match_local(
    aws_env: dict[str, str], tmp_path: Path, ckpt: tuple[Path, str], scheme: str, opts: dict[str, Any]
) -> None:
    root, url = ckpt
    monoquant.stream(root, tmp_path / "local", scheme, **opts)
    rep = monoquant.stream(url, tmp_path / "remote", scheme, **opts)
    assert rep.complete
    assert read_dir_bytes(tmp_path / "remote") == read_dir_bytes(tmp_path / "local")


def test_single_file_and_unindexed_dir_from_s3(
    aws_env: dict[str, str], srv: S3Server, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    sd = tiny_llama_sd(layers=1, hidden=128, inter=256, vocab=300, seed=3)
    names = sorted(sd)
    d = tmp_path / "in"
    d.mkdir()
    # one series of files without an index (two different names would be refused as two layouts)
    save_file({n: sd[n] for n in names[:6]}, str(d / "a-1.safetensors"))
    save_file({n: sd[n] for n in names[6:]}, str(d / "a-2.safetensors"))
    (d / "config.json").write_text('{"model_type": "llama"}')
    url = srv.upload_dir(d, "plain")
    for src_local, src_url in ((d, url), (d / "a-1.safetensors", url + "/a-1.safetensors")):
        tag = Path(src_local).name
        monoquant.stream(src_local, tmp_path / f"l-{tag}", "int4", group_size=32)
        monoquant.stream(src_url, tmp_path / f"r-{tag}", "int4", group_size=32)
        assert read_dir_bytes(tmp_path / f"r-{tag}") == read_dir_bytes(tmp_path / f"l-{tag}"), tag
        # the lazy iterator and the plan agree too
        got = dict(monoquant.iter_quantized(src_url, "int8"))
        want = dict(monoquant.iter_quantized(src_local, "int8"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        pl, pr = monoquant.plan(src_local, "int8"), monoquant.plan(src_url, "int8")
        assert pl.fingerprint == pr.fingerprint
        assert pr.source == src_url and pr.totals() == pl.totals()


def test_dry_run_inspect_verify_on_urls(zyg: Zygote, tmp_path: Path, ckpt: tuple[Path, str]) -> None:
    root, url = ckpt
    dry = zyg.run("stream", url, tmp_path / "out", "--int4", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = _json_out(dry)
    assert plan["source"] == url and not (tmp_path / "out").exists()
    ins_r, ins_l = zyg.run("inspect", url, "--json"), zyg.run("inspect", root, "--json")
    assert ins_r.returncode == 0, ins_r.stderr
    assert _json_out(ins_r)["totals"] == _json_out(ins_l)["totals"]
    monoquant.stream(root, tmp_path / "q", "int8")
    v = zyg.run("verify", tmp_path / "q", "--against", url, "--min-sqnr", "20")
    assert v.returncode == 0, v.stderr + v.stdout
    assert f"compared with {url}" in v.stdout


# ---- resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kill", "shard"), [("mid-shard", 1), ("after-record", 0)])
def test_kill_and_rerun_from_s3(
    zyg: Zygote, tmp_path: Path, ckpt: tuple[Path, str], local_ref: dict[str, bytes], kill: str, shard: int
) -> None:
    _, url = ckpt
    out = tmp_path / "out"
    args = ("stream", url, out, "--int8", "--max-shard-size", "600KB", "--json")
    r = zyg.run(*args, hooks={"kill": kill, "shard": shard})
    assert r.returncode == -signal.SIGKILL, r.stderr
    check_after_kill(out, local_ref, kill)
    again = zyg.run(*args)
    assert again.returncode == 0, again.stderr
    assert_complete(out, local_ref, f"rerun after {kill}")
    rep = _json_out(again)
    total = sum(len(b) for n, b in read_dir_bytes(ckpt[0]).items() if n.endswith(".safetensors"))
    # the journaled shard is neither read nor written again
    assert rep["shards_skipped"] >= 1 and rep["bytes_in"] < total * 0.9


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_rerun(
    srv: S3Server, tmp_path: Path, ckpt: tuple[Path, str], local_ref: dict[str, bytes]
) -> None:
    """The real console script, killed while it reads from the bucket (slowed by a tiny read window)."""
    _, url = ckpt
    out = tmp_path / "out"
    env = {**cli_helpers.ENV, **srv.env, "MONOQUANT_REMOTE_CHUNK": "16384", "MONOQUANT_REMOTE_AHEAD": "0"}
    args = [*cli_helpers.cli(), "stream", url, str(out), "--int8", "--max-shard-size", "600KB", "-q"]
    p = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    t0 = time.monotonic()
    while not list(out.glob("model-*.safetensors")) and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    check_after_kill(out, local_ref, "random kill")
    # the rerun gets empty temp, home and cache directories: nothing of the input may land there
    scratch = {k: tmp_path / k.lower() for k in ("TMPDIR", "HOME", "XDG_CACHE_HOME")}
    for d in scratch.values():
        d.mkdir()
    env = {**env, **{k: str(d) for k, d in scratch.items()}}
    again = subprocess.run(
        args, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert_complete(out, local_ref, "rerun after a random kill")
    written = sum(p.stat().st_size for d in scratch.values() for p in d.rglob("*") if p.is_file())
    assert written < 64 << 10, f"{written} bytes written to temp/home/cache during a remote run"


def test_object_replaced_between_runs_is_refused(
    zyg: Zygote, srv: S3Server, tmp_path: Path, ckpt: tuple[Path, str]
) -> None:
    root, _ = ckpt
    url = srv.upload_dir(root, "models/changing")
    out = tmp_path / "out"
    args = ("stream", url, out, "--int8", "--max-shard-size", "600KB")
    r = zyg.run(*args, hooks={"kill": "after-record", "shard": 0})
    assert r.returncode == -signal.SIGKILL
    state = json.loads((out / STATE / "inputs.json").read_text())
    assert sorted(state) == [f"{url}/model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    # same header, other weights: the plan fingerprint alone could not tell
    shard = root / "model-00003-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-2:] = b"\x11\x3f"
    srv.put("models/changing/model-00003-of-00003.safetensors", bytes(data))
    refused = zyg.run(*args)
    msg = assert_one_error_line(refused, f"{url}/model-00003-of-00003.safetensors", "--restart")
    assert "changed" in msg
    ok = zyg.run(*args, "--restart")
    assert ok.returncode == 0, ok.stderr
    changed = tmp_path / "changed"
    changed.mkdir()
    for p in root.rglob("*"):
        if p.is_file():
            dst = changed / p.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(bytes(data) if p == shard else p.read_bytes())
    monoquant.stream(changed, tmp_path / "ref", "int8", max_shard_size="600KB")
    assert_complete(out, read_dir_bytes(tmp_path / "ref"), "--restart after the input changed")


# ---- permanent errors: one line, exit 1, naming the object -------------------------------------------
def test_missing_prefix_and_missing_shard(
    zyg: Zygote, srv: S3Server, tmp_path: Path, ckpt: tuple[Path, str]
) -> None:
    r = zyg.run("stream", srv.url("models/nothing-here/"), tmp_path / "o1", "--int8")
    assert_one_error_line(r, srv.url("models/nothing-here"))
    root, _ = ckpt
    url = srv.upload_dir(root, "models/holey")
    srv.client().delete_object(Bucket=srv.bucket, Key="models/holey/model-00002-of-00003.safetensors")
    r = zyg.run("stream", url, tmp_path / "o2", "--int8")
    assert_one_error_line(r, "model-00002-of-00003.safetensors", url)
    assert not (tmp_path / "o2").exists()


def test_access_denied_by_policy(zyg: Zygote, srv: S3Server, tmp_path: Path, ckpt: tuple[Path, str]) -> None:
    """The server's IAM policy denies GetObject under denied/: listing works, reading does not."""
    root, _ = ckpt
    url = srv.upload_dir(root, "denied/llama")
    r = zyg.run("stream", url, tmp_path / "out", "--int8")
    msg = assert_one_error_line(r, url)
    assert "access denied" in msg
    assert not (tmp_path / "out").exists()


def test_unknown_credentials_denied_and_never_printed(
    srv: S3Server, tmp_path: Path, ckpt: tuple[Path, str]
) -> None:
    _, url = ckpt
    env = {
        **cli_helpers.ENV,
        **srv.env,
        "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-must-not-leak",
    }
    args = ("stream", url, str(tmp_path / "out"), "--int8")
    p = subprocess.run(
        [*cli_helpers.cli(), *args],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert "access denied" in assert_one_error_line(p, url)
    assert "s3cr3t-must-not-leak" not in p.stdout + p.stderr
    assert "AKIAWRONGWRONGWRONG1" not in p.stdout + p.stderr


def test_tokens_in_urls_are_scrubbed(zyg: Zygote, srv: S3Server, tmp_path: Path) -> None:
    assert (
        scrub("https://u:pw@h.example:8443/a/b.safetensors?sig=XYZ#frag")
        == "https://h.example:8443/a/b.safetensors"
    )
    url = f"http://user:pa55word-leak@127.0.0.1:{srv.port}/{srv.bucket}/nowhere/model.safetensors?X-Amz-Signature=sig-leak"
    r = zyg.run("stream", url, tmp_path / "out", "--int8")
    msg = assert_one_error_line(r, f"http://127.0.0.1:{srv.port}/{srv.bucket}/nowhere/model.safetensors")
    assert "leak" not in msg and "leak" not in r.stdout


def test_truncated_object(zyg: Zygote, srv: S3Server, tmp_path: Path, ckpt: tuple[Path, str]) -> None:
    root, _ = ckpt
    url = srv.upload_dir(root, "models/cut")
    data = (root / "model-00001-of-00003.safetensors").read_bytes()
    srv.put("models/cut/model-00001-of-00003.safetensors", data[: len(data) - 1000])
    r = zyg.run("stream", url, tmp_path / "out", "--int8")
    msg = assert_one_error_line(r, f"{url}/model-00001-of-00003.safetensors")
    assert "truncated" in msg


def test_object_replaced_while_read(
    zyg: Zygote, srv: S3Server, tmp_path: Path, ckpt: tuple[Path, str]
) -> None:
    """Replaced after the first tensor was read: the next range request (If-Match) fails."""
    root, _ = ckpt
    url = srv.upload_dir(root, "models/moving")
    sig, go = tmp_path / "sig", tmp_path / "go"
    r = zyg.start(
        "stream",
        url,
        tmp_path / "out",
        "--int8",
        "--max-shard-size",
        "600KB",
        hooks={"events": [{"kind": "tensor", "signal": str(sig), "wait": str(go)}]},
    )
    cli_helpers.wait_for(sig, r)
    first = json.loads((tmp_path / "out" / STATE / "inputs.json").read_text())
    assert first
    data = bytearray((root / "model-00001-of-00003.safetensors").read_bytes())
    data[-4:] = b"\0\0\0\0"
    srv.put("models/moving/model-00001-of-00003.safetensors", bytes(data))
    go.touch()
    assert r.wait(120) == 1
    msg = assert_one_error_line(r, f"{url}/model-00001-of-00003.safetensors", allow_progress=True)
    assert "changed while it was being read" in msg
    assert not (tmp_path / "out" / INDEX_NAME).exists()


def test_torch_bin_remote_is_refused(zyg: Zygote, srv: S3Server, tmp_path: Path) -> None:
    root = write_sharded(
        tmp_path / "bin", tiny_llama_sd(layers=1, hidden=64, inter=128, vocab=100), 2, fmt="bin"
    )
    url = srv.upload_dir(root, "models/bin")
    r = zyg.run("stream", url, tmp_path / "out", "--int8")
    msg = assert_one_error_line(r, "pytorch_model-00001-of-00002.bin", "safetensors")
    assert url in msg


def test_remote_output_is_refused(aws_env: dict[str, str], ckpt: tuple[Path, str], srv: S3Server) -> None:
    with pytest.raises(OutputError, match="must be a local directory"):
        monoquant.stream(ckpt[0], srv.url("out/"), "int8")
    with pytest.raises(CheckpointError, match="load\\(\\) reads a local output"):
        monoquant.load(srv.url("out/"))


def test_missing_extra_is_one_line(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['fsspec'] = None\n"
        "from monoquant.cli import main\n"
        "main(['stream', 's3://bucket/model/', sys.argv[1], '--int8'], prog_name='monoquant')\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=cli_helpers.ENV,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    msg = assert_one_error_line(p, "s3://bucket/model/")
    assert "pip install 'monoquant[remote]'" in msg


# ---- transient errors: retried with back-off ---------------------------------------------------------
class _FlakyFS:
    """A real s3fs whose opened files fail their first ``n`` reads with a connection reset."""

    def __init__(self, fs: Any, n: int):
        self.fs, self.left = fs, n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)

    def open(self, *a: Any, **k: Any) -> Any:
        f = self.fs.open(*a, **k)
        real_read, outer = f.read, self

        def read(n: int = -1) -> bytes:
            if outer.left > 0:
                outer.left -= 1
                raise ConnectionResetError("connection reset by peer")
            return real_read(n)

        f.read = read
        return f


def test_transient_errors_are_retried_with_backoff(
    aws_env: dict[str, str], ckpt: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, url = ckpt
    rp = RemotePath.from_url(url + "/model-00001-of-00003.safetensors")
    want = (root / "model-00001-of-00003.safetensors").read_bytes()
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)
    rd = RangeReader(RemotePath(_FlakyFS(rp.fs, 3), rp.path, rp.info()), chunk=1 << 16, ahead=0)
    try:
        buf = bytearray(200_000)
        rd.read_into(memoryview(buf), 1234)
    finally:
        rd.close()
    assert bytes(buf) == want[1234 : 1234 + 200_000]
    assert sleeps == [0.5, 1.0, 2.0]  # exponential back-off on the same request
    monkeypatch.setenv("MONOQUANT_REMOTE_RETRIES", "3")
    rd = RangeReader(RemotePath(_FlakyFS(rp.fs, 99), rp.path, rp.info()), chunk=1 << 16, ahead=1)
    with pytest.raises(CheckpointError, match=r"cannot read after 3 attempts \(ConnectionResetError") as ei:
        rd.read_into(memoryview(bytearray(10)), 0)
    rd.close()
    assert str(ei.value).startswith(rp.url)


def test_with_retries_gives_up_at_once_on_permanent_errors() -> None:
    calls: list[int] = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(CheckpointError, match="s3://b/k: no such object"):
        with_retries(missing, "s3://b/k", sleep=lambda s: None)
    assert calls == [1]


def test_memory_bound_of_the_read_window(aws_env: dict[str, str], ckpt: tuple[Path, str]) -> None:
    """However far the reader goes, the window holds at most (chunks spanned + ahead) chunks."""
    _, url = ckpt
    rp = RemotePath.from_url(url + "/model-00001-of-00003.safetensors")
    rd = RangeReader(rp, chunk=4096, ahead=3)
    try:
        held = 0
        for off in range(0, rp.size - 10_000, 10_000):
            rd.read_into(memoryview(bytearray(10_000)), off)
            held = max(held, len(rd._chunks))
        assert held <= 4 + 3
        assert rd.requests >= rp.size // 4096 - 8  # every chunk fetched once (sequential reads)
    finally:
        rd.close()


def test_fleet_without_shared_volume(
    aws_env: dict[str, str], tmp_path: Path, ckpt: tuple[Path, str], local_ref: dict[str, bytes]
) -> None:
    """docs/remote.md's fleet recipe: each worker reads the bucket and writes its own local directory;
    a finishing step gathers the parts (shards + journals) and only writes the index."""
    import shutil

    _, url = ckpt
    for k in range(2):
        rep = monoquant.stream(url, tmp_path / f"part{k}", "int8", max_shard_size="600KB", worker=(k, 2))
        assert not rep.complete and rep.shards_written >= 1
    out = tmp_path / "out"
    (out / STATE).mkdir(parents=True)
    journal = b""
    for k in range(2):
        part = tmp_path / f"part{k}"
        for p in part.glob("model-*.safetensors"):
            shutil.copy(p, out / p.name)
        for name in ("plan.json", "inputs.json"):
            shutil.copy(part / STATE / name, out / STATE / name)
        journal += (part / STATE / "journal.jsonl").read_bytes()
    (out / STATE / "journal.jsonl").write_bytes(journal)
    fin = monoquant.stream(url, out, "int8", max_shard_size="600KB")
    assert fin.complete and fin.shards_written == 0 and fin.shards_skipped >= 3
    assert_complete(out, local_ref, "gathered fleet output")


def test_local_runs_never_import_fsspec(tmp_path: Path, ckpt: tuple[Path, str]) -> None:
    """The core install stays torch + safetensors + tqdm + click: a local run works with fsspec blocked."""
    code = (
        "import sys; sys.modules['fsspec'] = None; sys.modules['s3fs'] = None\n"
        "import monoquant\n"
        "r = monoquant.stream(sys.argv[1], sys.argv[2], 'int8')\n"
        "assert r.complete\n"
        "print('ok')\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(ckpt[0]), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=cli_helpers.ENV,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert p.returncode == 0 and p.stdout == "ok\n", p.stderr


def test_index_entry_outside_the_prefix_is_refused(
    aws_env: dict[str, str], srv: S3Server, ckpt: tuple[Path, str], tmp_path: Path
) -> None:
    root, _ = ckpt
    url = srv.upload_dir(root, "models/escape")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../llama/model-00001-of-00003.safetensors"
    srv.put("models/escape/model.safetensors.index.json", json.dumps(index).encode())
    with pytest.raises(CheckpointError, match=r"outside s3:|outside the checkpoint"):
        monoquant.plan(url, "int8")


# ---- https:// (plain HTTP range requests): a minimal server on 127.0.0.1 ------------------------------
def _range_server(root: Path) -> Any:
    """A threaded HTTP server for the files of ``root`` that honours ``Range`` (as object stores and
    CDNs do) and sends an ``ETag``; returns the server (``server_address`` has its port)."""
    import http.server
    import re
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def _file(self) -> Path | None:
            p = root / self.path.split("?", 1)[0].lstrip("/")
            return p if p.is_file() else None

        def _head(self, code: int, length: int, extra: dict[str, str]) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()

        def do_HEAD(self) -> None:
            p = self._file()
            if p is None:
                self._head(404, 0, {})
                return
            self._head(200, p.stat().st_size, {"ETag": f'"{p.stat().st_mtime_ns}"'})

        def do_GET(self) -> None:
            p = self._file()
            if p is None:
                self._head(404, 0, {})
                return
            data = p.read_bytes()
            m = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
            etag = {"ETag": f'"{p.stat().st_mtime_ns}"'}
            if m:
                a, b = int(m.group(1)), int(m.group(2) or len(data) - 1)
                part = data[a : b + 1]
                self._head(
                    206, len(part), {**etag, "Content-Range": f"bytes {a}-{a + len(part) - 1}/{len(data)}"}
                )
                self.wfile.write(part)
            else:
                self._head(200, len(data), etag)
                self.wfile.write(data)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_https_style_single_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain HTTP(S) URL to one .safetensors file, read by range requests; the token in the query
    string never shows."""
    from safetensors.torch import save_file

    pytest.importorskip("aiohttp")
    for k, v in SMALL_WINDOW.items():
        monkeypatch.setenv(k, v)
    d = tmp_path / "srv"
    d.mkdir()
    save_file(tiny_llama_sd(layers=1, hidden=128, inter=256, vocab=300, seed=5), str(d / "model.safetensors"))
    srv = _range_server(d)
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}/model.safetensors"
        url = base + "?token=hf_secret_token"
        rep = monoquant.stream(url, tmp_path / "remote", "int4", group_size=32)
        monoquant.stream(d / "model.safetensors", tmp_path / "local", "int4", group_size=32)
        assert read_dir_bytes(tmp_path / "remote") == read_dir_bytes(tmp_path / "local")
        assert "hf_secret_token" not in json.dumps(rep.to_json()) + json.dumps(monoquant.plan(url).to_json())
        assert monoquant.plan(url).source == base
        with pytest.raises(CheckpointError, match=r"^http://127\.0\.0\.1:\d+/nothing\.safetensors: ") as ei:
            monoquant.plan(base.replace("model", "nothing") + "?token=hf_secret_token")
        assert "hf_secret_token" not in str(ei.value)
    finally:
        srv.shutdown()
        srv.server_close()


def test_resume_fetches_only_what_the_missing_shards_need(
    aws_env: dict[str, str],
    tmp_path: Path,
    ckpt: tuple[Path, str],
    local_ref: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes actually fetched from the bucket by a resumed run: the input tensors of the shards still
    missing, plus at most the read window's overshoot, and not a byte of the finished shards."""
    _, url = ckpt
    chunk, ahead = 16384, 1
    monkeypatch.setenv("MONOQUANT_REMOTE_CHUNK", str(chunk))
    monkeypatch.setenv("MONOQUANT_REMOTE_AHEAD", str(ahead))
    fetched: list[int] = []
    real = RangeReader._fetch

    def counting(self: RangeReader, k: int) -> bytes:
        data = real(self, k)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(RangeReader, "_fetch", counting)
    out = tmp_path / "out"
    first = monoquant.stream(
        url, out, "int8", max_shard_size="600KB", worker=(0, 2)
    )  # "killed" after its shards
    assert not first.complete and first.shards_written >= 2
    fetched.clear()
    p = monoquant.plan(url, "int8", max_shard_size="600KB")
    rest = monoquant.stream(url, out, "int8", max_shard_size="600KB")
    assert rest.complete and rest.shards_skipped == first.shards_written
    assert_complete(out, local_ref, "resumed from the bucket")
    missing = [s for s in p.shards if s.index % 2 == 1]
    need = sum(p.tensors[i].ref.nbytes for s in missing for i in s.tensors)
    total = sum(t.ref.nbytes for t in p.tensors)
    pairs = sum(len({p.tensors[i].ref.file for i in s.tensors}) for s in missing)
    assert need <= sum(fetched) <= need + pairs * (ahead + 2) * chunk, (sum(fetched), need, total)
    assert sum(fetched) < 0.75 * total


def test_docstring_examples_of_the_remote_module() -> None:
    import doctest

    import monoquant.remote

    res = doctest.testmod(monoquant.remote)
    assert res.attempted >= 5 and res.failed == 0
