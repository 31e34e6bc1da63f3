"""Argument checks that run before any gradient is touched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.validation import check_gradient, check_threshold, check_writable


@pytest.mark.parametrize("value", [1, 0.5, 1e-12, torch.tensor(2.0), torch.tensor([3.0])])
def test_thresholds_accepted_as_floats(value: object) -> None:
    assert isinstance(check_threshold(value), float)
    assert check_threshold(value) == pytest.approx(float(value))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("1.0", TypeError),
        (None, TypeError),
        (torch.ones(2), TypeError),
        (torch.tensor(1.0 + 1j), TypeError),
    ],
)
def test_thresholds_refused_with_their_name(value: object, error: type) -> None:
    with pytest.raises(error, match="max_norm"):
        check_threshold(value, what="max_norm")


def test_sparse_and_complex_gradients_are_refused_with_what_to_do() -> None:
    check_gradient("ok", torch.zeros(3))
    with pytest.raises(TypeError, match=r"'emb.weight'.*dense embedding"):
        check_gradient("emb.weight", torch.zeros(3, 2).to_sparse())
    with pytest.raises(TypeError, match=r"'z'.*complex.*view_as_real"):
        check_gradient("z", torch.zeros(3, dtype=torch.complex64))


# -- gradients whose elements share memory ----------------------------------------------
def test_overlapping_gradients_are_refused_dense_views_are_not() -> None:
    check_writable("dense", torch.zeros(4, 3))
    check_writable("transposed", torch.zeros(4, 3).t())  # non-contiguous, no overlap
    check_writable("slice", torch.zeros(8)[::2])
    with pytest.raises(RuntimeError, match=r"'b'.*share memory.*p\.grad = grad\.clone\(\)"):
        check_writable("b", torch.zeros(1).expand(3))
    with pytest.raises(RuntimeError, match="share memory"):
        check_writable("w", torch.zeros(3, 1).expand(3, 4))  # a broadcast row


def _expanded_bias(model: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 3.0
    model[1].bias.grad = torch.full((1,), 3.0).expand(2)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


RULES = [
    "ClipL2PerLayer",
    "RenormalizeL2PerParamType",
    "ClipElementWiseAbsoluteValue",
    gradclip.ClipGlobalNorm(0.5),
    gradclip.AdaptiveGradClip(),
    gradclip.ZClip(warmup_steps=1),
]


@pytest.mark.parametrize("rule", RULES, ids=str)
def test_an_expanded_gradient_raises_before_any_gradient_changes(rule: object) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    normalizer = gradclip.GradientNormalizer(model, rule, 0.5)  # type: ignore[arg-type]
    before = _expanded_bias(model)
    for _ in range(2):  # and again: a refused step is checked anew
        with pytest.raises(RuntimeError, match=r"'1\.bias'.*share memory"):
            normalizer.apply()
        for name, p in model.named_parameters():
            assert torch.equal(p.grad, before[name]), name
    model[1].bias.grad = model[1].bias.grad.clone()  # the advice: then it works, as if
    normalizer.apply()  # the refused steps had never been (no rule state moved)
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    fresh.load_state_dict(model.state_dict())
    for name, p in fresh.named_parameters():
        p.grad = before[name].clone()
    gradclip.GradientNormalizer(fresh, rule, 0.5).apply()  # type: ignore[arg-type]
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_an_expanded_gradient_of_a_layer_left_alone_is_read_not_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", 0.5, overrides={"1": "None"}, measure_all=True
    )
    before = _expanded_bias(model)
    report = normalizer.apply()
    assert torch.equal(model[1].bias.grad, before["1.bias"])
    expected = torch.cat([before["1.weight"].flatten(), before["1.bias"]]).norm()
    assert torch.allclose(report.layer_norms["1"], expected)
    # with nonfinite="zero" such a layer may be written (zeroed): refused again
    zeroing = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", 0.5, overrides={"1": "None"}, nonfinite="zero"
    )
    with pytest.raises(RuntimeError, match="share memory"):
        zeroing.apply()
