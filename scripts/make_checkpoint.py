#!/usr/bin/env python3
"""Write a synthetic Llama-like sharded safetensors checkpoint with bounded memory.

    python scripts/make_checkpoint.py OUT --size-gb 4 [--dtype bf16] [--shard-size-gb 1]
                                          [--big-tensor-gb B] [--vocab V] [--seed 0]

The layout follows a Llama-3.2-1B-like model (hidden 2048, FFN 8192, 32 heads / 8 KV heads,
vocabulary 128256, untied ``lm_head``); the number of decoder layers is chosen so the checkpoint
holds about ``--size-gb`` GB (1e9 bytes). Names, ``model.safetensors.index.json`` (with
``metadata.total_size``) and ``config.json`` are the ones transformers writes, so the result
loads as a ``LlamaForCausalLM`` state dict.

Weights are deterministic: for each tensor a generator is seeded from ``--seed`` and the crc32
of the tensor name, and each row chunk from that seed and the chunk number. Values are
N(0, 1/fan_in) times a per-row log-normal gain, with about 0.2 % of input columns scaled
10-30x (outlier features, as in real LLM weights). Norm weights are 1 + small noise.

Memory stays bounded whatever the size: every shard's header is computed from shapes first,
then each tensor is generated and written in row chunks of about 8 MiB (a tensor is never
whole in RAM). ``--big-tensor-gb B`` sets the vocabulary so ``embed_tokens`` and ``lm_head``
each hold at least B GB (e.g. ``--big-tensor-gb 2.2`` gives two 2.2 GB tensors, each over
2 GiB); such a tensor gets a shard of its own when it exceeds the shard size, as in
transformers. Prints one JSON line (files, tensors, bytes, seconds, peak RSS).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import struct
import sys
import time
import zlib
from pathlib import Path

import torch

DTYPES = {
    "bf16": (torch.bfloat16, "BF16"),
    "fp16": (torch.float16, "F16"),
    "fp32": (torch.float32, "F32"),
}
CHUNK_BYTES = 8 * 1024 * 1024
ALIGN = 8  # safetensors pads the header so data starts 8-byte aligned
Shapes = list[tuple[str, tuple[int, ...]]]


def layer_shapes(i: int, hidden: int, ffn: int, heads: int, kv_heads: int) -> Shapes:
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (hidden,)),
        (p + "mlp.down_proj.weight", (hidden, ffn)),
        (p + "mlp.gate_proj.weight", (ffn, hidden)),
        (p + "mlp.up_proj.weight", (ffn, hidden)),
        (p + "post_attention_layernorm.weight", (hidden,)),
        (p + "self_attn.k_proj.weight", (kv, hidden)),
        (p + "self_attn.o_proj.weight", (hidden, hidden)),
        (p + "self_attn.q_proj.weight", (hidden, hidden)),
        (p + "self_attn.v_proj.weight", (kv, hidden)),
    ]


def model_shapes(args: argparse.Namespace, itemsize: int) -> tuple[Shapes, dict]:
    """Tensor names and shapes in state-dict order, and the config."""
    h, ffn, heads, kvh = args.hidden, args.ffn, args.heads, args.kv_heads
    vocab = args.vocab
    if args.big_tensor_gb:
        want = math.ceil(args.big_tensor_gb * 1e9 / (h * itemsize))
        vocab = max(vocab, -(-want // 128) * 128)
    per_layer = sum(math.prod(s) for _, s in layer_shapes(0, h, ffn, heads, kvh)) * itemsize
    vocab_bytes = 2 * vocab * h * itemsize + h * itemsize
    target = args.size_gb * 1e9
    n_layers = round((target - vocab_bytes) / per_layer)
    if n_layers < 1:
        raise SystemExit(
            f"--size-gb {args.size_gb}: the embeddings alone take {vocab_bytes / 1e9:.2f} GB; "
            f"use a smaller --vocab (e.g. 32000) or a larger size"
        )
    shapes: Shapes = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(n_layers):
        shapes += layer_shapes(i, h, ffn, heads, kvh)
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": kvh,
        "head_dim": h // heads,
        "num_hidden_layers": n_layers,
        "vocab_size": vocab,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[args.dtype],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "_synthetic": {"generator": "monoquant scripts/make_checkpoint.py", "seed": args.seed},
    }
    return shapes, config


def split_shards(shapes: Shapes, itemsize: int, max_bytes: float) -> list[list[int]]:
    """transformers' rule: start a new shard when the next tensor would overflow the current one
    (a tensor larger than the cap gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, s) in enumerate(shapes):
        n = math.prod(s) * itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def header_bytes(entries: Shapes, st_dtype: str, itemsize: int) -> tuple[bytes, list[int]]:
    """Safetensors header (tensors sorted by name, as save_file does for one dtype) and the data
    offset of each entry in the given order."""
    order = sorted(range(len(entries)), key=lambda i: entries[i][0])
    head: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets = [0] * len(entries)
    pos = 0
    for i in order:
        name, shape = entries[i]
        n = math.prod(shape) * itemsize
        head[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[i] = pos
        pos += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return raw, offsets


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF


def gen_chunks(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int):
    """Yield the tensor's rows as chunks (each about CHUNK_BYTES), deterministically."""
    base = tensor_seed(seed, name)
    g = torch.Generator().manual_seed(base)
    if len(shape) == 1:
        (n,) = shape
        yield (1.0 + 0.02 * torch.randn(n, generator=g)).to(dtype)
        return
    rows, cols = shape
    gain = torch.exp(0.3 * torch.randn(rows, 1, generator=g))  # per-row log-normal gain
    col_scale = torch.ones(cols)
    n_out = max(1, round(cols * 0.002))
    idx = torch.randperm(cols, generator=g)[:n_out]
    col_scale[idx] = 10.0 + 20.0 * torch.rand(n_out, generator=g)  # outlier input columns x10-30
    std = 1.0 / math.sqrt(cols)
    chunk_rows = max(1, CHUNK_BYTES // (4 * cols))
    buf = torch.empty(chunk_rows, cols)
    out = torch.empty(chunk_rows, cols, dtype=dtype)
    for k, a in enumerate(range(0, rows, chunk_rows)):
        b = min(rows, a + chunk_rows)
        cg = torch.Generator().manual_seed((base * 65_537 + k) & 0x7FFF_FFFF_FFFF_FFFF)
        x = buf[: b - a]
        torch.randn(x.shape, generator=cg, out=x)
        x.mul_(gain[a:b] * std).mul_(col_scale)
        o = out[: b - a]
        o.copy_(x)
        yield o


def tensor_bytes(t: torch.Tensor) -> memoryview:
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def write_all(fd: int, mv: memoryview) -> None:
    done = 0
    while done < len(mv):
        done += os.write(fd, mv[done:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out", type=Path, help="output directory (created; must not exist or be empty)")
    ap.add_argument("--size-gb", type=float, required=True, help="approximate total size in GB (1e9 bytes)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--shard-size-gb", type=float, default=1.0, help="shard size cap in GB (default 1)")
    ap.add_argument(
        "--big-tensor-gb",
        type=float,
        default=0.0,
        help="make embed_tokens and lm_head at least this many GB each (vocabulary grows)",
    )
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for generation (default 1)")
    ap.add_argument("--no-fsync", action="store_true", help="do not fsync the shards at the end")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dtype, st_dtype = DTYPES[args.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    shapes, config = model_shapes(args, itemsize)
    shards = split_shards(shapes, itemsize, args.shard_size_gb * 1e9)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    files = []
    for si, idxs in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{n:05d}.safetensors"
        entries = [shapes[i] for i in idxs]
        head, offsets = header_bytes(entries, st_dtype, itemsize)
        data_start = 8 + len(head)
        path = out / fname
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, memoryview(struct.pack("<Q", len(head)) + head))
            # write in file order (by name) so the file grows sequentially
            for j in sorted(range(len(entries)), key=lambda j: offsets[j]):
                name, shape = entries[j]
                pos = data_start + offsets[j]
                os.lseek(fd, pos, os.SEEK_SET)
                for chunk in gen_chunks(name, shape, dtype, args.seed):
                    write_all(fd, tensor_bytes(chunk))
                weight_map[name] = fname
                total += math.prod(shape) * itemsize
            if not args.no_fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        files.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": 1, "eos_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    biggest = max(shapes, key=lambda s: math.prod(s[1]))
    print(
        json.dumps(
            {
                "out": str(out),
                "shards": n,
                "tensors": len(shapes),
                "layers": config["num_hidden_layers"],
                "vocab": config["vocab_size"],
                "bytes": total,
                "gb": round(total / 1e9, 3),
                "largest_tensor": {
                    "name": biggest[0],
                    "shape": list(biggest[1]),
                    "bytes": math.prod(biggest[1]) * itemsize,
                },
                "shard_bytes": [os.path.getsize(out / f) for f in files],
                "seconds": round(time.perf_counter() - t0, 2),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
