"""The ``monoquant`` command line: a thin shell over the library.

Only this module imports click and tqdm and prints. Library errors become one line on stderr
and exit code 1 (``-v`` shows the traceback); usage errors exit 2; ``verify`` below its
threshold exits 3.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import click

from .errors import MonoquantError

EXIT_ERROR = 1
EXIT_BELOW_THRESHOLD = 3


def human_bytes(n: float) -> str:
    from .plan import human_bytes as hb  # torch is imported on first use only (fast --help, clean Ctrl-C)

    return hb(n)


class _Group(click.Group):
    """The top-level group: a Ctrl-C anywhere (even while torch is still being imported) ends
    with one line and exit code 130, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("monoquant: interrupted; rerun the same command to resume", err=True)
            sys.exit(130)


@contextlib.contextmanager
def interrupt_after() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it as :class:`KeyboardInterrupt`.

    For the first import of torch: an interrupt that lands inside a C extension's initialisation
    (numpy's, which torch imports) comes out of it as an ``ImportError`` with a traceback, not as
    a ``KeyboardInterrupt``; held, it is raised once the import is done, and the command ends with
    its one line. Off the main thread (where Python runs signal handlers) it does nothing.

    Example:
        >>> import os, signal
        >>> try:
        ...     with interrupt_after():
        ...         os.kill(os.getpid(), signal.SIGINT)
        ...         print("the block finishes")
        ... except KeyboardInterrupt:
        ...     print("then the interrupt")
        the block finishes
        then the interrupt
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got:
        raise KeyboardInterrupt


def _fail(e: BaseException, verbose: int) -> NoReturn:
    if verbose:
        traceback.print_exc()
    click.echo(f"monoquant: error: {e}", err=True)
    sys.exit(EXIT_ERROR)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwind like Ctrl-C: the shard being written is removed cleanly


def _run(verbose: int, fn: Callable[[], Any]) -> Any:
    """Call ``fn`` and map library errors to one line and exit code 1."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return fn()
    except MonoquantError as e:
        _fail(e, verbose)
    except KeyboardInterrupt:
        click.echo("monoquant: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except OSError as e:  # anything the library did not translate (should be rare)
        _fail(e, verbose)
    finally:
        if previous is not None:  # in-process callers (tests, other CLIs) get their handler back
            signal.signal(signal.SIGTERM, previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="monoquant")
def main() -> None:
    """Quantize PyTorch checkpoints out of core, into compressed-tensors format.

    \b
    Examples:
      monoquant stream ckpt/ out/ --int8            # int8 per channel, weight-only
      monoquant stream ckpt/ out/ --int4 --dry-run  # what would happen, nothing written
      monoquant verify out/ --against ckpt/ --min-sqnr 20
      monoquant inspect out/
    """


#: set by :func:`entry`: this process is the command's own and ends with it (in-process callers
#: of :func:`main` keep their interpreter, and their garbage collector as they set it)
_own_process = False


def entry() -> NoReturn:
    """The ``monoquant`` command (and ``python -m monoquant``): :func:`main`, then the process
    ends without the interpreter's teardown, which with torch loaded takes about 0.5 s and does
    nothing for the output: every file the command wrote is closed (and, for ``stream``, fsynced)
    before it returns, so only stdout and stderr are flushed here. Exit codes and messages are
    :func:`main`'s. In-process callers (tests, other CLIs) call :func:`main` and keep their
    interpreter.
    """
    # this process is the command's own: its second kernel worker may be a forked process
    # (monoquant.kernelproc; the Python API forks only when asked to)
    os.environ.setdefault("MONOQUANT_KERNEL_PROCESS", "1")
    global _own_process
    _own_process = True
    try:
        main()
        code: Any = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing left to save
            stream.flush()
    os._exit(code)


def scheme_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The scheme flags shared by ``stream`` (and the scheme-aware commands)."""
    opts = [
        click.option(
            "--scheme",
            "scheme",
            default=None,
            metavar="NAME",
            help="Scheme preset: int8, int4, fp8, fp16, bf16, w8a8, fp8-dynamic, int4-asym, "
            "int8-tensor, fp8-block, nvfp4a16, nvfp4, mxfp4a16, mxfp4, mxfp8a16, mxfp8, ... "
            "or a canonical name such as int4-g64-asym.  [default: int8]",
        ),
        click.option(
            "--int8", "scheme_int8", is_flag=True, help="int8 weights, per output channel (pack-quantized)."
        ),
        click.option(
            "--int4",
            "scheme_int4",
            is_flag=True,
            help="int4 weights, groups of 128 columns (pack-quantized).",
        ),
        click.option("--fp8", "scheme_fp8", is_flag=True, help="float8_e4m3fn weights, per channel."),
        click.option("--fp16", "scheme_fp16", is_flag=True, help="Cast floating tensors to float16."),
        click.option("--bf16", "scheme_bf16", is_flag=True, help="Cast floating tensors to bfloat16."),
        click.option(
            "--fp8-block",
            "scheme_fp8_block",
            is_flag=True,
            help="float8_e4m3fn weights, one scale per 128x128 block; activations dynamic per group of 128.",
        ),
        click.option(
            "--nvfp4",
            "scheme_nvfp4",
            is_flag=True,
            help="NVFP4: e2m1 weights, fp8 scales per 16, a global scale (NVFP4A16; --dynamic: W4A4).",
        ),
        click.option(
            "--mxfp4",
            "scheme_mxfp4",
            is_flag=True,
            help="MXFP4: e2m1 weights, power-of-two scales per 32 (MXFP4A16; --dynamic: W4A4).",
        ),
        click.option(
            "--mxfp8",
            "scheme_mxfp8",
            is_flag=True,
            help="MXFP8: float8_e4m3fn weights, power-of-two scales per 32 (MXFP8A16; --dynamic: W8A8).",
        ),
        click.option(
            "--group-size",
            type=click.IntRange(min=2),
            default=None,
            metavar="N",
            help="One scale per group of N input columns (int8/int4).",
        ),
        click.option("--per-tensor", is_flag=True, help="One scale per tensor."),
        click.option("--per-channel", is_flag=True, help="One scale per output channel (row)."),
        click.option(
            "--asymmetric",
            is_flag=True,
            help="Integer codes with a zero point (int4/int8 groups or channels).",
        ),
        click.option(
            "--dynamic",
            is_flag=True,
            help="Declare activations dynamic: W8A8 (int-quantized) with --int8, FP8-dynamic with --fp8, "
            "W4A4 with --nvfp4/--mxfp4, W8A8 with --mxfp8.",
        ),
        click.option(
            "--act-strategy",
            type=click.Choice(["token", "tensor"]),
            default=None,
            help="Granularity of dynamic activations (default: token).",
        ),
        click.option(
            "--optimize",
            is_flag=True,
            help="Search error-minimising scales per group/channel instead of plain absmax "
            "(int8, int4, nvfp4, mxfp4).",
        ),
        click.option(
            "--include",
            multiple=True,
            metavar="GLOB",
            help="Also quantize tensors matching GLOB that the default rules skip (repeatable).",
        ),
        click.option(
            "--exclude",
            multiple=True,
            metavar="GLOB",
            help="Never touch tensors matching GLOB; wins over --include (repeatable).",
        ),
        click.option(
            "--strict-group-size",
            is_flag=True,
            help="Leave a tensor whose columns are not a multiple of the group size dense (default: quantize "
            "it with the largest of half, a quarter, ... of the group size, at least 32, that divides "
            "them, in a config group of its own).",
        ),
        click.option(
            "--clamp-fp16",
            is_flag=True,
            help="Saturate values beyond ±65504 in an fp16 cast instead of failing.",
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


#: scheme flag -> the preset it selects
SCHEME_FLAGS = {
    "int8": "int8",
    "int4": "int4",
    "fp8": "fp8",
    "fp16": "fp16",
    "bf16": "bf16",
    "fp8-block": "fp8-block",
    "nvfp4": "nvfp4a16",
    "mxfp4": "mxfp4a16",
    "mxfp8": "mxfp8a16",
}


def _pop_scheme(kw: dict[str, Any]) -> str:
    """The one scheme asked for; two scheme flags (``--int8 --int4``) are a usage error."""
    given = [f"--{f}" for f in SCHEME_FLAGS if kw.pop("scheme_" + f.replace("-", "_"))]
    named = kw.pop("scheme")
    if named is not None:
        given.insert(0, f"--scheme {named}")
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} conflict: give one scheme")
    if not given:
        return "int8"
    return named if named is not None else SCHEME_FLAGS[given[0][2:]]


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Reject ``nan``/``inf`` thresholds (a NaN floor would fail or pass every tensor silently)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _scheme_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {
        "group_size": kw.pop("group_size"),
        "per_tensor": kw.pop("per_tensor"),
        "per_channel": kw.pop("per_channel"),
        "asymmetric": kw.pop("asymmetric"),
        "dynamic": kw.pop("dynamic"),
        "act_strategy": kw.pop("act_strategy"),
        "optimize": kw.pop("optimize"),
    }


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", type=click.Path(path_type=str))
@scheme_options
@click.option(
    "--target-bpw",
    type=float,
    default=None,
    metavar="BITS",
    callback=_finite,
    help="Mixed precision: per tensor choose int4 g32/g64/g128, int8 or the original dtype to fit BITS "
    "bits per weight with the least estimated error (with --nvfp4/--mxfp4/--mxfp8/--fp8-block: "
    "among mxfp4, nvfp4, mxfp8, fp8-block and the original dtype).",
)
@click.option(
    "--min-sqnr",
    type=float,
    default=None,
    metavar="DB",
    callback=_finite,
    help="Mixed precision: per tensor the smallest storage whose estimated SQNR reaches DB.",
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    metavar="SIZE",
    help="Output shard size cap (e.g. 5GB, 500MB, 2GiB).",
)
@click.option(
    "--worker",
    default=None,
    metavar="K/N",
    help="Process only shards i with i % N == K (split one job over N processes or machines).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Shards processed concurrently by this process.",
)
@click.option(
    "--restart", is_flag=True, help="Discard an unfinished or finished job of other options in DST."
)
@click.option(
    "--backend",
    type=click.Choice(["mmap", "pread"]),
    default="mmap",
    show_default=True,
    help="How safetensors input is read.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="torch threads per job (1 is fastest on small shared machines).",
)
@click.option(
    "--stats",
    "stats",
    type=click.Choice(["exact", "sample", "off"]),
    default="exact",
    show_default=True,
    help="Per-tensor error statistics during the run: measured on every row (exact: the figures and worst "
    "tensors 'monoquant verify --against' gives), estimated on every 8th row (sample: cheaper, may "
    "miss a tensor whose error sits in a few rows) or none.",
)
@click.option(
    "--overlap",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Use a second core: write and checksum on a background thread, share each tensor's blocks "
    "with a kernel helper (a forked process on Linux; MONOQUANT_KERNEL_PROCESS=0: a thread), and "
    "copy large kept tensors on a third thread; auto: when a CPU core is idle.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan (from headers only) and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress and no summary (errors still go to stderr).")
@click.option("-v", "--verbose", count=True, help="Show tracebacks of errors.")
def stream(src: str, dst: str, **kw: Any) -> None:
    """Quantize the checkpoint SRC into the new directory DST, shard by shard.

    SRC is a .safetensors file, a directory of shards (with or without
    model.safetensors.index.json) or PyTorch .bin/.pt zip checkpoints. Memory stays bounded
    whatever the model size; rerun the same command after a crash to resume. SRC may be a URL
    (s3://bucket/model/, gs://, hf://, https://; pip install 'monoquant[remote]'): safetensors
    are read by byte ranges, nothing of the input is written to local disk (docs/remote.md).

    \b
    Examples:
      monoquant stream ckpt/ out/ --int8
      monoquant stream ckpt/ out/ --int4 --group-size 64 --exclude '*layers.0.*'
      monoquant stream ckpt/ out/ --int8 --dynamic           # W8A8 for vLLM
      monoquant stream ckpt/ out/ --int4 --worker 0/4        # one of four workers
      monoquant stream s3://bucket/model/ out/ --int8        # straight from object storage
    """
    from . import headstart

    # before torch is imported: the disk starts on the input's first bytes while torch loads (not
    # for a plan, nor for mixed precision, which first samples rows of every tensor)
    sampling = kw["target_bpw"] is not None or kw["min_sqnr"] is not None
    early = (
        None
        if kw["dry_run"] or sampling
        else headstart.begin(src, dst, worker=kw["worker"], restart=kw["restart"])
    )
    try:
        _stream(src, dst, kw)
    finally:
        if early is not None:
            early.stop()


#: what OpenBLAS reads for its thread count, in its order (the first one set wins)
_BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def _stream(src: str, dst: str, kw: dict[str, Any]) -> None:
    from . import torchstart  # (imports nothing that imports torch)

    if _own_process:
        if not any(v in os.environ for v in _BLAS_THREADS):
            # torch imports numpy where it is installed, and numpy's OpenBLAS starts a thread for
            # each further core, which spins a while after the import (0.1 s of CPU in a 4 GB
            # run). A run calls no BLAS through numpy, and its kernels' dot products run one
            # thread each. Only for stream (verify --engine runs models), and only when the user
            # set none of the variables OpenBLAS reads.
            os.environ["OPENBLAS_NUM_THREADS"] = "1"
        # no collections while torch loads: its ~170 K new objects set off some 350 that freed
        # next to nothing, on the start-up's one core (the start-up took 1.08 times as long with
        # them: scripts/startup.py)
        gc.disable()
        # torch's Python meta kernels (about a sixth of its import) load only if touched
        torchstart.defer_meta_kernels()
    with interrupt_after():  # the first import of torch
        from . import pipeline
    if _own_process:
        torchstart.finish_import()
        # the ~170 K objects of torch and the modules are out of every later collection: a full
        # one walked them all while holding the GIL (0.09 s in a 4 GB int8 run, and more of them
        # with more tensors); the process ends with the command, so they never need collecting
        gc.freeze()
        gc.enable()

    verbose, quiet, as_json, dry = kw.pop("verbose"), kw.pop("quiet"), kw.pop("as_json"), kw.pop("dry_run")
    sopts = _scheme_kwargs(kw)
    common = {
        "include": list(kw.pop("include")),
        "exclude": list(kw.pop("exclude")),
        "clamp_fp16": kw.pop("clamp_fp16"),
        "strict_group_size": kw.pop("strict_group_size"),
        "max_shard_size": kw.pop("max_shard_size"),
        "target_bpw": kw.pop("target_bpw"),
        "min_sqnr": kw.pop("min_sqnr"),
    }
    name = _pop_scheme(kw)
    from .options import resolve_scheme

    scheme = _run(verbose, lambda: resolve_scheme(name, sopts))  # once: the library takes the value
    if scheme.kind == "cast" and (common["target_bpw"] is not None or common["min_sqnr"] is not None):
        opt = "--target-bpw" if common["target_bpw"] is not None else "--min-sqnr"
        raise click.UsageError(
            f"{opt} chooses among int4/int8 storages; it needs --int4 or --int8, not --{name}"
        )
    if dry:
        p = _run(verbose, lambda: pipeline.plan(src, scheme, **common))
        if as_json:
            click.echo(json.dumps(p.to_json(), indent=1))
        else:
            _print_plan(p)
        return
    bar = _Progress(quiet or as_json)
    report = _run(
        verbose,
        lambda: pipeline.stream(
            src,
            dst,
            scheme,
            **common,
            worker=kw["worker"],
            jobs=kw["jobs"],
            restart=kw["restart"],
            backend=kw["backend"],
            threads=kw["threads"],
            stats=kw["stats"],
            overlap={"on": True, "off": False}.get(kw["overlap"], "auto"),
            on_progress=bar,
        ),
    )
    bar.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=1))
    elif not quiet:
        _print_report(report)


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option(
    "--against",
    type=click.Path(path_type=str),
    default=None,
    metavar="IN",
    help="The input checkpoint: dequantize every tensor and report its error.",
)
@click.option(
    "--min-sqnr",
    type=float,
    default=None,
    metavar="DB",
    callback=_finite,
    help="Exit with code 3 when any tensor's SQNR is below DB (a CI gate; needs --against).",
)
@click.option(
    "--top", type=click.IntRange(min=0), default=10, show_default=True, help="Worst tensors to list."
)
@click.option(
    "--engine",
    type=click.Choice(["vllm", "transformers"]),
    default=None,
    help="Deployability gate: load OUT and IN in this installed engine, run fixed texts, compare "
    "(needs --against).",
)
@click.option(
    "--max-ppl-ratio",
    type=float,
    default=None,
    metavar="R",
    help="With --engine, causal LMs: highest perplexity(OUT)/perplexity(IN) [default: 1.5].",
)
@click.option(
    "--min-top1",
    type=float,
    default=None,
    metavar="F",
    help="With --engine, causal LMs: lowest top-1 token agreement with IN [default: 0.75].",
)
@click.option(
    "--min-cosine",
    type=float,
    default=None,
    metavar="C",
    help="With --engine, other models: lowest embedding cosine with IN [default: 0.9].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable JSON report on stdout.")
