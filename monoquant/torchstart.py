"""A faster ``import torch`` for a command's own process: torch's Python meta kernels load on use.

``monoquant stream`` spends its first 1.5-2.5 s importing torch, on one core, before it reads a
byte; about a sixth of that is one module, ``torch._meta_registrations``, with ``torch._decomp``
and ``torch._refs`` that it imports. It registers Python kernels for the ``Meta`` device (shape
inference without data, used by ``torch.compile``, ``torch.export`` and fake tensors; ``_refs``
adds one MPS kernel): no CPU kernel, nothing a quantization run calls.
:func:`defer_meta_kernels`, called before the first import of torch, hands torch's own ``from
torch import _meta_registrations`` a stand-in; the real module runs the moment anything reads
one of its attributes (the stand-in's PEP 562 ``__getattr__``), as a lazy import does.

What this changes, and why it is confined:

* **Only a command's own process** (``monoquant.cli.entry``, for ``stream``): never the Python
  API, whose callers may use meta tensors or ``torch.compile`` in the same interpreter.
* **Only the torch releases the tests run** (:data:`TESTED`, read from ``torch/version.py``
  without importing it; not pre-releases or nightlies). A module torch imports can carry
  effects the rest of torch relies on, and torch 2.13 has two kinds. ``torch.Generator()``
  fails unless ``torch._prims.rng_prims`` has run (it sets the class's metaclass): the stand-in
  imports it (:data:`KEEP`) at the point of torch's import where the real module would, so what
  comes after (device plugins loaded at the end of the import included) finds it done. And
  ``torch.broadcast_shapes`` reads ``torch._refs`` as an attribute of torch: :func:`finish_import`,
  called after the import, makes ``torch._refs`` and ``torch._decomp`` (:data:`LAZY`) load on
  their first read, through torch's own table of lazy submodules. Another version may have
  other such effects: it gets the plain import.
* **Meta kernels written in Python are missing until the module is touched.** An operation on
  a ``meta`` tensor that has no C++ meta kernel fails in that process; a run never makes one
  (its tensors are CPU tensors). The kernels registered for the CPU are the same. The tests
  compare the bytes a command writes in its own process with and without the deferral, and
  the results of torch's CPU operations in fresh interpreters; the whole suite was also run
  once in a process with it (``docs/benchmarks.md``).
* ``MONOQUANT_LAZY_META=0`` (exactly ``0``) turns it off.

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
#: what the real ``torch._meta_registrations`` imports that the rest of torch relies on while it
#: loads (``torch.Generator()`` needs ``rng_prims`` to have run)
KEEP = ("torch._prims.rng_prims",)
#: what it imports that torch reads later as attributes of itself (``torch.broadcast_shapes``
#: calls ``torch._refs._broadcast_shapes``; ``torch.nn.functional`` names ``torch._decomp``):
#: after the import they load on first read, through torch's own table of lazy submodules
LAZY = ("_refs", "_decomp")


def defer_meta_kernels() -> bool:
    """Defer ``torch._meta_registrations`` (see the module docstring); ``True`` when done.

    Call it before torch is first imported, in a process that makes no meta tensor operations.
    """
    if os.environ.get(ENV, "1") == "0" or torch_version() not in TESTED:
        return False
    return defer("torch", "_meta_registrations", first=KEEP)


def finish_import() -> None:
    """After the first import of torch, where :func:`defer_meta_kernels` deferred: the modules of
    :data:`LAZY` that are not loaded yet load when torch's attribute of that name is first read
    (torch's ``_lazy_modules``, which its module ``__getattr__`` consults); where torch has no such
    table, they are imported now."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    # a finder torch never asked (a version that does not import the module) goes too
    sys.meta_path[:] = [
        f for f in sys.meta_path if not (isinstance(f, _Finder) and f.name.startswith("torch."))
    ]
    stand_in = sys.modules.get("torch._meta_registrations")
    if not isinstance(getattr(stand_in, "__loader__", None), _StandIn):
        return  # nothing deferred
    missing = [n for n in LAZY if f"torch.{n}" not in sys.modules]
    table = getattr(torch, "_lazy_modules", None)
    if isinstance(table, set):
        table.update(missing)
    else:
        for n in missing:
            importlib.import_module(f"torch.{n}")


def torch_version() -> str | None:
    """torch's installed ``major.minor``, read from ``torch/version.py`` (no import); ``None``
    where it cannot be read or is not a release (``2.13.0a0+git...``, ``2.13.0.dev...``): e.g.
    ``"2.13"`` for ``__version__ = '2.13.0+cpu'``."""
    where = _package_dir("torch")
    if where is None:
        return None
    try:
        with open(os.path.join(where, "version.py"), encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError):  # ValueError: not UTF-8
        return None
    # a release (a local label such as +cpu or +cu128 allowed), not a pre-release or nightly
    m = re.search(r"^__version__\s*=\s*['\"](\d+)\.(\d+)\.\d+(\+[\w.]+)?['\"]\s*$", text, re.M)
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
    done; not where something already ran it, as ``importlib.reload`` does), then answers from
    it. Where the real module raises, this and every later read raise an :class:`ImportError`
    from that error."""
    lock = threading.RLock()
    state: dict[str, object] = {"loading": False, "error": None}

    def __getattr__(attr: str) -> object:
        with lock:
            if state["error"] is not None:  # every read says why, not "no attribute"
                raise ImportError(f"{module.__name__} failed to load") from state["error"]  # type: ignore[misc]
            loaded = any(not k.startswith("__") for k in module.__dict__)  # e.g. by importlib.reload
            if module.__dict__.get("__getattr__") is __getattr__ and not state["loading"]:
                state["loading"] = True
                try:
                    if not loaded:
                        real.exec_module(module)
                except BaseException as e:
                    state["error"] = e
                    # an ImportError, never an AttributeError (hasattr would hide it)
                    raise ImportError(f"{module.__name__} failed to load: {e}") from e
                finally:
                    if state["error"] is None and module.__dict__.get("__getattr__") is __getattr__:
                        del module.__dict__["__getattr__"]
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}") from None

    return __getattr__
