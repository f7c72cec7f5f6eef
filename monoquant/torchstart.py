"""A faster ``import torch`` for a command's own process: torch's Python meta kernels load on use.

``monoquant stream`` spends its first 1.5-2.5 s importing torch, on one core, before it reads a
byte; a fifth to a quarter of that is one module, ``torch._meta_registrations``, with what it
imports (``torch._decomp``, ``torch._refs``, ``torch._prims``). That module registers Python
kernels for the ``Meta`` device (shape inference without data, used by ``torch.compile``,
``torch.export`` and fake tensors) and nothing else: no CPU kernel, nothing a quantization run
calls. :func:`defer_meta_kernels`, called before the first import of torch, puts a stand-in
for it into ``sys.modules``; torch's own ``from torch import _meta_registrations`` then binds the
stand-in, and the real module runs the moment anything reads one of its attributes (the
stand-in's PEP 562 ``__getattr__``), as a lazy import does.

What this changes, and why it is confined:

* **Only a command's own process** (``monoquant.cli.entry``, for ``stream``): never the Python
  API, whose callers may use meta tensors or ``torch.compile`` in the same interpreter.
* **Meta kernels written in Python are missing until the module is touched.** An operation on
  a ``meta`` tensor that has no C++ meta kernel fails in that process; a run never makes one
  (its tensors are CPU tensors; the one meta tensor monoquant makes, in ``verify``, is
  ``torch.empty``, a C++ kernel). CPU results are bit for bit the same: the module registers
  nothing for the CPU (the tests compare the bytes of runs with and without it).
* **Nothing is assumed about torch's version.** Where the module's file is not where torch's
  package says, or torch is already imported, nothing is done; where a later torch reads the
  module during its import, the stand-in loads it then (no gain, no harm).
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

import importlib.machinery
import importlib.util
import os
import sys
import threading
import types

#: the environment variable that turns the deferral off (``0``)
ENV = "MONOQUANT_LAZY_META"


def defer_meta_kernels() -> bool:
    """Defer ``torch._meta_registrations`` (see the module docstring); ``True`` when done.

    Call it before torch is first imported, in a process that makes no meta tensor operations.
    """
    if os.environ.get(ENV, "1") == "0":
        return False
    return defer("torch", "_meta_registrations")


def defer(package: str, module: str) -> bool:
    """Put a stand-in for the plain module ``package.module`` into ``sys.modules``, to be run on
    the first read of one of its attributes; ``False`` (nothing done) where ``package`` is
    already imported, ``package.module`` too, or its source file is not found."""
    name = f"{package}.{module}"
    if package in sys.modules or name in sys.modules:
        return False
    try:
        root = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    if root is None or root.origin is None or not root.submodule_search_locations:
        return False
    path = os.path.join(os.path.dirname(root.origin), module + ".py")
    if not os.path.isfile(path):
        return False
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return False
    stand_in = importlib.util.module_from_spec(spec)
    stand_in.__getattr__ = _loader(stand_in, spec)  # type: ignore[method-assign]
    sys.modules[name] = stand_in
    return True


def _loader(stand_in: types.ModuleType, spec: importlib.machinery.ModuleSpec) -> object:
    """The stand-in's ``__getattr__``: runs the real module in the stand-in's namespace once
    (under a lock: kernel threads may touch it at the same time), then answers from it."""
    lock = threading.Lock()

    def __getattr__(attr: str) -> object:
        with lock:
            if stand_in.__dict__.get("__getattr__") is __getattr__:
                del stand_in.__dict__["__getattr__"]
                assert spec.loader is not None
                spec.loader.exec_module(stand_in)
        try:
            return stand_in.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {spec.name!r} has no attribute {attr!r}") from None

    return __getattr__
