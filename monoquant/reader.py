"""Open a checkpoint without reading its weights, and read rows of one tensor at a time.

Inputs: a ``.safetensors`` file; a directory with ``model.safetensors.index.json`` (or any
``*.safetensors.index.json``); a directory of ``.safetensors`` files without an index; PyTorch
zip checkpoints (``.bin``/``.pt``, single or sharded with ``pytorch_model.bin.index.json``),
opened with ``torch.load(mmap=True, weights_only=True)`` — never an unsafe unpickle. Any of the
safetensors forms may also be a URL (``s3://bucket/model/``, see :mod:`monoquant.remote`): read by
byte ranges, never copied to local disk.

Safetensors headers are parsed here (the library does not expose byte ranges) and checked:
header length, JSON, dtypes, shape x dtype = byte range, offsets inside the file and not
overlapping; an index is cross-checked with the shard headers before any work starts.

Example:
    >>> ckpt = open_checkpoint("model_dir")                     # doctest: +SKIP
    >>> ref = ckpt.tensors[0]; ref.name, ref.dtype, ref.shape  # doctest: +SKIP
    >>> with RowReader(ckpt) as rd: x = rd.rows(ref, 0, 16)    # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import mmap
import os
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .containment import check_inside, index_entry
from .dtypes import from_st, itemsize
from .errors import CheckpointError
from .numerics import Workspace, as_rows
from .prefetch import ReadAhead, mapping_address
from .remote import RangeReader, RemotePath, is_remote
from .weightfiles import find_index, listed_weight_files, read_index, select_weight_files

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
Backend = Literal["mmap", "pread"]


@dataclass(frozen=True)
class TensorRef:
    """Where one input tensor lives.

    Attributes:
        name: tensor name.
        file: the file holding it.
        dtype, shape: as in the header.
        offset: absolute byte offset of its data in ``file`` (``-1`` for torch pickles).
        nbytes: size of its data.
    """

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_safetensors(self) -> bool:
        return self.offset >= 0


@dataclass
class Checkpoint:
    """An opened checkpoint: every tensor's location, in file order, plus side files."""

    root: Path
    tensors: list[TensorRef]
    files: list[Path]
    side_files: list[Path] = field(default_factory=list)
    index_metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def config(self) -> dict[str, Any] | None:
        p = self.root / "config.json" if self.root.is_dir() else None
        if p is None or not p.exists():
            return None
        check_inside(p, self.root, "config.json")
        try:
            cfg = json.loads(p.read_text())
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
            raise CheckpointError(f"{p}: config.json is not valid JSON ({e}); fix or remove it") from None
        return cfg if isinstance(cfg, dict) else None


# ---- safetensors headers ------------------------------------------------------------------------
def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header. Returns ``(entries, data_start)``."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes, no header); re-download it"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(
                    f"{path}: header length {n} is implausible (> 100 MB); the file is corrupt"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} runs beyond the file ({size} bytes); the file is "
                    "truncated or corrupt"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_header(raw, size - 8 - n, where=f"{path}: "), 8 + n


