"""monoquant.torchstart: a module deferred until its first attribute read, and torch's meta
kernels deferred in a fresh interpreter with CPU results unchanged."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from monoquant import torchstart


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package ``pkg_<n>`` whose ``__init__`` binds its submodule ``heavy``; ``heavy`` counts
    its runs in ``runs.txt`` and sleeps a little (so two first reads overlap)."""
    name = f"pkg_{tmp_path.name.replace('-', '_')}"
    d = tmp_path / name
    d.mkdir()
    (d / "__init__.py").write_text(f"from {name} import heavy\nfrom {name}.dep import USED\n")
    (d / "dep.py").write_text("USED = []\n")
    (d / "heavy.py").write_text(
        "import pathlib, time\n"
        "p = pathlib.Path(__file__).with_name('runs.txt')\n"
        "p.write_text(str(int(p.read_text() or 0) + 1) if p.exists() else '1')\n"
        "time.sleep(0.05)\n"
        "VALUE = 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, d
    for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[m]


def test_a_deferred_module_runs_once_on_its_first_attribute_read(package) -> None:
    name, d = package
    assert torchstart.defer(name, "heavy", first=[f"{name}.dep"])
    assert not torchstart.defer(name, "heavy")  # once
    pkg = __import__(name)
    heavy = sys.modules[f"{name}.heavy"]
    assert pkg.heavy is heavy and not (d / "runs.txt").exists()  # bound, not run
    assert f"{name}.dep" in sys.modules  # imported where the stand-in was
    assert not any(isinstance(f, torchstart._Finder) for f in sys.meta_path)  # used once, gone
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(heavy.VALUE)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [42] * 4
    assert (d / "runs.txt").read_text() == "1"  # once, however many threads read at once
    assert heavy.__name__ == f"{name}.heavy" and "__getattr__" not in vars(heavy)
    with pytest.raises(AttributeError, match="has no attribute 'missing'"):
        _ = heavy.missing


def test_a_module_that_fails_says_so_on_every_read(package) -> None:
    name, d = package
    (d / "heavy.py").write_text("A = 1\nraise AttributeError('boom')\n")
    assert torchstart.defer(name, "heavy")
    heavy = __import__(name).heavy
    for _ in range(2):  # an ImportError (hasattr would hide an AttributeError), every time
        with pytest.raises(ImportError, match="failed to load") as e:
            _ = heavy.B
        assert "boom" in repr(e.value.__cause__)
    with pytest.raises(ImportError):
        hasattr(heavy, "B")


def test_a_module_reloaded_before_its_first_read_is_not_run_again(package) -> None:
    import importlib

    name, d = package
    assert torchstart.defer(name, "heavy")
    heavy = __import__(name).heavy
    importlib.reload(heavy)  # runs the real code (the finder is gone)
    assert (d / "runs.txt").read_text() == "1"
    assert not hasattr(heavy, "missing") and heavy.VALUE == 42
    assert (d / "runs.txt").read_text() == "1" and "__getattr__" not in vars(heavy)


def test_finish_import_removes_a_finder_torch_never_asked(monkeypatch) -> None:
    import torch

    finder = torchstart._Finder("torch._never_asked", "/nonexistent.py", ())
    other = torchstart._Finder("pkg_other.heavy", "/nonexistent.py", ())
    monkeypatch.setattr(sys, "meta_path", [finder, other, *sys.meta_path])
    lazy_before = set(torch._lazy_modules)
    torchstart.finish_import()
    assert finder not in sys.meta_path and other in sys.meta_path
    assert torch._lazy_modules == lazy_before  # nothing deferred here: nothing to add


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("__version__ = '2.13.0+cpu'\n", "2.13"),
        ("__version__ = '2.13.1'\n", "2.13"),
        ('__version__ = "2.14.0+cu128"\n', "2.14"),
        ("__version__ = '2.13.0a0+git1234abc'\n", None),  # a nightly or source build
        ("__version__ = '2.13.0.dev20261101'\n", None),
        ("__version__ = '2.13.0rc1'\n", None),
        ("version = '2.13.0'\n", None),
    ],
)
def test_the_version_gate_takes_releases_only(tmp_path, monkeypatch, text, want) -> None:
    (tmp_path / "version.py").write_text(text)
    monkeypatch.setattr(torchstart, "_package_dir", lambda _: str(tmp_path))
    assert torchstart.torch_version() == want
    (tmp_path / "version.py").write_bytes(b"\xff\xfe__version__ = '2.13.0'\n")  # not UTF-8
    assert torchstart.torch_version() is None