@click.option("-v", "--verbose", count=True, help="Show tracebacks of errors.")
def verify(
    out: str,
    against: str | None,
    min_sqnr: float | None,
    top: int,
    engine: str | None,
    max_ppl_ratio: float | None,
    min_top1: float | None,
    min_cosine: float | None,
    as_json: bool,
    verbose: int,
) -> None:
    """Check the output directory OUT; with --against IN, measure its error.

    Checks that the index, shard headers, sizes, quantized tensor parts and config.json agree.
    With --against it streams through both checkpoints (bounded memory), dequantizes each
    tensor and reports SQNR, relative error and max abs error, worst tensors first.
    With --engine it also loads OUT and IN in that engine (vLLM or transformers, whichever you
    installed), runs a few fixed texts and compares: perplexity ratio and top-1 agreement for
    causal LMs, embedding cosine for other models.

    \b
    Exit codes: 0 all good; 1 the output is inconsistent or unreadable, or the
                engine is not installed or cannot load it; 3 some tensor is below
                --min-sqnr, (with --against) decodes to NaN/Inf or to all zeros from a
                non-zero input, or the engine comparison is below its thresholds.
    \b
    Examples:
      monoquant verify out/ --against ckpt/ --min-sqnr 20
      monoquant verify out/ --against ckpt/ --engine vllm --max-ppl-ratio 1.2
    """
    with interrupt_after():  # the first import of torch
        from .verify import verify as run_verify

    if min_sqnr is not None and against is None:
        raise click.UsageError("--min-sqnr needs --against IN")
    if engine is not None and against is None:
        raise click.UsageError("--engine needs --against IN")
    if engine is None and any(v is not None for v in (max_ppl_ratio, min_top1, min_cosine)):
        raise click.UsageError("--max-ppl-ratio, --min-top1 and --min-cosine need --engine")
    deploy_report = None
    if engine is not None:
        from . import deploy

        _run(verbose, lambda: deploy.require_engine(engine))
    r = _run(verbose, lambda: run_verify(out, against=against, min_sqnr=min_sqnr))
    if engine is not None and not r.problems:
        from . import deploy

        src, eng = against, engine
        assert src is not None  # --engine needs --against (checked above)
        deploy_report = _run(
            verbose,
            lambda: deploy.check_deploy(
                out,
                src,
                engine=eng,
                max_ppl_ratio=deploy.MAX_PPL_RATIO if max_ppl_ratio is None else max_ppl_ratio,
                min_top1=deploy.MIN_TOP1 if min_top1 is None else min_top1,
                min_cosine_sim=deploy.MIN_COSINE if min_cosine is None else min_cosine,
            ),
        )
    if as_json:
        js = r.to_json()
        if deploy_report is not None:
            js["engine"] = deploy_report.to_json()
            js["ok"] = js["ok"] and deploy_report.ok
        click.echo(json.dumps(js, indent=1))
    else:
        for p in r.problems:
            click.echo(f"problem: {p}")
        what = f"{r.tensors} tensors ({r.quantized} quantized)"
        if against is not None:
            js = r.to_json()
            from .remote import scrub

            click.echo(
                f"verify: {out}: {what}; {r.compared} compared with {scrub(against)}; mean SQNR "
                + (f"{js['mean_sqnr_db']:.2f} dB" if js["mean_sqnr_db"] is not None else "n/a")
            )
            for name, st in r.worst(top):
                mark = "  BELOW" if name in r.below else ""
                click.echo(
                    f"  {st.sqnr_db:7.2f} dB  rel {st.rel_err:.2e}  max {st.max_abs_err:.3e}  {name}{mark}"
                )
            for name, why in r.failed.items():
                click.echo(f"  FAILED  {name}: {why}")
        else:
            click.echo(f"verify: {out}: {what}; structure " + ("ok" if not r.problems else "INCONSISTENT"))
        if r.failed:
            click.echo(f"verify: {len(r.failed)} tensor(s) decode to NaN/Inf or to all zeros", err=True)
        if r.below:
            click.echo(f"verify: {len(r.below)} tensor(s) below {min_sqnr} dB", err=True)
        if deploy_report is not None:
            figures = ", ".join(f"{k} {v}" for k, v in deploy_report.metrics.items())
            click.echo(f"verify: {engine}: {deploy_report.task}: {figures}")
            for f in deploy_report.failed:
                click.echo(f"verify: {engine}: below threshold: {f}", err=True)
    if r.problems:
        sys.exit(EXIT_ERROR)
    if r.below or r.failed or (deploy_report is not None and not deploy_report.ok):
        sys.exit(EXIT_BELOW_THRESHOLD)


