"""The CLI: flags, dry run, JSON output, error lines and exit codes, progress, python -m."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from monoquant.cli import _BLAS_THREADS, main
from tests.helpers import command_stream, tiny_llama_sd, write_sharded


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_sharded(tmp_path_factory.mktemp("c") / "in", tiny_llama_sd(layers=1), shards=2)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "flags, scheme",
    [
        (["--int8"], "int8"),
        (["--int4"], "int4-g128"),
        (["--int4", "--group-size", "64", "--asymmetric"], "int4-g64-asym"),
        (["--int8", "--per-tensor"], "int8-tensor"),
        (["--fp8"], "fp8"),
        (["--fp8", "--dynamic"], "fp8-dynamic"),
        (["--int8", "--dynamic", "--act-strategy", "tensor"], "int8-dynamic-tensor"),
        (["--fp16"], "fp16"),
        (["--bf16"], "bf16"),
        (["--scheme", "int4-g32"], "int4-g32"),
        ([], "int8"),
    ],
)
def test_scheme_flags(src, tmp_path, flags, scheme):
    res = run("stream", src, tmp_path / "o", *flags, "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["scheme"]["name"] == scheme
    assert not (tmp_path / "o").exists()


def test_dry_run_text_lists_every_tensor_and_totals(src, tmp_path):
    res = run("stream", src, tmp_path / "o", "--int4", "--exclude", "*q_proj*", "--dry-run")
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert sum("model.layers.0." in ln for ln in lines) == 9
    assert any("excluded by '*q_proj*'" in ln for ln in lines)
    assert lines[-1] == "dry run: nothing was written"
    assert any(ln.startswith("total:") and "bits per quantized weight" in ln for ln in lines)


def test_stream_json_and_summary(src, tmp_path):
    res = run("stream", src, tmp_path / "o", "--int8", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["complete"] and rep["plan"]["quantized"] == 7 and rep["memory"]["peak_anon"] > 0
    res = run("stream", src, tmp_path / "o2", "--int8")
    assert res.exit_code == 0
    assert "monoquant: complete:" in res.stdout and "mean SQNR" in res.stdout
    res = run("stream", src, tmp_path / "o2", "--int8")
    assert "already complete" in res.stdout


def test_progress_lines_when_not_a_tty(src, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "monoquant",
            "stream",
            str(src),
            str(tmp_path / "o"),
            "--int4",
            "--max-shard-size",
            "100KB",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    prog = [ln for ln in out.stderr.splitlines() if ln.startswith("monoquant:") and "%" in ln]
    assert prog and prog[-1].startswith("monoquant: 100.0%")
    assert len(prog) <= 15  # sparse: about every 10%, not per tensor


@pytest.mark.parametrize(
    "args, needle",
    [
        (["stream", "{src}", "{src}"], "is the input"),
        (["stream", "{tmp}/nope", "{tmp}/o"], "no such file or directory"),
        (["stream", "{src}", "{tmp}/o", "--int4", "--dynamic"], "--dynamic needs 8-bit weights"),
        (["stream", "{src}", "{tmp}/o", "--scheme", "int5"], "unknown scheme 'int5'"),
        (["stream", "{src}", "{tmp}/o", "--max-shard-size", "lots"], "cannot read size 'lots'"),
        (["stream", "{src}", "{tmp}/o", "--worker", "3/2"], "K must be in 0..N-1"),
    ],
)
def test_errors_are_one_line_exit_1_no_traceback(src, tmp_path, args, needle):
    argv = [a.format(src=src, tmp=tmp_path) for a in args]
    out = subprocess.run([sys.executable, "-m", "monoquant", *argv], capture_output=True, text=True)
    assert out.returncode == 1, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monoquant: error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_verbose_shows_the_traceback(src):
    out = subprocess.run(
        [sys.executable, "-m", "monoquant", "stream", str(src), str(src), "-v"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "Traceback" in out.stderr and "monoquant: error:" in out.stderr


def test_usage_errors_exit_2(src, tmp_path):
    assert run("stream", src).exit_code == 2
    assert run("stream", src, tmp_path / "o", "--int3").exit_code == 2


def test_version_and_help():
    assert run("--version").exit_code == 0
    res = run("--help")
    assert (
        res.exit_code == 0 and "stream" in res.stdout and "verify" in res.stdout and "inspect" in res.stdout
    )


def test_sigterm_stops_cleanly_and_the_rerun_completes(tmp_path):
    import signal

    from tests.helpers import read_dir_bytes, write_streamed_checkpoint

    src = tmp_path / "big"
    src.mkdir()
    write_streamed_checkpoint(src / "model.safetensors", [(f"l.{i}.weight", (2048, 4096)) for i in range(12)])
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "monoquant",
        "stream",
        str(src),
        str(out),
        "--int4",
        "--max-shard-size",
        "5MB",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until the job is under way
        if line.startswith("monoquant:") and "%" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    assert not list(out.glob("*.partial"))
    assert not (out / "model.safetensors.index.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref = tmp_path / "ref"
    assert subprocess.run([*cmd[:5], str(ref), *cmd[6:]], capture_output=True).returncode == 0
    assert read_dir_bytes(out) == read_dir_bytes(ref)


def test_console_command_flushes_output_and_keeps_exit_codes(src, tmp_path):
    """The console command leaves through ``os._exit`` (no interpreter teardown, ~0.5 s with
    torch): what it printed still arrives whole through a pipe, and every exit code is main's."""
    from tests.cli_helpers import run_cli

    res = run_cli("stream", src, tmp_path / "o", "--int8", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] is True
    res = run_cli("verify", tmp_path / "o", "--against", src, "--min-sqnr", "999")
    assert res.returncode == 3 and "below 999" in res.stdout + res.stderr
    assert run_cli("stream", src, tmp_path / "o2", "--bogus").returncode == 2
    res = run_cli("stream", tmp_path / "nope", tmp_path / "o3")
    assert res.returncode == 1 and res.stderr.startswith("monoquant: error:")
    code = (
        "import atexit, sys\n"
        "import monoquant.cli as c\n"
        "atexit.register(lambda: print('TEARDOWN'))\n"
        "sys.argv = ['monoquant', '--help']\n"
        "c.entry()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Usage:" in res.stdout and "TEARDOWN" not in res.stdout


def _tiny_ckpt(tmp_path):
    return write_sharded(tmp_path / "in", tiny_llama_sd(layers=1, hidden=64, inter=128, vocab=100), shards=1)


def _report_at_run_start(fstring: str) -> str:
    """Setup lines that write ``fstring`` (evaluated then) to stderr when the pipeline's run starts
    (after the command's imports)."""
    return (
        "import gc, os, sys, monoquant.pipeline as pl\n"
        "real = pl.stream\n"
        "def spy(*a, **k):\n"
        f"    sys.stderr.write(f'{fstring}\\n')\n"
        "    return real(*a, **k)\n"
        "pl.stream = spy\n"
    )


@pytest.mark.parametrize(("env", "want"), [({}, "1"), ({"OMP_NUM_THREADS": "3"}, None)])
def test_stream_limits_openblas_threads_unless_the_user_chose(tmp_path, monkeypatch, env, want) -> None:
    """``monoquant stream`` in its own process sets ``OPENBLAS_NUM_THREADS=1`` before torch (and
    with it numpy's OpenBLAS) loads, unless the user set a variable OpenBLAS reads; an in-process
    caller of ``main`` keeps its environment."""
    ckpt = _tiny_ckpt(tmp_path)
    for v in _BLAS_THREADS:
        monkeypatch.delenv(v, raising=False)
    setup = _report_at_run_start('BLAS {os.environ.get("OPENBLAS_NUM_THREADS")}')
    err = command_stream(ckpt, tmp_path / "out", setup, env={**os.environ, **env})
    assert err.split("BLAS ")[1].split()[0] == str(want)
    if not env:
        res = run("stream", ckpt, tmp_path / "out2", "--int8", "-q")
        assert res.exit_code == 0, res.output
        assert "OPENBLAS_NUM_THREADS" not in os.environ


def _report_after_stream(setup: str, fstring: str) -> str:
    """Setup lines: ``setup``, then ``fstring`` (evaluated then) written to stderr when the
    command's ``_stream`` returns (torch not imported before the command)."""
    return setup + (
        "import sys\n"
        "import monoquant.cli as c\n"
        "assert 'torch' not in sys.modules\n"
        "real = c._stream\n"
        "def spy(*a):\n"
        "    try:\n"
        "        return real(*a)\n"
        "    finally:\n"
        f"        sys.stderr.write(f'{fstring}\\n')\n"
        "c._stream = spy\n"
    )


def test_no_garbage_collection_while_the_command_loads_torch(tmp_path) -> None:
    """``monoquant stream`` pauses the collector while torch loads (its objects set off hundreds
    of collections that free next to nothing, on the one core the start-up uses)."""
    count = (
        "import gc, sys\n"
        "n = [0]\n"
        "def cb(phase, info):\n"
        "    t = sys.modules.get('torch')\n"  # the module exists, its import is under way
        "    if phase == 'start' and getattr(getattr(t, '__spec__', None), '_initializing', False):\n"
        "        n[0] += 1\n"
        "gc.callbacks.append(cb)\n"
    )
    setup = _report_after_stream(count, "DURING {n[0]} ENABLED {gc.isenabled()}")
    assert "DURING 0 ENABLED True" in command_stream(_tiny_ckpt(tmp_path), tmp_path / "out", setup)


def test_stream_defers_torchs_meta_kernels_and_writes_the_same_bytes(tmp_path) -> None:
    """``monoquant stream`` in its own process imports torch without running its Python meta
    kernels (``monoquant.torchstart``; about a sixth of torch's import) on the torch versions the tests
    run, and writes the same bytes as with ``MONOQUANT_LAZY_META=0``; an in-process caller of
    ``main`` keeps torch as it was."""
    from monoquant import torchstart

    ckpt = _tiny_ckpt(tmp_path)
    unrun = (  # at the end of the run: still not run
        "import sys\n"
        "def unrun():\n"
        "    m = vars(sys.modules['torch._meta_registrations'])\n"
        "    return '__getattr__' in m and 'activate_meta' not in m\n"
    )
    report = _report_after_stream(unrun, "UNRUN {unrun()}")
    env = {k: v for k, v in os.environ.items() if k != torchstart.ENV}
    err_on = command_stream(ckpt, tmp_path / "on", report, env=env)
    err_off = command_stream(ckpt, tmp_path / "off", report, env={**env, torchstart.ENV: "0"})
    gated = torchstart.torch_version() in torchstart.TESTED  # other versions: a plain import
    assert f"UNRUN {gated}" in err_on and "UNRUN False" in err_off
    on = {p.name: p.read_bytes() for p in sorted((tmp_path / "on").iterdir())}
    off = {p.name: p.read_bytes() for p in sorted((tmp_path / "off").iterdir())}
    assert on == off and any(n.endswith(".safetensors") for n in on)
    code = (  # an in-process caller of main, torch not yet imported: a plain import
        "import sys\n"
        "from monoquant.cli import main\n"
        "main(['stream', sys.argv[1], sys.argv[2], '--int8', '-q'], standalone_mode=False)\n"
        "print('activate_meta' in vars(sys.modules['torch._meta_registrations']))\n"
    )
    cmd = [sys.executable, "-c", code, str(ckpt), str(tmp_path / "api")]
    r = subprocess.run(cmd, capture_output=True, env=env)
    assert r.returncode == 0 and r.stdout.split() == [b"True"], r.stderr[-2000:]


def test_only_the_commands_own_process_freezes_the_collector(tmp_path) -> None:
    """``monoquant`` (its entry point) moves what exists after the imports out of the garbage
    collector's reach before the run (``gc.freeze``: no full collection walks torch's objects
    while holding the GIL); an in-process caller of ``main`` keeps its collector as it was."""
    import gc

    ckpt = _tiny_ckpt(tmp_path)
    err = command_stream(ckpt, tmp_path / "out", _report_at_run_start("FROZEN {gc.get_freeze_count()}"))
    frozen = int(err.split("FROZEN ")[1].split()[0])
    assert frozen > 10_000  # torch's objects and the modules'
    before = gc.get_freeze_count()
    res = run("stream", ckpt, tmp_path / "out2", "--int8", "-q")
    assert res.exit_code == 0, res.output
    assert gc.get_freeze_count() == before
