"""Mixed precision by budget (monoquant.mixed): fits the budget, beats uniform int4 at equal size."""

import itertools
import math

import pytest
import torch

import monoquant.mixed as mixed
from monoquant.errors import SchemeError
from monoquant.kernels import ErrorStats, get_kernel
from monoquant.plan import make_plan
from monoquant.reader import open_checkpoint
from monoquant.rules import Rules
from monoquant.schemes import get_scheme
from tests.helpers import write_sharded
from tests.test_optimize import llama_like


def heterogeneous_sd(dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Layers that differ in how well int4 suits them: plain Gaussian, outlier columns, heavy tails."""
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(100, 256, generator=g).to(dtype)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{m}.weight"] = (torch.randn(256, 256, generator=g) / 16).to(dtype)
        sd[p + "mlp.gate_proj.weight"] = llama_like(512, 256, seed=10 + layer, dtype=dtype)
        sd[p + "mlp.up_proj.weight"] = llama_like(512, 256, seed=20 + layer, dtype=dtype)
        t = torch.distributions.StudentT(2.0).sample((256, 512)) / 30  # heavy tails
        sd[p + "mlp.down_proj.weight"] = t.to(dtype)
        sd[p + "input_layernorm.weight"] = torch.ones(256, dtype=dtype)
    return sd


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)  # StudentT samples from the global generator
    return heterogeneous_sd()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, sd):
    return open_checkpoint(write_sharded(tmp_path_factory.mktemp("mixed") / "in", sd, shards=2))


def evaluate(plan, sd) -> tuple[float, float, dict[str, float]]:
    """Exact (bits per weight, Σ numel·NSR / Σ numel, per-tensor SQNR) of a plan's eligible tensors,
    quantizing each whole tensor with its chosen scheme (kept tensors: no error)."""
    bits = 0
    cost = 0.0
    numel = 0
    sq: dict[str, float] = {}
    for t in plan.tensors:
        d = t.decision
        eligible = d.action == "quantize" or d.reason.startswith("mixed precision")
        if not eligible:
            continue
        w = sd[t.ref.name]
        numel += w.numel()
        bits += 8 * t.out_bytes
        if d.action == "quantize":
            st = ErrorStats()
            get_kernel(d.scheme).quantize_tensor(w, stats=st)
            cost += w.numel() * st.err_sq / st.sum_sq
            sq[t.ref.name] = st.sqnr_db
        else:
            sq[t.ref.name] = math.inf
    return bits / numel, cost / numel, sq


@pytest.mark.parametrize("uniform_group", [64, 32])
@pytest.mark.parametrize("asym", [False, True])
def test_budget_beats_uniform_int4_at_the_same_size(ckpt, sd, uniform_group, asym):
    base = get_scheme("int4", asymmetric=asym)
    uniform = get_scheme("int4", group_size=uniform_group, asymmetric=asym)
    u_bpw, u_cost, _ = evaluate(make_plan(ckpt, uniform), sd)
    target = u_bpw  # about 4.25 (g64) / 4.5 (g32) with bf16 scales; compare at exactly that size
    chooser = mixed.budget_chooser(ckpt, base, target_bpw=target)
    plan = make_plan(ckpt, base, chooser=chooser)
    m_bpw, m_cost, _ = evaluate(plan, sd)
    assert m_bpw <= target + 1e-9
    assert chooser.summary["bits_per_weight"] == pytest.approx(m_bpw, abs=1e-4)
    assert chooser.summary["feasible"]
    if uniform_group == 64:
        # the outlier and heavy-tailed layers get finer groups, paid for by the Gaussian ones
        assert m_cost < 0.95 * u_cost, (m_cost, u_cost)  # at least 0.2 dB better at equal size
        assert len(chooser.summary["choices"]) >= 2
    else:
        # uniform g32 is already on this model's efficient frontier: never worse
        assert m_cost <= u_cost * (1 + 1e-9), (m_cost, u_cost)
    # the summary's estimate is the exact figure (small tensors: the sample is the whole tensor)
    assert chooser.summary["est_mean_nsr"] == pytest.approx(m_cost, rel=1e-4)


def test_more_bits_never_cost_more_error(ckpt, sd):
    costs = []
    for target in (4.2, 4.5, 5.0, 6.0, 9.0):
        plan = make_plan(ckpt, "int4", chooser=mixed.budget_chooser(ckpt, "int4", target_bpw=target))
        bpw, cost, _ = evaluate(plan, sd)
        assert bpw <= target + 1e-9
        costs.append(cost)
    assert all(b <= a for a, b in itertools.pairwise(costs)), costs
    assert costs[-1] < costs[0] / 10


def test_min_sqnr_gives_each_tensor_the_smallest_storage_that_reaches_it(ckpt, sd):
    chooser = mixed.budget_chooser(ckpt, "int4", min_sqnr=19.0)
    plan = make_plan(ckpt, "int4", chooser=chooser)
    _, _, sq = evaluate(plan, sd)
    assert len(sq) == 14
    assert min(sq.values()) >= 19.0 - 1e-9
    for name, opt in chooser.choices.items():
        smaller = [o for o in chooser.options[name] if o.bits < opt.bits]
        assert all(o.sqnr_db < 19.0 for o in smaller), name
    # a floor no int4 reaches on the Gaussian layers sends them to int8
    hi = mixed.budget_chooser(ckpt, "int4", min_sqnr=30.0)
    assert {o.label for n, o in hi.choices.items() if "self_attn" in n} == {"int8"}


def test_unreachable_budget_keeps_the_smallest_storage(ckpt):
    chooser = mixed.budget_chooser(ckpt, "int4", target_bpw=3.0)
    assert not chooser.summary["feasible"]
    assert set(chooser.summary["choices"]) == {"int4-g128"}


def test_decisions_outside_the_rules_pass_through(ckpt):
    chooser = mixed.budget_chooser(ckpt, "int4", rules=Rules.of(exclude="*.k_proj.weight"), target_bpw=4.5)
    plan = make_plan(ckpt, "int4", rules=Rules.of(exclude="*.k_proj.weight"), chooser=chooser)
    by = {t.ref.name: t.decision for t in plan.tensors}
    embed = by["model.embed_tokens.weight"]
    assert embed.action == "copy" and "embed" in embed.reason
    assert by["model.layers.0.input_layernorm.weight"].action == "copy"
    assert by["model.layers.0.self_attn.k_proj.weight"].reason.startswith("excluded")
    assert len(chooser.choices) == 12
    q = by["model.layers.0.mlp.down_proj.weight"]
    assert q.reason.startswith("mixed precision (target_bpw 4.5)")


def test_keep_is_a_candidate_and_can_be_disabled(ckpt):
    chooser = mixed.budget_chooser(ckpt, "int4", target_bpw=20.0)  # room for everything dense
    assert set(chooser.summary["choices"]) == {mixed.KEEP}
    plan = make_plan(ckpt, "int4", chooser=chooser)
    assert all(t.decision.action == "copy" for t in plan.tensors)
    no_keep = mixed.budget_chooser(ckpt, "int4", target_bpw=20.0, allow_keep=False)
    assert set(no_keep.summary["choices"]) == {"int8"}


def test_same_choices_every_time_and_optimize_carries_over(ckpt):
    a = mixed.budget_chooser(ckpt, "int4", target_bpw=4.4)
    b = mixed.budget_chooser(ckpt, "int4", target_bpw=4.4, backend="pread")
    assert a.choices == b.choices and a.summary == b.summary
    o = mixed.budget_chooser(ckpt, get_scheme("int4", optimize=True), target_bpw=4.4)
    assert all(opt.scheme is None or opt.scheme.optimize for opt in o.choices.values())
    assert o.summary["est_sqnr_db"] > a.summary["est_sqnr_db"]


def test_bad_targets_are_refused(ckpt):
    with pytest.raises(SchemeError, match="exactly one"):
        mixed.budget_chooser(ckpt, "int4")
    with pytest.raises(SchemeError, match="exactly one"):
        mixed.budget_chooser(ckpt, "int4", target_bpw=4.5, min_sqnr=20)
    with pytest.raises(SchemeError, match="bits per weight"):
        mixed.budget_chooser(ckpt, "int4", target_bpw=0)


def test_sampling_reads_bounded_rows(tmp_path, monkeypatch):
    w = llama_like(4096, 512, seed=3)
    ck = open_checkpoint(write_sharded(tmp_path / "big", {"l.weight": w}, shards=1, index=False))
    read: list[tuple[int, int]] = []

    class Spy(mixed.RowReader):
        def rows(self, ref, start, stop, ws=None):
            read.append((start, stop))
            return super().rows(ref, start, stop, ws)

    monkeypatch.setattr(mixed, "RowReader", Spy)
    monkeypatch.setattr(mixed, "SAMPLE_ELEMENTS", 64 * 512)
    chooser = mixed.budget_chooser(ck, "int4", min_sqnr=15.0)
    assert sum(b - a for a, b in read) == 64  # 64 of 4096 rows, in 8 runs spread over the tensor
    assert len(read) == 8 and read[0][0] == 0 and read[-1][1] == 4096
    # the estimate from 1/64 of the rows is close to the exact figure
    st = ErrorStats()
    get_kernel(get_scheme("int4")).quantize_tensor(w, stats=st)
    est = next(o for o in chooser.options["l.weight"] if o.label == "int4-g128")
    assert est.sqnr_db == pytest.approx(st.sqnr_db, abs=0.5)


def test_sample_ranges_cover_small_tensors_and_spread_over_large_ones():
    assert mixed.sample_ranges(10, 100) == [(0, 10)]
    r = mixed.sample_ranges(100_000, 4096, elements=1 << 20, chunks=8)
    assert sum(b - a for a, b in r) == 256
    assert r[0][0] == 0 and r[-1][1] == 100_000
    assert all(a < b <= c for (a, b), (c, _) in itertools.pairwise(r))
    assert mixed.sample_ranges(5, 1 << 22) == [(0, 1)]  # at least one whole row


@pytest.mark.parametrize(
    ("scheme", "opts"),
    [
        ("nvfp4a16", {"target_bpw": 5.0}),
        ("int4", {"target_bpw": 5.0}),
        ("nvfp4a16", {"min_sqnr": 25.0}),
    ],
)
def test_fused_layers_get_one_storage(tmp_path, scheme, opts):
    """q/k/v and gate/up are one layer in vLLM, which refuses parts with different schemes: mixed
    precision chooses one storage per fused set (it used to give q nvfp4 and k/v fp8-block)."""
    from monoquant.fusedscales import shared_scale_groups
    from tests.helpers import tiny_llama_sd, write_sharded

    sd = tiny_llama_sd()
    src = write_sharded(tmp_path / "in", sd, shards=3)
    ch = mixed.budget_chooser(open_checkpoint(src), scheme, **opts)
    groups = shared_scale_groups(n for n in sd if n.endswith("proj.weight"))
    assert len(groups) == 10
    for members in groups.values():
        assert len({ch.choices[m].label for m in members}) == 1, {m: ch.choices[m].label for m in members}
    if "target_bpw" in opts:  # the budget still holds, with more than one storage in use
        assert ch.summary["bits_per_weight"] <= opts["target_bpw"]
        assert len({o.label for o in ch.choices.values()}) > 1
    else:
        assert all(o.sqnr_db >= opts["min_sqnr"] for o in ch.choices.values())
