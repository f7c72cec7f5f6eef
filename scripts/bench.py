#!/usr/bin/env python3
"""Paired whole-process benchmark of ``monoquant stream`` against ``cp -r && sync`` and the naive script.

One invocation runs rounds; in each round every tool runs once as its own process, each right
next to its own ``cp -r && sync`` run (pairs (cp, X) on even rounds, (X, cp) on odd ones, tool
order reversed on odd rounds, so drift and other load hit both halves of a pair alike), and each
run prints ONE JSON line:
tool, scheme, variant, cache state, wall seconds (fork to ``wait4``), input GB/s, peak RSS of the
largest process of the run (``wait4`` rusage, children included), what ``monoquant --json``
reports about itself (in-process seconds, peak RSS / RssAnon / cgroup peak), output size, rc,
load average. A last JSON line (``"summary"``) holds medians (min-max) per tool and the same-run
ratios, taken pair by pair / round by round and then the median: monoquant/cp (against the
cp run of the same pair), naive/monoquant, variant/base,
and memory ratios; and an ``anchor`` block that cannot flatter: cp's own spread, every tool's
absolute GB/s, its ratio to its paired cp run (per pair) and its ratio to the FASTEST cp run.

A second anchor, ``--tools cpin``: the same bytes copied (``dd conv=notrunc``, then ``sync``) into
a copy of the input made once, untimed, in the work directory, so the copy writes into page-cache
pages that already exist. ``cp -r`` into a new directory needs one fresh page per 4 KiB written;
on a VM whose host hands out memory lazily (and takes freed memory back at once) those pages
can cost more than the copy itself, and a slow anchor flatters. ``cpin`` is what the copy costs
where memory is cheap; each tool is also given as a ratio to the fastest ``cpin`` run, and
``cpin / cp`` (same pair) shows what the fresh pages cost.

Examples (run as root for ``--cold`` and ``--memcap``):

    # warm cache, int8/int4/fp16 vs cp -r && sync vs naive, median of 3 rounds
    python scripts/bench.py --ckpt /tmp/mqbench/ckpt4 --repeats 3 --tools cp,mq,naive
    # cold cache (sync; echo 3 > /proc/sys/vm/drop_caches before every run; --cold-method fadvise
    # evicts only the input files, for a shared machine or without root)
    python scripts/bench.py --ckpt /tmp/mqbench/ckpt4 --cold --schemes int8,int4
    # options of monoquant against its default, same rounds
    python scripts/bench.py --ckpt /tmp/mqbench/ckpt4 --tools mq --schemes int8 \\
        --variant nostats=--no-stats --variant t2="--threads 2" --variant pread="--backend pread"
    # library options the CLI does not expose, each against a plain monoquant.stream() run
    python scripts/bench.py --ckpt /tmp/mqbench/ckpt4 --tools mq --schemes int8 \\
        --py-variant nooverlap=overlap=False --py-variant blk1m=block_bytes=1048576
    # --jobs 2 vs 1
    python scripts/bench.py --ckpt /tmp/mqbench/ckpt4 --tools cp,mq --jobs 2
    # scaling: generate 1, 2, 4, 8 GB checkpoints (deleted after use), int8 only
    python scripts/bench.py --sizes 1,2,4,8 --make-args "--vocab 32000" --schemes int8 --tools cp,mq
    # the copy into existing pages too: ratios to the fastest cpin run (what fresh pages cost here)
    python scripts/bench.py --ckpt /tmp/mqbench/ckpt4 --tools cp,cpin,mq --schemes int8
    # hard memory cap: every run under /work/shared/tools/memcap 512M; max_usage + success recorded
    python scripts/bench.py --ckpt /tmp/mqbench/big6 --tools mq --schemes int8,int4 --memcap 512M \\
        --mq-args "--include lm_head.weight"

    # where the time goes: each monoquant run once under py-spy (wall-clock sampling, idle
    # included), raw stacks kept in DIR, one JSON line per run with seconds per category
    python scripts/bench.py --ckpt /tmp/mqbench/ckpt4 --tools mq --schemes int8,int4 --profile /tmp/prof

    # component throughputs in memory: kernels x block size x stats, sha256, crc32, pwrite
    python scripts/bench.py --micro --schemes int8,int4,fp16 --repeats 3

``--log FILE`` appends the same lines to FILE. Outputs go to ``--workdir`` and are removed after
each run (``sync`` follows, untimed), so runs do not inherit each other's dirty pages.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEMCAP = Path(os.environ.get("MEMCAP", "/work/shared/tools/memcap"))
GB = 1e9
MiB = 1024 * 1024


def log(line: dict, sink: list) -> None:
    s = json.dumps(line)
    print(s, flush=True)
    for f in sink:
        f.write(s + "\n")
        f.flush()


def tree_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def input_files(ckpt: Path) -> list[Path]:
    return sorted(f for f in ckpt.rglob("*") if f.is_file())


def warm(ckpt: Path) -> None:
    """Read every input file once so it sits in the page cache."""
    buf = bytearray(8 * MiB)
    for f in input_files(ckpt):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def evict_inputs(ckpt: Path) -> None:
    """``posix_fadvise(DONTNEED)`` on every input file (after a sync): only the input leaves the
    page cache, not the interpreter's and torch's own files."""
    for p in input_files(ckpt):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches(ckpt: Path, method: str = "auto") -> str:
    """Evict the page cache and say how: ``drop_caches`` (``sync; echo 3 >
    /proc/sys/vm/drop_caches``: the whole page cache, root only) or ``fadvise`` (the input files
    only). ``auto`` tries the first and falls back to the second."""
    os.sync()
    if method in ("auto", "drop_caches"):
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            if method == "drop_caches":
                raise SystemExit(
                    "--cold-method drop_caches: not permitted here (needs root); use fadvise"
                ) from None
    evict_inputs(ckpt)
    return "fadvise"


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError):
        return -1.0


def monoquant_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "monoquant"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("monoquant")
    return [found] if found else [sys.executable, "-m", "monoquant"]


# the library API in a fresh process (for options the CLI does not expose: overlap, block_bytes)
PY_STREAM = (
    "import json, sys, monoquant; "
    "r = monoquant.stream(sys.argv[1], sys.argv[2], sys.argv[3], **json.loads(sys.argv[4])); "
    "print(json.dumps(r.to_json()))"
)


def parse_kwargs(spec: str) -> dict:
    """``k=v,k=v`` -> dict, values parsed as JSON when they parse (``False``/``True`` too)."""
    out: dict = {}
    for part in filter(None, spec.split(",")):
        k, _, v = part.partition("=")
        v = {"True": "true", "False": "false", "None": "null"}.get(v, v)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


MEMCAP_RE = re.compile(
    r"memcap: limit=(\S+) max_usage=\S+ \((\d+) B.*failcnt=(\d+) oom_kill=(\d+) rc=(-?\d+) oom=(\w+)"
)


# every file of $1 over its copy in $2, in place (no truncation: the page-cache pages stay), then sync
CPIN_SH = (
    'cd "$1" && find . -type f | while IFS= read -r f; do '
    'dd if="$f" of="$2/$f" bs=1M conv=notrunc status=none || exit 1; done && sync'
)


def in_place_target(src: Path, work: Path) -> Path:
    """The copy of ``src`` that ``cpin`` overwrites: ``work/inplace``, made (untimed) when it is
    missing or does not match ``src``'s files and sizes."""
    target = work / "inplace"

    def sizes(root: Path) -> dict[str, int]:
        return {str(f.relative_to(root)): f.stat().st_size for f in root.rglob("*") if f.is_file()}

    if not target.exists() or sizes(target) != sizes(src):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src, target)
        os.sync()
    return target