@main.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON description.")
@click.option("-v", "--verbose", count=True, help="Show tracebacks of errors.")
def inspect(path: str, as_json: bool, verbose: int) -> None:
    """Show what is in the checkpoint PATH (input or output): tensors, dtypes, sizes, shards,
    quantization state and scheme per tensor, bits per weight.

    \b
    Example:
      monoquant inspect out/ --json | jq .totals
    """
    with interrupt_after():  # the first import of torch
        from .inspection import inspect_checkpoint

    info = _run(verbose, lambda: inspect_checkpoint(path))
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    width = max((len(t["name"]) for t in info["tensors"]), default=10)
    for t in info["tensors"]:
        kind = t["scheme"] if t["state"] == "quantized" else "dense"
        bpw = f"{t['bits_per_weight']:.2f} bpw" if t.get("bits_per_weight") else ""
        click.echo(
            f"{t['name']:<{width}}  {kind:<14} {t['dtype']:<9} {t['shape']!s:<16} "
            f"{human_bytes(t['bytes']):>10}  {bpw}"
        )
    for name, f in info["files"].items():
        click.echo(f"file {name}: {human_bytes(f['bytes'])}, {f['tensors']} tensors")
    tot = info["totals"]
    bpw = f", {tot['bits_per_weight']:.3f} bits per quantized weight" if tot["bits_per_weight"] else ""
    kinds = ", ".join(f"{k} {human_bytes(v)}" for k, v in tot["bytes_by_kind"].items())
    click.echo(
        f"total: {tot['tensors']} tensors ({tot['quantized']} quantized), {human_bytes(tot['bytes'])}{bpw} "
        f"[{kinds}]"
    )
    if info["quantization_config"]:
        qc = info["quantization_config"]
        click.echo(
            f"config.json: quant_method {qc.get('quant_method')}, format {qc.get('format')}, "
            f"status {qc.get('quantization_status')}, {len(qc.get('config_groups') or {})} group(s)"
        )


