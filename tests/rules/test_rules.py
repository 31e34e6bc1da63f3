"""ClipGlobalNorm, AdaptiveGradClip and chain against independent float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import SYNC_OPS, HostReadCounter, OpCounter, fill_grads, mlp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradclip
from gradclip.core.kernels import large_tensor_elements

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


def _params(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int, scale: float) -> list:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        p.grad = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


shapes_st = st.lists(
    st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple), min_size=1, max_size=5
)


# -- ClipGlobalNorm ---------------------------------------------------------------------
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@given(
    shapes=shapes_st,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    max_norm=st.sampled_from([0.5, 1.0, 4.0]),
)
def test_global_norm_matches_torch_clip_grad_norm(
    norm_type: float, shapes: list, dtype: torch.dtype, seed: int, scale: float, max_norm: float
) -> None:
    ours = _params(shapes, dtype, seed, scale)
    theirs = _params(shapes, dtype, seed, scale)
    total = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type)
    report = gradclip.normalize_(ours, gradclip.ClipGlobalNorm(max_norm, norm_type))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-12)
    stat = report.to_dict()["stats"]["global_norm"]
    assert stat == pytest.approx(float(total), rel=1e-5)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_global_norm_against_float64_formula_with_layers(norm_type: float) -> None:
    model = mlp(3)
    grads = fill_grads(model, scale=5.0)
    flat = torch.cat([g.double().flatten() for g in grads])
    p = norm_type
    total = float(flat.abs().max() if math.isinf(p) else flat.abs().pow(p).sum() ** (1 / p))
    coef = min(1.0, 2.0 / (total + 1e-6))
    gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(2.0, norm_type)).apply()
    for param, g in zip(model.parameters(), grads):
        torch.testing.assert_close(param.grad.double(), g.double() * coef, rtol=1e-6, atol=0)


def test_global_norm_under_threshold_is_bit_identical() -> None:
    model = mlp(2)
    grads = fill_grads(model, scale=1e-3)
    gradclip.normalize_(model, gradclip.ClipGlobalNorm(100.0, 3.0))
    for param, g in zip(model.parameters(), grads):
        assert torch.equal(param.grad, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_global_norm_half_precision_accumulates_in_float32(dtype: torch.dtype) -> None:
    # every element fits in fp16, but the fp16 sum of squares would overflow
    params = [nn.Parameter(torch.zeros(4096, dtype=dtype)) for _ in range(2)]
    for p in params:
        p.grad = torch.full((4096,), 200.0, dtype=dtype)
    report = gradclip.normalize_(params, gradclip.ClipGlobalNorm(1.0))
    expected = 200.0 * math.sqrt(8192)
    assert report.to_dict()["stats"]["global_norm"] == pytest.approx(expected, rel=1e-3)
    got = torch.linalg.vector_norm(torch.cat([p.grad.float() for p in params]))
    assert float(got) == pytest.approx(1.0, rel=1e-2)


def test_global_norm_is_global_over_the_layers_it_is_given() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    grads = fill_grads(model, scale=10.0)
    normalizer = gradclip.GradientNormalizer(
        model, gradclip.ClipGlobalNorm(1.0), overrides={"2": None}
    )
    normalizer.apply()
    clipped = [p.grad for p in list(model.parameters())[:4]]
    assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in clipped]))) == (
        pytest.approx(1.0, rel=1e-5)
    )
    for p, g in zip(list(model.parameters())[4:], grads[4:]):
        assert torch.equal(p.grad, g)


def test_global_norm_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        gradclip.ClipGlobalNorm(0.0)
    with pytest.raises(ValueError, match="norm_type"):
        gradclip.ClipGlobalNorm(1.0, 0.5)
    with pytest.raises(TypeError, match="norm_type"):
        gradclip.ClipGlobalNorm(1.0, "2")  # type: ignore[arg-type]


# -- AdaptiveGradClip --------------------------------------------------------------------
def agc_reference(w: torch.Tensor, g: torch.Tensor, clipping: float, eps: float) -> torch.Tensor:
    """Brock et al. 2021, eq. (3), in float64, written from the paper."""
    w, g = w.double(), g.double()
    out = g.clone()
    units = range(g.shape[0]) if g.dim() >= 2 else [None]
    for u in units:
        gu = g if u is None else g[u]
        wu = w if u is None else w[u]
        bound = max(float(torch.sqrt((wu * wu).sum())), eps) * clipping
        gnorm = float(torch.sqrt((gu * gu).sum()))
        if gnorm >= bound:
            scaled = gu * (bound / max(gnorm, 1e-6))
            if u is None:
                out = scaled
            else:
                out[u] = scaled
    return out


@given(
    shapes=st.lists(
        st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple), min_size=1, max_size=6
    ),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
    clipping=st.sampled_from([0.01, 0.1, 1.0]),
    scale=st.sampled_from([1e-4, 1e-2, 1.0]),
)
def test_agc_matches_float64_reference(
    shapes: list, dtype: torch.dtype, seed: int, clipping: float, scale: float
) -> None:
    params = _params(shapes, dtype, seed, scale)
    expected = [agc_reference(p.detach(), p.grad, clipping, 1e-3) for p in params]
    before = [p.grad.clone() for p in params]
    gradclip.normalize_(params, gradclip.AdaptiveGradClip(clipping))
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for p, e, b in zip(params, expected, before):
        torch.testing.assert_close(p.grad.double(), e.to(dtype).double(), rtol=tol, atol=0)
        untouched = torch.isclose(e, b.double(), rtol=0, atol=0)
        assert torch.equal(p.grad[untouched], b[untouched])  # unclipped units: bit for bit


def test_agc_large_tensors_and_chunks_take_the_same_formula() -> None:
    limit = large_tensor_elements(torch.device("cpu"))
    shapes = [(limit // 4 + 3, 8), (3, 7, 2, 2)] + [(5, 6)] * 40 + [(limit + 1,)]
    params = _params(shapes, torch.float32, 7, 0.05)
    expected = [agc_reference(p.detach(), p.grad, 0.02, 1e-3) for p in params]
    gradclip.normalize_(params, gradclip.AdaptiveGradClip(0.02))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-5, atol=1e-12)


def test_agc_classifier_left_unclipped_with_override() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    grads = fill_grads(model, scale=10.0)
    normalizer = gradclip.GradientNormalizer(
        model, gradclip.AdaptiveGradClip(0.01), overrides={"2": None}
    )
    report = normalizer.apply()
    assert torch.equal(model[2].weight.grad, grads[2]) and torch.equal(model[2].bias.grad, grads[3])
    assert not torch.equal(model[0].weight.grad, grads[0])
    assert report.to_dict()["changed"] == {"0": True, "2": False}


def test_agc_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="clipping"):
        gradclip.AdaptiveGradClip(-1.0)
    with pytest.raises(ValueError, match="eps"):
        gradclip.AdaptiveGradClip(0.01, eps=0.0)


# -- chain ------------------------------------------------------------------------------
def test_chain_applies_in_order_and_remeasures() -> None:
    model = mlp(3)
    grads = fill_grads(model, scale=3.0)
    expected = [g.clamp(-0.5, 0.5) for g in grads]
    total = float(torch.linalg.vector_norm(torch.cat([e.flatten() for e in expected])))
    expected = [e * min(1.0, 1.0 / (total + 1e-6)) for e in expected]
    clip = gradclip.chain(("ClipElementWiseAbsoluteValue", 0.5), gradclip.ClipGlobalNorm(1.0))
    report = gradclip.GradientNormalizer(model, clip).apply()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)
    # the global norm the second rule saw is the norm after clamping, not before
    assert report.to_dict()["stats"]["global_norm"] == pytest.approx(total, rel=1e-6)
    before = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert sum(v**2 for v in report.to_dict()["layer_norms"].values()) == pytest.approx(
        before**2, rel=1e-6
    )


def test_chain_order_matters() -> None:
    model_a, model_b = mlp(2), mlp(2)
    fill_grads(model_a, scale=3.0)
    fill_grads(model_b, scale=3.0)
    clamp = ("ClipElementWiseAbsoluteValue", 0.05)
    gradclip.normalize_(model_a, gradclip.chain(clamp, gradclip.ClipGlobalNorm(1.0)))
    gradclip.normalize_(model_b, gradclip.chain(gradclip.ClipGlobalNorm(1.0), clamp))
    assert not all(
        torch.equal(a.grad, b.grad) for a, b in zip(model_a.parameters(), model_b.parameters())
    )


@pytest.mark.parametrize(
    "strategy",
    [gradclip.ClipGlobalNorm(1.0), gradclip.AdaptiveGradClip(0.05), "ClipL2PerLayer"],
    ids=str,
)
def test_chain_of_one_equals_the_rule(strategy: object) -> None:
    model_a, model_b = mlp(3), mlp(3)
    model_b.load_state_dict(model_a.state_dict())
    fill_grads(model_a, scale=3.0)
    fill_grads(model_b, scale=3.0)
    gradclip.normalize_(model_a, strategy)
    gradclip.normalize_(model_b, gradclip.chain(strategy))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_chain_needs_a_strategy_and_describes_itself() -> None:
    with pytest.raises(ValueError, match="at least one"):
        gradclip.chain()
    clip = gradclip.chain("ClipL2PerLayer", gradclip.ClipGlobalNorm(2.0))
    assert clip.describe() == (
        "chain(ClipL2PerLayer(threshold=1.0), ClipGlobalNorm(max_norm=2.0, norm_type=2.0))"
    )


# -- no host synchronization -----------------------------------------------------------
ALL_STRATEGIES = [
    gradclip.ClipGlobalNorm(1.0),
    gradclip.ClipGlobalNorm(1.0, 3.0),
    gradclip.ClipGlobalNorm(1.0, math.inf),
    gradclip.AdaptiveGradClip(),
    gradclip.AutoClip(),
    gradclip.AutoClip(25.0, history_size=3, scope="layer"),
    gradclip.ZClip(warmup_steps=2),
    gradclip.ZClip(warmup_steps=2, max_grad_norm=1.0, scope="layer"),
    gradclip.chain(("ClipElementWiseAbsoluteValue", 0.5), gradclip.ZClip(warmup_steps=2)),
]


@pytest.mark.parametrize("strategy", ALL_STRATEGIES, ids=str)
@pytest.mark.parametrize("nonfinite", ["propagate", "zero"])
def test_no_host_sync_in_apply(strategy: gradclip.Strategy, nonfinite: str) -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 2))
    normalizer = gradclip.GradientNormalizer(model, strategy, nonfinite=nonfinite)
    for step in range(5):  # warm-up steps, the step that ends warm-up, and later ones
        fill_grads(model, scale=1.0 + step, seed=step)
        with OpCounter() as counter, HostReadCounter() as reads:
            normalizer.apply()
        assert counter.syncs == 0, {op: n for op, n in counter.ops.items() if op in SYNC_OPS}
        assert sum(reads.calls.values()) == 0, reads.calls


# -- compatibility with torch.nn.utils.clip_grad_norm_ ---------------------------------------
def test_norm_type_accepts_the_string_inf_as_torch_does() -> None:
    assert gradclip.ClipGlobalNorm(1.0, "inf") == gradclip.ClipGlobalNorm(1.0, math.inf)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm_type"):
        gradclip.ClipGlobalNorm(1.0, 0.5)


@pytest.mark.parametrize("in_chain", [False, True])
def test_inf_norm_with_an_empty_parameter(in_chain: bool) -> None:
    empty = nn.Parameter(torch.zeros(0))
    full = nn.Parameter(torch.zeros(3))
    empty.grad, full.grad = torch.zeros(0), torch.tensor([3.0, -4.0, 1.0])
    rule: gradclip.Rule = gradclip.ClipGlobalNorm(1.0, math.inf)
    if in_chain:
        rule = gradclip.chain("ClipL2PerLayer", rule)
    gradclip.normalize_([empty, full], rule)
    expected = torch.tensor([3.0, -4.0, 1.0]) * (1.0 / (4.0 + 1e-6))
    if in_chain:
        expected = torch.tensor([3.0, -4.0, 1.0]) / math.sqrt(26)
        expected = expected * min(1.0, 1.0 / (float(expected.abs().max()) + 1e-6))
    assert torch.allclose(full.grad, expected)


def test_nonfinite_error_judges_the_norm_the_rule_uses() -> None:
    # finite float64 gradients whose squares overflow: torch's p=1 clip has no
    # trouble with them, and neither does nonfinite="error" under a p=1 rule
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p.grad = torch.full((4,), 2e200, dtype=torch.float64)
    twin = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    twin.grad = p.grad.clone()
    torch.nn.utils.clip_grad_norm_([twin], 1.0, norm_type=1.0, error_if_nonfinite=True)
    gradclip.normalize_([p], gradclip.ClipGlobalNorm(1.0, 1.0), nonfinite="error")
    assert torch.allclose(p.grad, twin.grad)
    p.grad = torch.full((4,), 2e200, dtype=torch.float64)
    with pytest.raises(gradclip.NonFiniteGradientError):  # the L2 norm does overflow
        gradclip.normalize_([p], "ClipL2PerLayer", nonfinite="error")