class Tool:
    """One thing to time: a label, and how to build its command for (src, dst)."""

    def __init__(self, tool: str, scheme: str, variant: str, argv: list[str], kwargs: dict | None = None):
        self.tool, self.scheme, self.variant, self.argv = tool, scheme, variant, argv
        self.kwargs = kwargs or {}

    @property
    def key(self) -> str:
        return "/".join(x for x in (self.tool, self.scheme, self.variant) if x)

    def command(self, src: Path, dst: Path) -> list[str]:
        if self.tool == "cp":
            return ["sh", "-c", f"cp -r {shlex.quote(str(src))} {shlex.quote(str(dst))} && sync"]
        if self.tool == "cpin":  # dst: a copy of src made before (in_place_target)
            return ["sh", "-c", CPIN_SH, "cpin", str(src), str(dst)]
        if self.tool == "mq":
            return [*monoquant_cmd(), "stream", str(src), str(dst), f"--{self.scheme}", "--json", *self.argv]
        if self.tool == "mqpy":
            return [sys.executable, "-c", PY_STREAM, str(src), str(dst), self.scheme, json.dumps(self.kwargs)]
        if self.tool == "cmd":
            return [
                "sh",
                "-c",
                self.argv[0].format(
                    src=shlex.quote(str(src)), dst=shlex.quote(str(dst)), python=shlex.quote(sys.executable)
                ),
            ]
        if self.tool == "naive":
            return [
                sys.executable,
                str(HERE / "naive_quant.py"),
                str(src),
                str(dst),
                "--scheme",
                self.scheme,
                *self.argv,
            ]
        raise ValueError(self.tool)


def build_tools(args: argparse.Namespace) -> list[Tool]:
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    mq_args = shlex.split(args.mq_args)
    out: list[Tool] = []
    if "cp" in tools:
        out.append(Tool("cp", "", "", []))
    if "cpin" in tools:
        out.append(Tool("cpin", "", "", []))
    for s in schemes:
        if "mq" in tools:
            out.append(Tool("mq", s, "", mq_args))
            if args.jobs > 1:
                out.append(Tool("mq", s, f"jobs{args.jobs}", [*mq_args, "--jobs", str(args.jobs)]))
            for v in args.variant:
                label, _, extra = v.partition("=")
                out.append(Tool("mq", s, label, mq_args + shlex.split(extra)))
        if args.py_variant:
            out.append(Tool("mqpy", s, "", [], parse_kwargs(args.py_kwargs)))
            for v in args.py_variant:
                label, _, spec = v.partition("=")
                out.append(Tool("mqpy", s, label, [], {**parse_kwargs(args.py_kwargs), **parse_kwargs(spec)}))
        if "naive" in tools:
            out.append(Tool("naive", s, "", shlex.split(args.naive_args)))
    for c in args.cmd:
        label, _, line = c.partition("=")
        out.append(Tool("cmd", "", label, [line]))
    if not out:
        raise SystemExit("nothing to run: check --tools / --schemes")
    return out