MIXED_NOTE = (
    "mixed precision: loads in transformers' default path (and vLLM); transformers' dequantize=True path "
    "applies one config group's scheme to every layer and gives wrong weights"
)


class _Progress:
    """tqdm bar in bytes on a terminal; sparse plain lines otherwise (CI logs)."""

    def __init__(self, silent: bool):
        self.silent = silent
        self.tty = sys.stderr.isatty()
        self.bar: Any = None
        self.last_line = 0.0
        self.last_frac = -1.0

    def __call__(self, ev: Any) -> None:
        if self.silent:
            return
        if ev.kind == "start":
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=ev.bytes_total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc="monoquant",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
            self.started = time.monotonic()
            return
        if ev.kind in ("tensor", "shard_skipped", "shard_busy", "shard_done"):
            if self.bar is not None:
                self.bar.n = ev.bytes_done
                self.bar.set_postfix_str(f"shards {ev.shards_done}/{ev.shards_total}", refresh=False)
                self.bar.refresh()
            elif ev.bytes_total:
                frac = ev.bytes_done / ev.bytes_total
                now = time.monotonic()
                if ev.kind != "tensor" or frac - self.last_frac >= 0.1 or now - self.last_line >= 30:
                    if ev.kind == "tensor" and frac - self.last_frac < 0.1 and now - self.last_line < 30:
                        return
                    self.last_frac, self.last_line = frac, now
                    elapsed = now - getattr(self, "started", now)
                    eta = elapsed * (1 - frac) / frac if frac > 0 else math.nan
                    what = {"shard_skipped": " (already done)", "shard_busy": " (another worker)"}.get(
                        ev.kind, ""
                    )
                    click.echo(
                        f"monoquant: {frac:5.1%} {human_bytes(ev.bytes_done)}/{human_bytes(ev.bytes_total)} "
                        f"shards {ev.shards_done}/{ev.shards_total}{what}"
                        + (f", eta {eta:.0f} s" if math.isfinite(eta) else ""),
                        err=True,
                    )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


