"""chain(): rules in order, norms measured again between them."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import fill_grads, mlp

import gradclip

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


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