def run_one(tool: Tool, src: Path, work: Path, args: argparse.Namespace, meta: dict) -> dict:
    src, work = Path(src).resolve(), Path(work).resolve()
    dst = work / "out"
    if dst.exists():
        shutil.rmtree(dst)
    os.sync()
    if tool.tool == "cpin":
        dst = in_place_target(src, work)  # before the cache is prepared: its pages are the point
    cache = "cold" if args.cold else "warm"
    how = drop_caches(src, args.cold_method) if args.cold else (warm(src) or "pre-read")
    cmd = tool.command(src, dst)
    capped = bool(args.memcap) and (tool.tool not in ("cp", "cpin") or args.memcap_cp)
    if capped:
        cmd = [str(MEMCAP), args.memcap, "--", *cmd]
    so, se = work / "stdout.txt", work / "stderr.txt"
    la = loadavg()
    with open(so, "wb") as fo, open(se, "wb") as fe:
        t0 = time.perf_counter()
        pre = (lambda: os.nice(args.nice)) if args.nice else None
        # cwd: the work directory, never a checkout: `python -m monoquant` imports from the current
        # directory first, so a --cmd of another checkout (PYTHONPATH=...) run from this one's root
        # would silently time this checkout's code
        p = subprocess.Popen(
            cmd, stdout=fo, stderr=fe, env={**os.environ, **args.env}, preexec_fn=pre, cwd=work
        )
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    out_bytes = tree_bytes(dst) if dst.exists() else 0
    rec: dict = {
        **meta,
        "tool": tool.tool,
        "scheme": tool.scheme or None,
        "variant": tool.variant or None,
        "cache": cache,
        "cache_prep": how,
        "wall_s": round(wall, 3),
        "input_gb": round(meta["input_bytes"] / GB, 3),
        "input_gb_per_s": round(meta["input_bytes"] / GB / wall, 4),
        "output_gb": round(out_bytes / GB, 3),
        "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
        "user_s": round(ru.ru_utime, 2),
        "sys_s": round(ru.ru_stime, 2),
        "rc": p.returncode,
        "loadavg": la,
    }
    stdout = so.read_text(errors="replace")
    stderr = se.read_text(errors="replace")
    if tool.tool in ("mq", "mqpy", "naive", "cmd"):
        try:
            j = json.loads(stdout[stdout.index("{") :])
            if tool.tool in ("mq", "mqpy", "cmd"):
                mem = j.get("memory") or {}
                rec["self"] = {
                    "seconds": j.get("seconds"),
                    "complete": j.get("complete"),
                    "peak_rss_mib": _mib(mem.get("peak_rss")),
                    "peak_anon_mib": _mib(mem.get("peak_anon")),
                    "cgroup_peak_mib": _mib(mem.get("cgroup_peak")),
                    "mean_sqnr_db": j.get("mean_sqnr_db"),
                    # --overlap auto's decision: writer and kernel helper threads on (a core was idle)
                    "overlap": (j.get("settings") or {}).get("overlap"),
                }
            else:
                rec["self"] = {
                    "seconds": j.get("seconds"),
                    "peak_rss_mib": _mib(j.get("peak_rss")),
                    "peak_anon_mib": _mib(j.get("peak_anon")),
                }
        except (ValueError, AttributeError):
            rec["self"] = None
    if capped:
        m = MEMCAP_RE.search(stderr)
        rec["memcap"] = {
            "limit": args.memcap,
            "max_usage_mib": round(int(m.group(2)) / MiB, 1) if m else None,
            "failcnt": int(m.group(3)) if m else None,
            "oom": (m.group(6) == "yes") if m else None,
        }
        rec["ok"] = p.returncode == 0 and (rec.get("self") or {}).get("complete", True) is not False
    if p.returncode != 0:
        rec["stderr_tail"] = stderr[-600:]
    if dst.exists() and tool.tool != "cpin":  # cpin's target is kept: the next run writes into it
        shutil.rmtree(dst)
    return rec


def _mib(v: object) -> float | None:
    return round(v / MiB, 1) if isinstance(v, (int, float)) else None


def med(xs: list[float]) -> dict | None:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {
        "median": round(statistics.median(xs), 3),
        "min": round(min(xs), 3),
        "max": round(max(xs), 3),
        "n": len(xs),
    }