WARNING_WHAT = {
    "group-fallback": "quantized with smaller groups",
    "group-mismatch": "left dense",
    "include-ignored": "not quantized despite --include",
    "shape": "left dense",
}


def warning_lines(summary: list[dict[str, Any]]) -> list[str]:
    """One line per warning category: count, what happened, one example and its reason."""
    out = []
    for w in summary:
        what = WARNING_WHAT.get(w["category"], "flagged")
        out.append(f"{w['count']} tensor(s) {what}, e.g. {w['example']}: {w['reason']}")
    return out


def _print_plan(p: Any) -> None:
    from .dtypes import dtype_name

    click.echo(f"plan: {p.source} -> {p.scheme.name}  (fingerprint {p.fingerprint[:12]})")
    width = max((len(t.ref.name) for t in p.tensors), default=10)
    for t in p.tensors:
        s = t.decision.scheme.name if (t.decision.scheme and t.decision.action != "copy") else "-"
        flag = "!" if t.decision.warn else " "
        click.echo(
            f" {flag}{t.decision.action:<8} {s:<14} {t.ref.name:<{width}}  {dtype_name(t.ref.dtype):<8} "
            f"{list(t.ref.shape)!s:<16} {human_bytes(t.ref.nbytes):>10} -> {human_bytes(t.out_bytes):>10}  "
            f"{p.shards[t.shard].filename}  ({t.decision.reason})"
        )
    for s in p.shards:
        click.echo(f"shard {s.filename}: {human_bytes(s.file_size)}, {len(s.tensors)} tensors")
    tot = p.totals()
    bpw = (
        f"{tot['bits_per_weight']:.3f} bits per quantized weight"
        if tot["bits_per_weight"]
        else "no tensor quantized"
    )
    click.echo(
        f"total: {tot['tensors']} tensors ({tot['quantized']} quantized, {tot['cast']} cast, {tot['copied']} "
        "copied), "
        f"{human_bytes(tot['bytes_in'])} -> {human_bytes(tot['bytes_out'])} ({tot['ratio']:.1%}), {bpw}, "
        f"{tot['shards']} shard(s), estimated peak memory {human_bytes(tot['estimated_peak_bytes'])}"
    )
    for line in warning_lines(tot.get("warning_summary", [])):
        click.echo(f"warning: {line}")
    if "mixed" in tot:
        m = tot["mixed"]
        choices = ", ".join(f"{k} x{v}" for k, v in m["choices"].items())
        click.echo(
            f"mixed precision: {choices}; estimated SQNR {m['est_sqnr_db']} dB"
            + ("" if m["feasible"] else " (target not reachable: smallest storage everywhere)")
        )
        if len(p.schemes_used()) > 1:
            click.echo(f"note: {MIXED_NOTE}")
    for s in p.schemes_used().values():
        for note in s.compat_notes():
            click.echo(f"note: {note}")
    click.echo("dry run: nothing was written")