def test_nothing_is_deferred_where_it_cannot_be(package, monkeypatch) -> None:
    name, _ = package
    assert not torchstart.defer(name, "absent")  # no such file
    assert not torchstart.defer("no_such_package_anywhere", "heavy")
    __import__(name)
    assert not torchstart.defer(name, "heavy")  # already imported: torch's case in this process
    assert not torchstart.defer_meta_kernels()  # torch is loaded here
    import torch

    assert torchstart.torch_version() == ".".join(torch.__version__.split(".")[:2])
    calls: list[object] = []
    monkeypatch.setattr(torchstart, "defer", lambda *a, **k: calls.append(a) or True)
    monkeypatch.setattr(torchstart, "torch_version", lambda: "2.3")  # not a version the tests run
    assert not torchstart.defer_meta_kernels() and not calls
    monkeypatch.setattr(torchstart, "torch_version", lambda: torchstart.TESTED[0])
    monkeypatch.setenv(torchstart.ENV, "0")
    assert not torchstart.defer_meta_kernels() and not calls
    monkeypatch.delenv(torchstart.ENV)
    assert torchstart.defer_meta_kernels() and calls == [("torch", "_meta_registrations")]


_FRESH = textwrap.dedent(
    """
    import sys
    from monoquant.torchstart import defer_meta_kernels
    print("DEFERRED", defer_meta_kernels())
    import torch
    m = sys.modules["torch._meta_registrations"]
    print("UNRUN", "__getattr__" in vars(m) and "activate_meta" not in vars(m))
    g = torch.Generator().manual_seed(0)  # needs what the stand-in keeps (torch 2.13: rng_prims)
    x = (torch.randn(64, 256, generator=g) * 3).bfloat16()
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True) / 127
    q = torch.div(xf, s).round_().clamp_(-127, 127).to(torch.int8)
    print("DIGEST", q.view(-1).tolist()[:8], int(q.long().sum()), float((q.float() * s - xf).square().sum()))
    from monoquant.torchstart import finish_import
    finish_import()
    print("BROADCAST", tuple(torch.broadcast_shapes((3, 1), (1, 2))))  # reads torch._refs
    print("STILL", "__getattr__" in vars(m) and "activate_meta" not in vars(m))
    m.activate_meta  # the first read runs it
    print("RUN", "activate_meta" in vars(m))
    print("META", tuple((torch.empty(3, 4, device="meta") @ torch.empty(4, 5, device="meta")).shape))
    """
)


def _fresh(env_off: bool) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != torchstart.ENV}
    if env_off:
        env[torchstart.ENV] = "0"
    r = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(line.split(" ", 1) for line in r.stdout.splitlines())


def test_torch_loads_without_its_meta_kernels_and_computes_the_same() -> None:
    """In a fresh interpreter: torch imports with its Python meta kernels deferred, CPU results
    are those of a plain import, and the first read of the module loads it (meta ops work)."""
    on, off = _fresh(env_off=False), _fresh(env_off=True)
    gated = str(torchstart.torch_version() in torchstart.TESTED)  # other versions: a plain import
    assert on["DEFERRED"] == on["UNRUN"] == on["STILL"] == gated
    assert off["DEFERRED"] == off["UNRUN"] == off["STILL"] == "False"  # MONOQUANT_LAZY_META=0
    assert on["DIGEST"] == off["DIGEST"]
    assert on["BROADCAST"] == off["BROADCAST"] == "(3, 2)"
    assert on["RUN"] == "True" and on["META"] == off["META"] == "(3, 5)"