def parse_header(raw: bytes, data_len: int, *, where: str = "") -> dict[str, Any]:
    """Validate header bytes against a data section of ``data_len`` bytes.

    Returns ``{name: (dtype, shape, begin, end)}`` (``__metadata__`` dropped). Raises
    :class:`CheckpointError` — and nothing else — for any malformed input.
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(
            f"{where}header is not valid JSON; the file is corrupt or not safetensors"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}header is not a JSON object; the file is corrupt or not safetensors")
    out: dict[str, Any] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in obj.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}tensor {name!r}: header entry is not an object")
        dtype = from_st(info.get("dtype"), where=f"{where}tensor {name!r}: ")  # type: ignore[arg-type]
        shape = info.get("shape")
        offs = info.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(
                f"{where}tensor {name!r}: shape {shape!r} is not a list of non-negative integers"
            )
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
            raise CheckpointError(f"{where}tensor {name!r}: data_offsets {offs!r} is not [begin, end]")
        begin, end = offs
        if not 0 <= begin <= end:
            raise CheckpointError(f"{where}tensor {name!r}: data_offsets {offs} are not ordered")
        if end > data_len:
            raise CheckpointError(
                f"{where}tensor {name!r}: data ends at byte {end} but the data section has {data_len} bytes; "
                "the file is truncated"
            )
        want = math.prod(shape) * itemsize(dtype)
        if end - begin != want:
            raise CheckpointError(
                f"{where}tensor {name!r}: shape {shape} x {info['dtype']} needs {want} bytes but "
                "data_offsets "
                f"span {end - begin}; the header is corrupt"
            )
        out[name] = (dtype, tuple(shape), begin, end)
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise CheckpointError(
                f"{where}tensors {n0!r} and {n1!r} overlap in the file; the header is corrupt"
            )
    return out


def _safetensors_refs(path: Path) -> list[TensorRef]:
    entries, start = read_header(path)
    refs = [TensorRef(n, path, d, s, start + b, e - b) for n, (d, s, b, e) in entries.items()]
    refs.sort(key=lambda r: r.offset)
    return refs


# ---- torch pickles --------------------------------------------------------------------------
def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(mmap=True, weights_only=True)`` with clear errors; returns a flat state dict."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a zip-format torch checkpoint (legacy format or corrupt); re-save it with "
            "torch.save(...) (torch >= 1.6) or convert it to safetensors"
        )
    try:
        with (
            warnings.catch_warnings()
        ):  # torch's deprecation chatter on odd tensors: the library never prints
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused: not a weights-only pickle ({_unpickle_reason(e)}); loading it fully "
            "could execute "
            "arbitrary code from the file, and monoquant never runs pickle code: if you trust its "
            "source, re-save it "
            "as safetensors in a separate environment"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot load torch checkpoint ({msg}); the file is truncated or corrupt"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(
                f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; save a plain state dict"
            )
        if v.layout != torch.strided or v.is_meta or v.is_quantized:
            kind = (
                "on the meta device (no data)"
                if v.is_meta
                else f"a {v.layout} tensor"
                if v.layout != torch.strided
                else f"a torch-quantized {v.dtype} tensor"
            )
            raise CheckpointError(
                f"{path}: tensor {k!r} is {kind}; save dense tensors with data (.to_dense(), .dequantize())"
            )
    return obj


def _unpickle_reason(e: Exception) -> str:
    """The useful part of torch's weights-only refusal, as one complete clause (its advice to
    allowlist the global does not apply: that would run the pickle's code)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it needs the global {m.group(1)}, which a weights-only load blocks"
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    reason = m.group(1) if m else (text.strip().splitlines() or ["unpickling refused"])[0]
    reason = re.split(r"(?<=[a-z0-9)])\. ", reason.strip(), maxsplit=1)[0].rstrip(".")  # the first sentence
    return reason if len(reason) <= 160 else reason[:157].rsplit(" ", 1)[0] + " ..."


def _torch_refs(path: Path) -> list[TensorRef]:
    sd = load_torch_file(path)
    return [
        TensorRef(n, path, t.dtype, tuple(t.shape), -1, t.numel() * t.element_size()) for n, t in sd.items()
    ]


# ---- opening a checkpoint -------------------------------------------------------------------
def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint file or directory, reading headers only, and check its consistency.

    Raises:
        CheckpointError: missing path, no weights, malformed headers, index inconsistencies
            (tensor missing from its shard, in two shards, a shard absent, ...).
    """
    root: Any = RemotePath.from_url(path) if is_remote(path) else Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory")
    if root.is_file():
        refs = _refs_of(root)
        _check_unique(refs)
        _check_not_empty(root, refs)
        return Checkpoint(root, refs, [root])
    index_path = find_index(root)
    if index_path is not None:
        return _open_indexed(root, index_path)
    files, notes = select_weight_files(root, listed_weight_files(root))
    for f in files:
        check_inside(f, root, "weight file")
    if not files:
        raise CheckpointError(
            f"{root}: no weights found (no *.safetensors, *.bin or *.pt files, no index); point "
            "monoquant at a "
            "checkpoint directory or file"
        )
    refs = [r for f in files for r in _refs_of(f)]
    _check_unique(refs)
    _check_not_empty(root, refs)
    return Checkpoint(root, refs, files, _side_files(root, set(files)), notes=notes)


def _refs_of(path: Path) -> list[TensorRef]:
    if path.suffix == ".safetensors":
        return _safetensors_refs(path)
    if is_remote(path) and path.suffix in (".bin", ".pt", ".pth"):
        raise CheckpointError(
            f"{path}: a torch {path.suffix} checkpoint cannot be read from object storage (torch.load "
            "needs a local "
            "file); convert it to safetensors, or download it and point monoquant at the local copy"
        )
    if path.suffix in (".bin", ".pt", ".pth"):
        return _torch_refs(path)
    raise CheckpointError(f"{path}: unknown weight file type (expected .safetensors, .bin or .pt)")


def _check_unique(refs: list[TensorRef]) -> None:
    seen: dict[str, Path] = {}
    for r in refs:
        if r.name in seen and seen[r.name] != r.file:
            raise CheckpointError(
                f"tensor {r.name!r} is in two files, {seen[r.name].name} and {r.file.name}; remove the "
                "stale shard"
            )
        seen[r.name] = r.file


def _check_not_empty(where: Path, refs: list[TensorRef]) -> None:
    if not refs:
        raise CheckpointError(
            f"{where}: holds no tensors; nothing to quantize (is this the right checkpoint?)"
        )


def _open_indexed(root: Path, index_path: Path) -> Checkpoint:
    index = read_index(root, index_path)
    wmap: dict[str, str] = index["weight_map"]
    shards = sorted(set(wmap.values()))
    files = []
    entry_of: dict[Path, str] = {}  # file -> the index entry naming it (``sub/x.safetensors`` allowed inside)
    for s in shards:
        p = index_entry(root, s, index_path.name)
        if not p.is_file():
            raise CheckpointError(
                f"{index_path.name} names shard {s!r}, which is missing from {root}; download it"
            )
        if p in entry_of:
            raise CheckpointError(
                f"{index_path.name} names one shard file twice ({entry_of[p]!r}, {s!r}); the index is corrupt"
            )
        files.append(p)
        entry_of[p] = s
    refs: list[TensorRef] = []
    by_file: dict[str, set[str]] = {}
    for p in files:
        rs = _refs_of(p)
        by_file[entry_of[p]] = {r.name for r in rs}
        refs.extend(rs)
    owners: dict[str, list[str]] = {}
    for r in refs:
        owners.setdefault(r.name, []).append(r.file.name)
    for name, fs in owners.items():
        if len(fs) > 1:
            raise CheckpointError(
                f"tensor {name!r} is in two shards ({', '.join(fs)}); the checkpoint is inconsistent"
            )
    for name, shard in wmap.items():
        if name not in by_file[shard]:
            raise CheckpointError(
                f"{index_path.name} puts tensor {name!r} in {shard}, but that shard does not hold it; "
                "the index and shards do not match"
            )
    for r in refs:
        if wmap.get(r.name) != entry_of[r.file]:
            raise CheckpointError(
                f"tensor {r.name!r} in {r.file.name} is not listed in {index_path.name}; the index and "
                "shards do not match"
            )
    _check_not_empty(index_path, refs)
    meta = index.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return Checkpoint(root, refs, files, _side_files(root, set(files) | {index_path}), meta)


def _side_files(root: Path, weights: set[Path]) -> list[Path]:
    """Non-weight files to copy to the output (config, tokenizer, README, ...), recursively,
    skipping hidden entries and other weight files or indexes."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or p in weights:
            continue
        if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"):
            continue
        check_inside(p, root, "side file")  # a symlink to /etc/passwd must not be published
        out.append(p)
    return out