def summarize(recs: list[dict], tools: list[Tool], meta: dict) -> dict:
    by: dict[tuple[str, int], dict] = {}
    cps: dict[tuple[str, int], dict] = {}  # cp run paired with a tool (same round, adjacent)
    cp_runs: dict[int, list[dict]] = {}
    for r in recs:
        k = "/".join(x for x in (r["tool"], r["scheme"], r["variant"]) if x)
        if r["tool"] == "cp":
            cp_runs.setdefault(r["round"], []).append(r)
            if r.get("cp_pair_of"):
                cps[(r["cp_pair_of"], r["round"])] = r
                continue
        by[(k, r["round"])] = r
    rounds = sorted({r["round"] for r in recs})

    def ratio(a: str, b: str, field: str = "wall_s") -> dict | None:
        xs = []
        for rd in rounds:
            ra = by.get((a, rd))
            rb = cps.get((a, rd)) or by.get((b, rd)) if b == "cp" else by.get((b, rd))
            if ra and rb and ra["rc"] == 0 and rb["rc"] == 0 and _get(rb, field):
                xs.append(_get(ra, field) / _get(rb, field))
        return med(xs)

    per_tool = {}
    for t in tools:
        if t.tool == "cp":
            rs = [r for rd in rounds for r in cp_runs.get(rd, [])]
        else:
            rs = [by[(t.key, rd)] for rd in rounds if (t.key, rd) in by]
        ok = [r for r in rs if r["rc"] == 0]
        per_tool[t.key] = {
            "wall_s": med([r["wall_s"] for r in ok]),
            "input_gb_per_s": med([r["input_gb_per_s"] for r in ok]),
            "peak_rss_mib": med([r["peak_rss_mib"] for r in ok]),
            "cpu_s": med([_get(r, "cpu") for r in ok]),
            "self_seconds": med([(r.get("self") or {}).get("seconds") for r in ok]),
            "self_peak_anon_mib": med([(r.get("self") or {}).get("peak_anon_mib") for r in ok]),
            "overlap_on": sum(1 for r in ok if (r.get("self") or {}).get("overlap")),
            "failures": len(rs) - len(ok),
        }
        if any("memcap" in r for r in rs):
            per_tool[t.key]["memcap_max_usage_mib"] = med([r["memcap"]["max_usage_mib"] for r in rs])
            per_tool[t.key]["memcap_ok"] = f"{sum(bool(r.get('ok')) for r in rs)}/{len(rs)}"
    anchor = _anchor(recs, by, cps, rounds, tools)
    ratios = {}
    keys = [t.key for t in tools]
    for t in tools:
        if t.tool == "mq" and not t.variant and "cp" in keys:
            ratios[f"{t.key} / cp"] = ratio(t.key, "cp")
        if t.tool in ("mq", "mqpy") and t.variant:
            ratios[f"{t.key} / {t.tool}/{t.scheme}"] = ratio(t.key, f"{t.tool}/{t.scheme}")
        if t.tool == "mqpy" and not t.variant and f"mq/{t.scheme}" in keys:
            ratios[f"{t.key} / mq/{t.scheme}"] = ratio(t.key, f"mq/{t.scheme}")
        if t.tool == "naive" and f"mq/{t.scheme}" in keys:
            ratios[f"{t.key} / mq/{t.scheme}"] = ratio(t.key, f"mq/{t.scheme}")
            # user CPU alone: the compute, without the system time of fresh page-cache pages
            # (the naive script writes every output page new; see the cpin anchor)
            ratios[f"{t.key} / mq/{t.scheme} user_cpu"] = ratio(t.key, f"mq/{t.scheme}", "user_s")
            ratios[f"{t.key} / mq/{t.scheme} peak_rss"] = ratio(t.key, f"mq/{t.scheme}", "peak_rss_mib")
            ratios[f"{t.key} / mq/{t.scheme} peak_anon"] = ratio(
                t.key, f"mq/{t.scheme}", "self.peak_anon_mib"
            )
        if t.tool == "cmd":
            # a label ending in a scheme ("base-int4") is compared with that scheme's monoquant run
            mq_schemes = sorted(
                {u.scheme for u in tools if u.tool == "mq" and u.scheme}, key=len, reverse=True
            )
            same = [f"mq/{s}" for s in mq_schemes if (t.variant or "").endswith(f"-{s}")]
            plain = [k for k in keys if k.startswith(("mq/", "mqpy/")) and k.count("/") == 1]
            base = next((k for k in same if k in keys), None) or next(iter(plain), None)
            first_cmd = next(u.key for u in tools if u.tool == "cmd")
            if base is None and t.key != first_cmd:  # commands alone: against the first one
                base = first_cmd
                ratios[f"{t.key} / {base} cpu"] = ratio(t.key, base, "cpu")
            if base:
                ratios[f"{t.key} / {base}"] = ratio(t.key, base)
            if "cp" in keys:
                ratios[f"{t.key} / cp"] = ratio(t.key, "cp")
        if t.tool in ("naive", "cpin") and "cp" in keys:
            ratios[f"{t.key} / cp"] = ratio(t.key, "cp")
    return {"summary": True, **meta, "anchor": anchor, "per_tool": per_tool, "ratios": ratios}


