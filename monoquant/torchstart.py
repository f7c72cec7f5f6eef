"""A faster ``import torch`` for a command's own process: torch's Python meta kernels load on use.

``monoquant stream`` spends its first 1.5-2.5 s importing torch, on one core, before it reads a
byte; a fifth of that is one module, ``torch._meta_registrations``, with ``torch._decomp`` that
it imports. It registers Python kernels for the ``Meta`` device (shape inference without data,
used by ``torch.compile``, ``torch.export`` and fake tensors): no CPU kernel, nothing a
quantization run calls. :func:`defer_meta_kernels`, called before the first import of torch,
hands torch's own ``from torch import _meta_registrations`` a stand-in; the real module runs the
moment anything reads one of its attributes (the stand-in's PEP 562 ``__getattr__``), as a lazy
import does.

What this changes, and why it is confined:

* **Only a command's own process** (``monoquant.cli.entry``, for ``stream``): never the Python
  API, whose callers may use meta tensors or ``torch.compile`` in the same interpreter.
* **Only the torch versions the tests run** (:data:`TESTED`, read from ``torch/version.py``
  without importing it). A module torch imports can carry side effects torch relies on: in
  torch 2.13, ``torch.Generator()`` fails unless ``torch._prims.rng_prims`` has run (it sets the
  class's metaclass), and the real module imports it. The stand-in imports it (and whatever
  :data:`KEEP` names) at the point of torch's import where the real module would, so what comes
  after (device plugins loaded at the end of the import included) finds it done. Another
  version may have other such effects: it gets the plain import.
* **Meta kernels written in Python are missing until the module is touched.** An operation on
  a ``meta`` tensor that has no C++ meta kernel fails in that process; a run never makes one
  (its tensors are CPU tensors). CPU results are bit for bit the same (the tests compare the
  bytes of runs with and without it, and run the whole command suite with it).
* ``MONOQUANT_LAZY_META=0`` turns it off.

This module imports neither torch nor anything that does.

Example (a stand-in for a module of a package that is not imported yet):
    >>> import sys, tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp()); (d / "pkg_ts").mkdir()
    >>> _ = (d / "pkg_ts" / "__init__.py").write_text("from pkg_ts import heavy\\n")
    >>> _ = (d / "pkg_ts" / "heavy.py").write_text("LOADED = True\\n")
    >>> sys.path.insert(0, str(d))
    >>> defer("pkg_ts", "heavy")
    True
    >>> import pkg_ts
    >>> "LOADED" in vars(pkg_ts.heavy)      # bound by the package, not run
    False
    >>> pkg_ts.heavy.LOADED                 # the first read runs it
    True
    >>> sys.path.remove(str(d))
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import threading
import types
from collections.abc import Callable, Sequence

#: the environment variable that turns the deferral off (``0``)
ENV = "MONOQUANT_LAZY_META"
#: the torch versions (major.minor) whose import the test suite runs with the deferral
TESTED = ("2.13",)
#: what the real ``torch._meta_registrations`` imports that the rest of torch relies on
KEEP = ("torch._prims.rng_prims",)


def defer_meta_kernels() -> bool:
    """Defer ``torch._meta_registrations`` (see the module docstring); ``True`` when done.

    Call it before torch is first imported, in a process that makes no meta tensor operations.
    """
    if os.environ.get(ENV, "1") == "0" or torch_version() not in TESTED:
        return False
    return defer("torch", "_meta_registrations", first=KEEP)


def torch_version() -> str | None:
    """torch's installed ``major.minor``, read from ``torch/version.py`` (no import); ``None``
    where it cannot be read."""
    where = _package_dir("torch")
    if where is None:
        return None
    try:
        with open(os.path.join(where, "version.py"), encoding="utf-8") as f:
            m = re.search(r"^__version__\s*=\s*['\"](\d+)\.(\d+)", f.read(), re.M)
    except OSError:
        return None
    return f"{m.group(1)}.{m.group(2)}" if m else None


def defer(package: str, module: str, first: Sequence[str] = ()) -> bool:
    """Make the next import of the plain module ``package.module`` give a stand-in that runs the
    module on the first read of one of its attributes, after importing the modules ``first``
    (at that import). ``False`` (nothing done) where ``package`` is already imported, or the
    module's source file is not found, or it is already deferred."""
    name = f"{package}.{module}"
    if package in sys.modules or name in sys.modules:
        return False
    if any(isinstance(f, _Finder) and f.name == name for f in sys.meta_path):
        return False
    where = _package_dir(package)
    path = None if where is None else os.path.join(where, module + ".py")
    if path is None or not os.path.isfile(path):
        return False
    sys.meta_path.insert(0, _Finder(name, path, tuple(first)))
    return True


def _package_dir(package: str) -> str | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        return None
    return os.path.dirname(spec.origin)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``name`` once (then leaves ``sys.meta_path``), with :class:`_StandIn` as loader."""

    def __init__(self, name: str, path: str, first: tuple[str, ...]):
        self.name, self.path, self.first = name, path, first

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        return importlib.util.spec_from_file_location(fullname, self.path, loader=_StandIn(self))


class _StandIn(importlib.abc.Loader):
    """Runs ``first``, then gives the module a ``__getattr__`` that runs its real code once."""

    def __init__(self, finder: _Finder):
        self.finder = finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        for m in self.finder.first:
            importlib.import_module(m)
        real = importlib.machinery.SourceFileLoader(self.finder.name, self.finder.path)
        module.__getattr__ = _on_first_read(module, real)  # type: ignore[method-assign]


def _on_first_read(
    module: types.ModuleType, real: importlib.machinery.SourceFileLoader
) -> Callable[[str], object]:
    """The stand-in's ``__getattr__``: runs the real module in the stand-in's namespace once
    (under a lock: kernel threads may read it at the same time; other threads wait until it is
    done), then answers from it."""
    lock = threading.RLock()
    state = {"loading": False}

    def __getattr__(attr: str) -> object:
        with lock:
            if module.__dict__.get("__getattr__") is __getattr__ and not state["loading"]:
                state["loading"] = True
                try:
                    real.exec_module(module)
                finally:
                    if module.__dict__.get("__getattr__") is __getattr__:
                        del module.__dict__["__getattr__"]
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}") from None

    return __getattr__
