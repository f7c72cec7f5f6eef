#!/usr/bin/env python3
"""Throughput and peak memory of ``monoquant stream s3://...`` against a local S3 protocol server.

Starts moto's server mode on 127.0.0.1 (``tests/s3server.py``; needs the test extra), uploads a
synthetic checkpoint made by ``scripts/make_checkpoint.py``, then runs, each as its own process:

* ``local``: ``monoquant stream CKPT out/`` from the local disk (warm page cache), the reference;
* ``s3``: ``monoquant stream s3://bucket/ckpt out/`` for every read window ``CHUNK:AHEAD``
  (``MONOQUANT_REMOTE_CHUNK`` bytes per range request, ``MONOQUANT_REMOTE_AHEAD`` requests ahead);
* ``read-only``: the same range reads without quantizing (what the server delivers to one
  reader with that window: the ceiling for the ``s3`` runs).

Prints one JSON line per run: case, scheme, window, wall seconds (fork to ``wait4``), input GB/s,
peak RSS (``wait4`` rusage), what ``monoquant --json`` reports about itself (peak RSS / RssAnon),
and whether the output is byte-identical to the local run. The server runs on the same machine
and competes for its cores; and moto reads a whole object for every range request it answers, so
its cost per request grows with the object size (hence the small default shards, 64 MB). The
figures are a floor for a real bucket, and ``read-only`` shows how much of them is the server.

Examples:

    python scripts/bench_remote.py --size-gb 1 --windows 8M:4,2M:4,8M:0,32M:4
    python scripts/bench_remote.py --size-gb 0.5 --schemes int8,int4 --log /tmp/remote.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.s3server import S3Server  # noqa: E402


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(s[:-1]) * mult[s[-1].upper()]) if s[-1].upper() in mult else int(s)


def digest_dir(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int, str, str]:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    import threading

    def pump(stream, sink):  # type: ignore[no-untyped-def]
        for line in stream:
            sink.append(line)

    ts = [
        threading.Thread(target=pump, args=(p.stdout, out_chunks)),
        threading.Thread(target=pump, args=(p.stderr, err_chunks)),
    ]
    for t in ts:
        t.start()
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    for t in ts:
        t.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return wall, p.returncode, ru.ru_maxrss * 1024, "".join(out_chunks), "".join(err_chunks)


READ_ONLY = r"""
import json, sys, time
from monoquant.reader import open_checkpoint
from monoquant.remote import RangeReader
ck = open_checkpoint(sys.argv[1])
t0 = time.perf_counter(); n = 0; reqs = 0
block = 4 << 20
buf = bytearray(block)
for f in ck.files:
    rd = RangeReader(f)
    try:
        for off in range(0, f.size, block):
            m = min(block, f.size - off)
            rd.read_into(memoryview(buf)[:m], off)
            n += m
        reqs += rd.requests
    finally:
        rd.close()
print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0, "requests": reqs}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size (made by make_checkpoint.py)")
    ap.add_argument(
        "--ckpt", type=Path, default=None, help="use this checkpoint directory instead of making one"
    )
    ap.add_argument("--shard-size-gb", type=float, default=0.064, help="input shard (object) size")
    ap.add_argument("--schemes", default="int8")
    ap.add_argument("--windows", default="8M:4,2M:4,8M:0,32M:4", help="CHUNK:AHEAD read windows to try")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--auth", action="store_true", help="server checks signatures and IAM policies (slower)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mqbench-remote"))
    ap.add_argument("--log", type=Path, default=None)
    a = ap.parse_args()

    a.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = a.ckpt
    if ckpt is None:
        ckpt = a.workdir / f"ckpt-{a.size_gb:g}-{a.shard_size_gb:g}"
        if not (ckpt / "model.safetensors.index.json").exists():
            subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "scripts" / "make_checkpoint.py"),
                    str(ckpt),
                    "--size-gb",
                    str(a.size_gb),
                    "--vocab",
                    "32000",
                    "--shard-size-gb",
                    str(a.shard_size_gb),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
    in_bytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    mq = [sys.executable, "-m", "monoquant"]
    base_env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def emit(rec: dict) -> None:  # type: ignore[type-arg]
        line = json.dumps(rec)
        print(line, flush=True)
        if a.log:
            with open(a.log, "a") as f:
                f.write(line + "\n")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    with S3Server(auth=a.auth) as srv:
        t0 = time.perf_counter()
        url = srv.upload_dir(ckpt, "bench/ckpt")
        emit({"case": "upload", "bytes": in_bytes, "seconds": round(time.perf_counter() - t0, 2)})
        env_s3 = {**base_env, **srv.env}
        for scheme in a.schemes.split(","):
            ref_digest = None
            for rep in range(a.repeats):
                cases: list[tuple[str, str, dict[str, str]]] = [("local", "-", {})]
                for w in a.windows.split(","):
                    chunk, ahead = w.split(":")
                    cases.append(
                        (
                            "s3",
                            w,
                            {
                                "MONOQUANT_REMOTE_CHUNK": str(parse_size(chunk)),
                                "MONOQUANT_REMOTE_AHEAD": ahead,
                            },
                        )
                    )
                    cases.append(
                        (
                            "read-only",
                            w,
                            {
                                "MONOQUANT_REMOTE_CHUNK": str(parse_size(chunk)),
                                "MONOQUANT_REMOTE_AHEAD": ahead,
                            },
                        )
                    )
                for case, window, extra in cases:
                    out = a.workdir / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    env = {**(base_env if case == "local" else env_s3), **extra}
                    if case == "read-only":
                        wall, rc, rss, so, se = run_measured([sys.executable, "-c", READ_ONLY, url], env)
                        info = json.loads(so) if rc == 0 else {}
                        emit(
                            {
                                "case": case,
                                "scheme": "-",
                                "window": window,
                                "repeat": rep,
                                "rc": rc,
                                "wall_s": round(wall, 2),
                                "in_gb_per_s": round(in_bytes / info.get("seconds", wall) / 1e9, 3),
                                "requests": info.get("requests"),
                                "peak_rss_mib": round(rss / 2**20, 1),
                                **({"stderr": se.strip().splitlines()[-1]} if rc else {}),
                            }
                        )
                        continue
                    src = str(ckpt) if case == "local" else url
                    wall, rc, rss, so, se = run_measured(
                        [*mq, "stream", src, str(out), f"--{scheme}", "--json", "-q"], env
                    )
                    rep_json = json.loads(so) if rc == 0 else {}
                    digest = digest_dir(out) if rc == 0 else None
                    if case == "local":
                        ref_digest = digest
                    mem = rep_json.get("memory", {})
                    emit(
                        {
                            "case": case,
                            "scheme": scheme,
                            "window": window,
                            "repeat": rep,
                            "rc": rc,
                            "wall_s": round(wall, 2),
                            "in_gb_per_s": round(in_bytes / wall / 1e9, 3),
                            "run_s": rep_json.get("seconds"),
                            "run_gb_per_s": rep_json.get("gb_per_s"),
                            "peak_rss_mib": round(rss / 2**20, 1),
                            "self_peak_rss_mib": round((mem.get("peak_rss") or 0) / 2**20, 1),
                            "self_peak_anon_mib": round((mem.get("peak_anon") or 0) / 2**20, 1),
                            "identical_to_local": digest == ref_digest if case != "local" else None,
                            "in_bytes": in_bytes,
                            "load1": round(os.getloadavg()[0], 2),
                            **({"stderr": se.strip().splitlines()[-1]} if rc else {}),
                        }
                    )
                    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