def _anchor(recs: list[dict], by: dict, cps: dict, rounds: list[int], tools: list[Tool]) -> dict | None:
    """What cannot flatter: the anchor's (``cp -r && sync``) own spread, and for every other tool
    its absolute GB/s, its ratio to the cp run of its own pair (per pair and median), and its
    ratio to the FASTEST cp run of the session, so a slow moment of the disk does not make a slow
    program look fast; with ``cpin`` runs, the same for the copy into existing pages (its spread,
    and every tool's ratio to its fastest run)."""
    cp_ok = [r for r in recs if r["tool"] == "cp" and r["rc"] == 0]
    cpin_ok = [r for r in recs if r["tool"] == "cpin" and r["rc"] == 0]
    if not cp_ok and not cpin_ok:
        return None
    fastest = min((r["wall_s"] for r in cp_ok), default=None)
    out: dict = {
        "cp_wall_s": med([r["wall_s"] for r in cp_ok]),
        "cp_gb_per_s": med([r["input_gb_per_s"] for r in cp_ok]),
        "cp_fastest_wall_s": fastest,
        "tools": {},
    }
    cpin_fastest = min((r["wall_s"] for r in cpin_ok), default=None)
    if cpin_fastest is not None:
        out["cpin_wall_s"] = med([r["wall_s"] for r in cpin_ok])
        out["cpin_gb_per_s"] = med([r["input_gb_per_s"] for r in cpin_ok])
        out["cpin_fastest_wall_s"] = cpin_fastest
    for t in tools:
        if t.tool in ("cp", "cpin"):
            continue
        pairs = []
        for rd in rounds:
            r, c = by.get((t.key, rd)), cps.get((t.key, rd))
            if r and r["rc"] == 0:
                pairs.append(
                    {
                        "round": rd,
                        "wall_s": r["wall_s"],
                        "gb_per_s": r["input_gb_per_s"],
                        "paired_cp_wall_s": c["wall_s"] if c and c["rc"] == 0 else None,
                        "vs_paired_cp": round(r["wall_s"] / c["wall_s"], 3) if c and c["rc"] == 0 else None,
                        "vs_fastest_cp": round(r["wall_s"] / fastest, 3) if fastest else None,
                    }
                )
                if cpin_fastest is not None:
                    pairs[-1]["vs_fastest_cpin"] = round(r["wall_s"] / cpin_fastest, 3)
        if pairs:
            out["tools"][t.key] = {
                "gb_per_s": med([p["gb_per_s"] for p in pairs]),
                "vs_paired_cp": med([p["vs_paired_cp"] for p in pairs]),
                "vs_fastest_cp": med([p["vs_fastest_cp"] for p in pairs]),
                "pairs": pairs,
            }
            if cpin_fastest is not None:
                out["tools"][t.key]["vs_fastest_cpin"] = med([p["vs_fastest_cpin"] for p in pairs])
    return out


def _get(r: dict, field: str) -> float | None:
    if field == "cpu":  # user + sys of the process tree
        return r["user_s"] + r["sys_s"]
    if field.startswith("self."):
        return (r.get("self") or {}).get(field[5:])
    return r.get(field)


def code_version() -> str:
    """git HEAD of the monoquant checkout, with ``+dirty`` when monoquant/ has local changes."""
    root = HERE.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "monoquant"], capture_output=True, text=True
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


# ---- profile mode ---------------------------------------------------------------------------
def _frame(fr: str) -> tuple[str, str, int]:
    """``func (path:line)`` -> (func, path, line)."""
    m = re.match(r"(.*) \((.*):(\d+)\)$", fr)
    if not m:
        return fr, "", 0
    return m.group(1), m.group(2), int(m.group(3))


def _is_mq(path: str) -> bool:
    return path.startswith("monoquant/") or "/monoquant/" in path


def _source_line(path: str, line: int) -> str:
    import importlib.util
    import linecache

    if not os.path.isabs(path):
        spec = importlib.util.find_spec("monoquant")
        if spec and spec.origin:
            path = str(Path(spec.origin).parent.parent / path)
    return linecache.getline(path, line).strip()[:70]


