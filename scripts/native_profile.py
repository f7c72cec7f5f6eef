#!/usr/bin/env python3
"""Where a run's CPU time goes, by native function, for one or more commands in alternating
rounds: ``perf record`` (the ``cpu-clock`` software event, so it works in VMs without hardware
counters) of each whole process tree, then ``perf report`` by shared object and symbol.

    python scripts/native_profile.py --rounds 3 \\
        --cmd "now=$PWD/.venv/bin/python -m monoquant stream /abs/ckpt {dst} --int8" \\
        --cmd "before=PYTHONPATH=/tmp/base $PWD/.venv/bin/python -m monoquant stream /abs/ckpt {dst} --int8"

Each ``--cmd`` is ``LABEL=SHELL``. ``{dst}`` is a fresh output directory for each run (removed
after it); each command runs in a scratch directory, so ``PYTHONPATH`` picks the tree (give
paths absolute). JSON lines out: one per run (total CPU seconds sampled and the ``--top``
symbols, each with its share and seconds), then a summary with each label's median CPU seconds
per symbol over the rounds, computed from every symbol of every run (one no sample hit in a run
counts as 0 s there), for the ``--top`` symbols with the largest median in any label, sorted by
the first label's. CPU seconds of one function do not depend on how fast the disk was, so two
trees can be compared on a shared machine where their wall times cannot. Needs ``perf``.
Symbol names are shortened: torch's element-wise loops are named by their kernel
(``div_true_kernel``, ``reduced_float_copy_kernel`` ...); names C++ templates hide are cut at 90
characters.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^\s*([\d.]+)%\s+(.+?)\s+\[(\S)\]\s+(.*)$")
_KERNEL = re.compile(r"\b(\w+_kernel(?:_impl)?\b|dot_impl<\w+>)")


def short(sym: str) -> str:
    """A readable name: the torch kernel a templated loop belongs to, else the symbol cut short."""
    m = _KERNEL.search(sym)
    if m and ("at::native" in sym or "c10::function_ref" in sym):
        return m.group(1)
    return sym[:90]


@dataclass
class Profile:
    """One run: the CPU seconds sampled and each symbol's ``[share %, seconds]``, largest first."""

    cpu_s: float
    symbols: dict[str, list[float]]


def profile(cmd: str) -> Profile:
    """Run ``cmd`` under ``perf record`` and return its total and every symbol's share."""
    work = Path(tempfile.mkdtemp(prefix="native_profile_"))
    try:
        data, dst = work / "perf.data", work / "out"
        record = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-o", str(data), "--"]
        rec = subprocess.run(
            [*record, "bash", "-c", cmd.replace("{dst}", str(dst))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=work,  # never a checkout: `python -m monoquant` imports from the current directory
        )
        if rec.returncode != 0:
            why = rec.stderr.strip()[-300:]
            raise SystemExit(f"native_profile: {cmd!r} failed (rc {rec.returncode}): {why}")
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio"],
            capture_output=True,
            text=True,
        )
        if report.returncode != 0:
            raise SystemExit(f"native_profile: perf report failed: {report.stderr.strip()[-300:]}")
        rep = report.stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rep.count("# Event count") != 1:
        raise SystemExit("native_profile: expected one event (cpu-clock) in perf's report")
    total_events = 0.0
    shares: dict[str, float] = {}
    for line in rep.splitlines():
        if line.startswith("# Event count"):
            total_events = float(line.split(":")[1])
            continue
        m = _LINE.match(line)
        if m:
            pct, dso, kind, sym = m.groups()
            name = f"{'[k] ' if kind == 'k' else ''}{short(sym)} ({Path(dso).name})"
            shares[name] = shares.get(name, 0.0) + float(pct)
    cpu_s = total_events / 1e9  # cpu-clock counts nanoseconds
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])  # all: --top only limits the output
    return Profile(round(cpu_s, 3), {k: [round(v, 2), round(cpu_s * v / 100, 3)] for k, v in ranked})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cmd", action="append", required=True, help="LABEL=SHELL (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=40, help="symbols shown per run and in the summary")
    args = ap.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("native_profile: perf is not installed")
    if args.rounds < 1:
        raise SystemExit("native_profile: --rounds must be at least 1")
    cmds: list[tuple[str, str]] = []
    for c in args.cmd:
        label, eq, shell = c.partition("=")
        # an environment setting without a label (PYTHONPATH=... python ...) is not a label
        if not eq or not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or label.isupper() or not shell.strip():
            raise SystemExit(f"native_profile: --cmd {c!r}: give it as LABEL=SHELL, e.g. now=python -m ...")
        if any(label == x for x, _ in cmds):
            raise SystemExit(f"native_profile: the label {label!r} is given twice")
        cmds.append((label, shell))
    runs: dict[str, list[Profile]] = {label: [] for label, _ in cmds}
    for r in range(args.rounds):
        for label, shell in cmds:
            res = profile(shell)
            runs[label].append(res)
            top = dict(list(res.symbols.items())[: args.top])
            print(json.dumps({"round": r, "label": label, "cpu_s": res.cpu_s, "symbols": top}), flush=True)

    def med(label: str, name: str) -> float:  # a symbol no sample hit in a run counts as 0 s there
        return round(statistics.median(res.symbols.get(name, [0.0, 0.0])[1] for res in runs[label]), 3)

    names = {n for label in runs for res in runs[label] for n in res.symbols}
    first = cmds[0][0]
    shown = sorted(names, key=lambda n: -max(med(label, n) for label in runs))[: args.top]
    shown.sort(key=lambda n: -med(first, n))
    summary = {
        "summary": True,
        "rounds": args.rounds,
        "cpu_s": {label: round(statistics.median(x.cpu_s for x in runs[label]), 3) for label in runs},
        "symbols_cpu_s": {n: {label: med(label, n) for label in runs} for n in shown},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