# ---- reading rows -------------------------------------------------------------------------------
class RowReader:
    """Reads blocks of rows of input tensors, one open file at a time.

    ``backend="mmap"`` maps the file and hands out zero-copy views, then drops the consumed
    pages from this process (``madvise(DONTNEED)``). ``backend="pread"`` reads into a buffer
    reused across blocks. Torch pickles are read through their ``mmap=True`` load.

    ``readahead`` (bytes, default 0: off) keeps that many bytes beyond the last block handed out
    coming from disk on a background thread (:class:`~monoquant.prefetch.ReadAhead`), for a
    reader that goes through the files in order, as the pipeline does; a reader that samples
    rows here and there should leave it off. Local safetensors files only.
    """

    def __init__(self, backend: Backend = "mmap", ws: Workspace | None = None, readahead: int = 0):
        if backend not in ("mmap", "pread"):
            raise CheckpointError(f"unknown read backend {backend!r} (mmap or pread)")
        self.backend = backend
        self.ws = ws or Workspace()
        self._ahead: ReadAhead | None = ReadAhead(readahead) if readahead > 0 else None
        self._path: Path | None = None
        self._fd = -1
        self._mm: mmap.mmap | None = None
        self._sd: dict[str, torch.Tensor] | None = None
        self._size = 0
        self._remote: RangeReader | None = None

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._ahead is not None:
            self._ahead.close()

    def close(self) -> None:
        """Close the current file (the reader stays usable: the next read opens its file)."""
        if self._ahead is not None:
            self._ahead.detach()  # before the fd is closed and the mapping goes
        self._sd = None
        if self._remote is not None:
            self._remote.close()
            self._remote = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere; the GC will unmap it
                pass
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._path = None

    def _open(self, ref: TensorRef) -> None:
        if self._path == ref.file:
            return
        self.close()
        self._path = ref.file
        if isinstance(ref.file, RemotePath):
            self._remote = RangeReader(ref.file)
            return
        if not ref.is_safetensors:
            self._size = os.stat(ref.file).st_size
            self._sd = load_torch_file(ref.file)
            return
        try:
            self._fd = os.open(ref.file, os.O_RDONLY)
            size = os.fstat(self._fd).st_size
            if self.backend == "mmap" and size > 0:
                self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise CheckpointError(f"{ref.file}: cannot open ({e.strerror or e})") from None
        if self._ahead is not None:
            self._ahead.attach(self._fd, size, mapping_address(self._mm) if self._mm is not None else 0)

    def file_identity(self) -> tuple[int, int] | None:
        """``(device, inode)`` of the file this reader has mapped now (``None`` when it maps
        none: ``pread``, torch pickles, object storage), so that another process can map the very
        same file (:mod:`monoquant.kernelproc`)."""
        if self._mm is None or self._fd < 0:
            return None
        st = os.fstat(self._fd)
        return st.st_dev, st.st_ino

    def rows(self, ref: TensorRef, start: int, stop: int, ws: Workspace | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of ``ref`` as a 2-D tensor: a view of the mapped file, or (pread)
        of a buffer of ``ws`` (default: the reader's own), valid until that buffer is reused."""
        self._open(ref)
        rows, cols = as_rows(ref.shape)
        n = (stop - start) * cols
        if not ref.is_safetensors:
            assert self._sd is not None
            self._check_size(ref, self._size)
            t = self._sd[ref.name]
            return t.reshape(rows, cols)[start:stop] if t.dim() != 2 else t[start:stop]
        off = ref.offset + start * cols * itemsize(ref.dtype)
        nbytes = n * itemsize(ref.dtype)
        if n == 0:
            return torch.empty((stop - start, cols), dtype=ref.dtype)
        if self._ahead is not None:
            self._ahead.consumed(off + nbytes)
        if self._mm is not None:
            self._check_size(ref, off + nbytes)
            try:
                t = torch.frombuffer(self._mm, dtype=ref.dtype, count=n, offset=off)
            except (ValueError, RuntimeError) as e:
                raise CheckpointError(
                    f"{ref.file}: tensor {ref.name!r} lies beyond the end of the file ({e})"
                ) from None
            return t.view(stop - start, cols)
        buf = (ws or self.ws).get("read", nbytes, torch.uint8)
        _read_into(self, buf, off, ref)
        return buf.view(ref.dtype).view(stop - start, cols)

    def raw(self, ref: TensorRef, start: int, nbytes: int, ws: Workspace | None = None) -> torch.Tensor:
        """Bytes ``[start, start+nbytes)`` of a tensor's data as a uint8 tensor (copy path)."""
        self._open(ref)
        if not ref.is_safetensors:
            assert self._sd is not None
            self._check_size(ref, self._size)
            t = self._sd[ref.name].contiguous().reshape(-1).view(torch.uint8)
            return t[start : start + nbytes]
        if self._ahead is not None:
            self._ahead.consumed(ref.offset + start + nbytes)
        if self._mm is not None:
            self._check_size(ref, ref.offset + start + nbytes)
            return torch.frombuffer(self._mm, dtype=torch.uint8, count=nbytes, offset=ref.offset + start)
        buf = (ws or self.ws).get("read", nbytes, torch.uint8)
        _read_into(self, buf, ref.offset + start, ref)
        return buf

    def _check_size(self, ref: TensorRef, end: int) -> None:
        """Touching a mapped page beyond the end of a file that shrank kills the process with
        SIGBUS; so before handing out a mapped block, check that the file still holds it (one
        fstat per block). A file truncated between this check and the use of the block can still
        SIGBUS; ``--backend pread`` reads with system calls only and gives this error always."""
        try:
            size = os.fstat(self._fd).st_size if self._fd >= 0 else os.stat(ref.file).st_size
        except OSError as e:
            raise CheckpointError(f"{ref.file}: cannot read ({e.strerror or e})") from None
        if size < end:
            raise CheckpointError(
                f"{ref.file}: tensor {ref.name!r} is cut short: the file shrank to {size} bytes while "
                "being read "
                "(truncated or overwritten); restore the file and rerun the same command"
            )

    def release(self, ref: TensorRef, start_byte: int, stop_byte: int) -> None:
        """Drop consumed pages of ``ref``'s byte range from this process's mapping."""
        if self._mm is None or self._path != ref.file:
            return
        page = mmap.PAGESIZE
        lo = -(-(ref.offset + start_byte) // page) * page
        hi = ((ref.offset + stop_byte) // page) * page
        if hi > lo:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError, AttributeError):
                pass


def _read_into(reader: RowReader, buf: torch.Tensor, offset: int, ref: TensorRef) -> None:
    if reader._remote is not None:
        if buf.numel():
            reader._remote.read_into(
                memoryview((ctypes.c_char * buf.numel()).from_address(buf.data_ptr())).cast("B"), offset
            )
        return
    _pread_into(reader._fd, buf, offset, ref)


def _pread_into(fd: int, buf: torch.Tensor, offset: int, ref: TensorRef) -> None:
    view = (ctypes.c_char * buf.numel()).from_address(buf.data_ptr())
    mv = memoryview(view).cast("B")
    done = 0
    while done < len(mv):
        got = os.preadv(fd, [mv[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(
                f"{ref.file}: tensor {ref.name!r} is cut short (file truncated); re-download it"
            )
        done += got