def categorize(stack: list[str], main: bool = True) -> tuple[str, str]:
    """(category, detail) of one sampled stack (outermost frame first)."""
    frames = [_frame(f) for f in stack]
    in_stream = not main or any(fn == "stream" and p.endswith("monoquant/pipeline.py") for fn, p, _ in frames)
    if not any(_is_mq(p) for _, p, _ in frames):
        return (
            "startup: imports"
            if main and any(fn == "_find_and_load" for fn, _, _ in frames)
            else "other (no monoquant frame)"
        ), (frames[-1][0] if frames else "")
    mq = [(fn, p, ln) for fn, p, ln in frames if _is_mq(p)]
    if not in_stream:
        if any(fn in ("_find_and_load", "_call_with_frames_removed") for fn, _, _ in frames):
            return "startup: imports", ""
        return "startup/exit: other", (f"{mq[-1][0]}" if mq else (frames[-1][0] if frames else ""))
    qual, p, ln = mq[-1]
    fn = qual.rsplit(".", 1)[-1]
    base = p.rsplit("/", 1)[-1]
    src = _source_line(p, ln)
    detail = f"{base}:{ln} {qual}: {src}"
    if base == "overlap.py":
        if fn == "acquire":
            return "wait: for a free workspace (writer behind)", detail
        if fn == "_run" and "get()" in src:
            return "idle: writer thread waiting for blocks", detail
        if fn == "drain":
            return "wait: drain writer at shard end", detail
        return "pipeline: queue hand-off", detail
    if base == "prefetch.py":
        return "read: read-ahead thread", detail
    if base == "dtypes.py":
        return "python: dtypes.itemsize (torch.empty per call)", detail
    if base == "writer.py":
        if fn == "_pwrite":
            return "write: pwrite", detail
        if fn == "write" and "update" in src:
            return "write: sha256", detail  # code before the CRC-32 digest
        if fn == "write" and "crc32" in src:
            return "write: crc32", detail
        if fn in ("_flush", "_sync_range"):
            return "write: flush (sync_file_range/fadvise)", detail
        if fn == "finish" and "fsync" in src:
            return "write: fsync at shard end", detail
        if fn == "fsync_dir":
            return "write: fsync dir", detail
        if fn == "__init__":
            return "write: open/fallocate/header", detail
        return "write: other python", detail
    if base in ("kernels.py", "packing.py", "numerics.py", "exactstats.py") or "monoquant/formats/" in p:
        if "_accumulate_error" in fn or ("stats" in src and base == "kernels.py"):
            return "kernel: error stats", detail
        if any(f.endswith("_accumulate_error") for f, _, _ in mq):
            return "kernel: error stats", detail
        if fn == "_cast_block" and ("xf" in src or "err" in src or "stats" in src or "back" in src):
            return "kernel: error stats", detail
        if fn == "_cast_block" and ("amax" in src or "amin" in src):
            return "kernel: finite/range check (amax+amin)", detail
        if "copy_(x)" in src:
            return "kernel: bf16->fp32 copy (+ input page faults)", detail
        return "kernel: quantize ops", detail
    if base == "reader.py":
        return "read: reader", detail
    if base == "kernels.py" and fn == "get":
        return "kernel: quantize ops", detail
    if base in ("convert.py", "pipeline.py") and fn == "process_tensor":
        if "release" in src:
            return "read: release (madvise)", detail
        return "pipeline: python", detail
    if base in ("journal.py", "outdir.py", "plan.py", "reader.py", "jobs.py"):
        return "plan/journal/finalize", detail
    return "pipeline: other", detail


def profile(args: argparse.Namespace, tools: list[Tool], sink: list) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    outdir = Path(args.profile)
    outdir.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rate = 200
    for t in tools:
        if t.tool != "mq":
            continue
        dst = work / "out"
        if dst.exists():
            shutil.rmtree(dst)
        os.sync()
        drop_caches(args.ckpt, args.cold_method) if args.cold else warm(args.ckpt)
        raw = outdir / (t.key.replace("/", "_") + ".txt")
        cmd = [
            spy,
            "record",
            "--idle",
            "--threads",
            "-r",
            str(rate),
            "-f",
            "raw",
            "-o",
            str(raw),
            "--",
            *t.command(args.ckpt, dst),
        ]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=work)  # cwd: see run_one
        wall = time.perf_counter() - t0
        cache = "cold" if args.cold else "warm"
        log(
            {
                "profile": True,
                "tool": t.key,
                "cache": cache,
                "wall_s": round(wall, 2),
                "code": code_version(),
                "rc": p.returncode,
                **analyze_raw(raw, rate),
            },
            sink,
        )
        if dst.exists():
            shutil.rmtree(dst)


