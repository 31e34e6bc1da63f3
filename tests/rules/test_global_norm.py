"""ClipGlobalNorm against torch.nn.utils.clip_grad_norm_ and a float64 formula."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import fill_grads, grad_params, mlp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradclip

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


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
    ours = grad_params(shapes, dtype, seed, scale)
    theirs = grad_params(shapes, dtype, seed, scale)
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


# -- compatibility with torch.nn.utils.clip_grad_norm_ ---------------------------------------
def test_norm_type_accepts_the_string_inf_as_torch_does() -> None:
    assert gradclip.ClipGlobalNorm(1.0, "inf") == gradclip.ClipGlobalNorm(1.0, math.inf)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm_type"):
        gradclip.ClipGlobalNorm(1.0, 0.5)


@pytest.mark.parametrize("in_chain", [False, True])
@pytest.mark.filterwarnings("ignore:a per-layer rule was given a flat list")  # on purpose
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
