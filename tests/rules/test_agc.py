"""AdaptiveGradClip against a float64 reference written from the paper."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import fill_grads, grad_params
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import gradclip
from gradclip.core.kernels import large_tensor_elements

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


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
    params = grad_params(shapes, dtype, seed, scale)
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
    params = grad_params(shapes, torch.float32, 7, 0.05)
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