def analyze_raw(raw: Path, rate: int = 200) -> dict:
    """Seconds per category (main thread; other threads prefixed ``[name]``) of a py-spy raw file."""
    cats: dict[str, int] = {}
    lines: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack_s, _, n_s = line.rpartition(" ")
        if not n_s.isdigit():
            continue
        stack = stack_s.split(";")
        name = "MainThread"
        if stack and stack[0].startswith("thread ("):
            name = stack[0].partition(": ")[2]
            stack = stack[1:]
        if "memwatch" in name:
            continue  # the memory sampler
        role = "main" if name in ("MainThread", "") else re.sub(r"[-_]?\d+$", "", name)
        n = int(n_s)
        c, d = categorize(stack, main=role == "main")
        if role == "main":
            total += n
        else:
            c, d = f"[{role}] {c}", f"[{role}] {d}"
        cats[c] = cats.get(c, 0) + n
        if d:
            lines[d] = lines.get(d, 0) + n

    def sec(n: int) -> float:
        return round(n / rate, 2)

    return {
        "main_thread_sampled_s": sec(total),
        "rate_hz": rate,
        "raw": str(raw),
        "categories_s": {k: sec(v) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_lines_s": {k: sec(v) for k, v in sorted(lines.items(), key=lambda kv: -kv[1])[:30]},
    }


# ---- in-process component costs ------------------------------------------------------------
def micro(args: argparse.Namespace, sink: list) -> None:
    """Throughput of the pieces, in memory, 1 torch thread, best of ``--repeats`` (least disturbed
    by other load): kernels per scheme x block size x stats on/off, sha256, pwrite to the page
    cache, and the per-call cost of small helpers."""
    import hashlib
    import timeit

    import torch

    from monoquant import dtypes
    from monoquant.kernels import ErrorStats, Workspace, get_kernel
    from monoquant.schemes import get_scheme

    torch.set_num_threads(1)
    rows, cols = 65536, 2048  # 256 MiB of bf16
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    nbytes = x.numel() * 2
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]

    def best(fn) -> float:
        fn()  # warm-up: workspaces allocated, pages touched
        return min(timeit.repeat(fn, number=1, repeat=max(args.repeats, 1)))

    for scheme in schemes:
        k = get_kernel(get_scheme(scheme))
        for mib in (1, 4, 16):
            br = max(1, mib * MiB // (cols * 2))
            for stats in (True, False):
                ws = Workspace()

                def run(k=k, br=br, stats=stats, ws=ws) -> None:
                    st = ErrorStats() if stats else None
                    for a in range(0, rows, br):
                        k.quantize_block(x[a : a + br], ws=ws, stats=st)

                t = best(run)
                log(
                    {
                        "micro": "kernel",
                        "scheme": scheme,
                        "block_mib": mib,
                        "stats": stats,
                        "gb_per_s": round(nbytes / t / GB, 3),
                        "s_per_gb": round(t / (nbytes / GB), 3),
                    },
                    sink,
                )
    buf = memoryview(x.view(torch.uint8).numpy())
    chunk = 4 * MiB

    def sha() -> None:
        h = hashlib.sha256()
        for a in range(0, nbytes, chunk):
            h.update(buf[a : a + chunk])

    def rate(t: float) -> dict:
        return {"gb_per_s": round(nbytes / t / GB, 3), "s_per_gb": round(t / (nbytes / GB), 3)}

    log({"micro": "sha256", **rate(best(sha))}, sink)
    import zlib

    def crc() -> None:
        c = 0
        for a in range(0, nbytes, chunk):
            c = zlib.crc32(buf[a : a + chunk], c)

    log({"micro": "crc32 (zlib)", **rate(best(crc))}, sink)

    def blake() -> None:
        h = hashlib.blake2b()
        for a in range(0, nbytes, chunk):
            h.update(buf[a : a + chunk])

    log({"micro": "blake2b", **rate(best(blake))}, sink)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "pwrite.bin"

    def pw(fadvise: bool) -> float:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            t0 = time.perf_counter()
            for a in range(0, nbytes, chunk):
                os.pwrite(fd, buf[a : a + chunk], a)
                if fadvise and a % (32 * MiB) == 0:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return time.perf_counter() - t0
        finally:
            os.close(fd)
            path.unlink()
            os.sync()

    for fadvise in (False, True):
        t = min(pw(fadvise) for _ in range(max(args.repeats, 1)))
        log(
            {
                "micro": "pwrite to page cache" + (" + fadvise DONTNEED every 32 MiB" if fadvise else ""),
                "gb_per_s": round(nbytes / t / GB, 3),
                "s_per_gb": round(t / (nbytes / GB), 3),
            },
            sink,
        )
    if hasattr(dtypes, "itemsize"):
        n = 100000
        t = min(timeit.repeat(lambda: dtypes.itemsize(torch.bfloat16), number=n, repeat=3)) / n
        log(
            {
                "micro": "dtypes.itemsize per call",
                "us": round(t * 1e6, 2),
                "torch_dtype_itemsize_us": round(
                    min(timeit.repeat(lambda: torch.bfloat16.itemsize, number=n, repeat=3)) / n * 1e6, 3
                ),
            },
            sink,
        )


def bench_checkpoint(
    ckpt: Path, args: argparse.Namespace, tools: list[Tool], sink: list, extra: dict
) -> dict:
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    in_bytes = tree_bytes(ckpt)
    meta = {"ckpt": str(ckpt), "input_bytes": in_bytes, **extra}
    recs = []
    cp = next((t for t in tools if t.tool == "cp"), None)
    others = [t for t in tools if t.tool != "cp"]
    for rd in range(args.repeats):
        if cp is not None and args.pair_cp:
            # each tool right next to its own cp run: (cp, X) on even rounds, (X, cp) on odd ones
            sched = []
            for t in others if rd % 2 == 0 else list(reversed(others)):
                pair = [(cp, t.key), (t, None)]
                sched += pair if rd % 2 == 0 else pair[::-1]
            if not others:
                sched = [(cp, None)]
        else:
            order = tools if rd % 2 == 0 else list(reversed(tools))
            sched = [(t, None) for t in order]
        for t, pair_of in sched:
            extra_meta = {"round": rd, **({"cp_pair_of": pair_of} if pair_of else {})}
            rec = run_one(t, ckpt, work, args, {**meta, **extra_meta})
            recs.append(rec)
            log(rec, sink)
    shutil.rmtree(work / "inplace", ignore_errors=True)  # cpin's target: a full copy of the input
    summ = summarize(
        recs,
        tools,
        {
            **meta,
            "code": code_version(),
            "cache": "cold" if args.cold else "warm",
            "repeats": args.repeats,
            "memcap": args.memcap or None,
        },
    )
    log(summ, sink)
    return summ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--micro", action="store_true", help="in-process component throughputs (no checkpoint)")
    src.add_argument("--analyze", nargs="+", metavar="RAW", help="only summarize py-spy raw files")
    src.add_argument("--ckpt", type=Path, help="existing checkpoint directory")
    src.add_argument("--sizes", help="comma list of GB: generate each with make_checkpoint.py (scaling)")
    ap.add_argument("--schemes", default="int8,int4,fp16")
    ap.add_argument("--tools", default="cp,mq,naive", help="comma list of cp, cpin, mq, naive")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (each tool once per round)")
    ap.add_argument("--cold", action="store_true", help="drop page cache before each run")
    ap.add_argument(
        "--cold-method",
        choices=["auto", "drop_caches", "fadvise"],
        default="auto",
        help="how --cold evicts: drop_caches (whole page cache, root), fadvise (input files only), or "
        "auto (drop_caches when permitted); every JSON line says which was used (cache_prep)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="also run monoquant with --jobs N (N > 1)")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=ARGS",
        help="also run monoquant with extra ARGS (repeatable), compared with the plain run",
    )
    ap.add_argument(
        "--py-variant",
        action="append",
        default=[],
        metavar="LABEL=K=V[,K=V]",
        help="also run monoquant.stream() in a fresh python with these keyword arguments (e.g. "
        "nooverlap=overlap=False, blk1m=block_bytes=1048576), compared with a plain API run",
    )
    ap.add_argument("--py-kwargs", default="", metavar="K=V[,K=V]", help="kwargs for every API run")
    ap.add_argument(
        "--cmd",
        action="append",
        default=[],
        metavar="LABEL=SHELL",
        help="also time a shell command ({src}, {dst}, {python} substituted), e.g. a patched "
        "monoquant for an experiment; compared with cp and the first plain monoquant run",
    )
    ap.add_argument("--mq-args", default="", help="extra arguments for every monoquant run")
    ap.add_argument("--naive-args", default="", help="extra arguments for naive_quant.py")
    ap.add_argument("--memcap", default="", metavar="LIMIT", help="run mq/naive under memcap LIMIT (512M)")
    ap.add_argument("--memcap-cp", action="store_true", help="with --memcap: cap cp too")
    ap.add_argument(
        "--no-pair",
        dest="pair_cp",
        action="store_false",
        help="run cp once per round instead of right next to every other tool",
    )
    ap.add_argument("--nice", type=int, default=0, help="nice level of every timed command")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for the runs")
    ap.add_argument("--workdir", default="/tmp/mqbench/work", help="where outputs go (input's disk)")
    ap.add_argument("--make-args", default="", help="extra make_checkpoint.py arguments for --sizes")
    ap.add_argument("--keep", action="store_true", help="with --sizes: keep generated checkpoints")
    ap.add_argument("--profile", metavar="DIR", help="profile each monoquant run with py-spy")
    ap.add_argument("--log", type=Path, help="append every JSON line to this file too")
    args = ap.parse_args(argv)
    if args.ckpt is not None:
        args.ckpt = args.ckpt.resolve()  # commands run in the work directory (see run_one)
    if args.analyze:
        for f in args.analyze:
            print(json.dumps({"profile": True, **analyze_raw(Path(f))}))
        return 0
    args.env = dict(e.split("=", 1) for e in args.env)
    if args.micro:
        micro(args, [open(args.log, "a")] if args.log else [])  # noqa: SIM115 (closed at exit)
        return 0
    tools = build_tools(args)
    sink = [open(args.log, "a")] if args.log else []  # noqa: SIM115 (appended to for the whole run)
    if args.profile:
        if not args.ckpt:
            raise SystemExit("--profile needs --ckpt")
        profile(args, tools, sink)
        return 0
    if args.ckpt:
        bench_checkpoint(args.ckpt, args, tools, sink, {})
        return 0
    sizes = [float(s) for s in args.sizes.split(",")]
    series = []
    for gb in sizes:
        ck = Path(args.workdir).parent / f"scale-{gb:g}gb"
        made = False
        if not ck.exists():
            subprocess.run(
                [
                    sys.executable,
                    str(HERE / "make_checkpoint.py"),
                    str(ck),
                    "--size-gb",
                    str(gb),
                    *shlex.split(args.make_args),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            made = True
        try:
            s = bench_checkpoint(ck, args, tools, sink, {"size_gb": gb})
            series.append(s)
        finally:
            if made and not args.keep:
                shutil.rmtree(ck)
    # scaling: seconds per input GB by size (linear growth = flat s/GB)
    scal = {}
    for s in series:
        gb = s["input_bytes"] / GB
        scal[f"{s['size_gb']:g}"] = {
            k: {"wall_s": v["wall_s"]["median"], "s_per_gb": round(v["wall_s"]["median"] / gb, 3)}
            for k, v in s["per_tool"].items()
            if v["wall_s"]
        }
        scal[f"{s['size_gb']:g}"]["ratios"] = {k: v["median"] for k, v in s["ratios"].items() if v}
    log({"scaling": True, "by_size": scal}, sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