def _print_report(r: Any) -> None:
    pl = r.plan
    mem = r.memory
    if r.shards_written == 0 and r.complete and r.shards_skipped == 0:
        click.echo(f"monoquant: {r.output} is already complete for these options; nothing to do")
        return
    state = "complete" if r.complete else "shards done; index pending (other workers)"
    what = r.scheme
    if "mixed" in pl:  # say what was written, not only what was asked for
        what = "mixed precision: " + ", ".join(f"{k} x{v}" for k, v in pl["mixed"]["choices"].items())
        what += f"; {r.scheme} requested"
    click.echo(
        f"monoquant: {state}: {r.output} ({what}): {pl['quantized']} quantized, {pl['cast']} cast, "
        f"{pl['copied']} copied tensors in {pl['shards']} shard(s)"
    )
    extra = f", {r.shards_skipped} already done" if r.shards_skipped else ""
    extra += f", {r.shards_busy} held by other workers" if r.shards_busy else ""
    bpw = f", {pl['bits_per_weight']:.3f} bits/weight" if pl["bits_per_weight"] else ""
    click.echo(
        f"  this run: {r.shards_written} shard(s) written{extra}; {human_bytes(r.bytes_in)} -> "
        f"{human_bytes(r.bytes_out)}"
        f"{bpw}; {r.seconds:.2f} s ({r.gb_per_s:.2f} GB/s)"
    )
    anon, rss = human_bytes(mem.get("peak_anon") or 0), human_bytes(mem.get("peak_rss") or 0)
    peak = f"  peak memory: {anon} anonymous, {rss} RSS"
    if mem.get("cgroup_peak"):
        peak += f", {human_bytes(mem['cgroup_peak'])} cgroup (page cache included)"
    click.echo(peak)
    m = r.mean_sqnr()
    if m is not None:
        worst = ", ".join(f"{n} {s.sqnr_db:.1f} dB" for n, s in r.worst(3))
        how = (
            ""
            if r.settings.get("stats") == "exact"
            else " (estimated on sampled rows; exact: monoquant verify --against SRC)"
        )
        click.echo(f"  error{how}: mean SQNR {m:.2f} dB over {len(r.stats)} tensors; worst: {worst}")
    for line in warning_lines(pl.get("warning_summary", [])):
        click.echo(f"  warning: {line}")
    for note in r.notes:
        click.echo(f"  note: {note}")
    for note in r.compat_notes():  # of every scheme the output holds, not only the one asked for
        click.echo(f"  note: {note}")
    if "mixed" in pl:
        m = pl["mixed"]
        click.echo("  mixed precision: " + ", ".join(f"{k} x{v}" for k, v in m["choices"].items()))
        click.echo(f"  note: {MIXED_NOTE}")


if __name__ == "__main__":  # pragma: no cover
    main()
