"""DL4J's TestGradientNormalization, ported case by case.

Each DL4J test builds one DenseLayer (nIn=10, nOut=20: W is 10x20, b is 1x20),
fills its gradient view with random numbers, runs the updater and compares
with the formula. Here the layer is a module with parameters ``W`` and ``b``
of the same shapes; ``Nd4j.rand`` is uniform on [0, 1) as ``torch.rand``.
ND4J's ``assertEquals`` on arrays allows a relative difference of 1e-5; where
DL4J asserts "no change", gradclip is held to bit equality.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradclip


class DenseLayer(nn.Module):
    def __init__(self, n_in: int = 10, n_out: int = 20) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.zeros(n_in, n_out))
        self.b = nn.Parameter(torch.zeros(1, n_out))


def layer_with_view_gradients(scale: float, shift: float) -> tuple[DenseLayer, torch.Tensor]:
    """A layer whose gradients are views of one 1x220 array, as DL4J's gradient view."""
    layer = DenseLayer()
    grad_array = torch.rand(1, 220) * scale - shift
    layer.W.grad = grad_array[0, :200].view(10, 20)
    layer.b.grad = grad_array[0, 200:220].view(1, 20)
    return layer, grad_array


def assert_nd4j_equals(expected: torch.Tensor, actual: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=1e-6)


def test_renormalization_per_layer() -> None:
    torch.manual_seed(12345)
    layer, _ = layer_with_view_gradients(10, 5)
    w_copy, b_copy = layer.W.grad.clone(), layer.b.grad.clone()

    gradclip.normalize_(layer, gradclip.GradientNormalization.RENORMALIZE_L2_PER_LAYER)

    assert not torch.equal(w_copy, layer.W.grad)
    assert not torch.equal(b_copy, layer.b.grad)
    sum_squares = (w_copy.double() ** 2).sum() + (b_copy.double() ** 2).sum()
    l2_layer = torch.sqrt(sum_squares)
    l2_weight = float(layer.W.grad.norm())
    l2_bias = float(layer.b.grad.norm())
    assert l2_weight == l2_weight and l2_weight > 0.0
    assert l2_bias == l2_bias and l2_bias > 0.0
    assert_nd4j_equals(w_copy.double() / l2_layer, layer.W.grad)
    assert_nd4j_equals(b_copy.double() / l2_layer, layer.b.grad)


def test_renormalization_per_param_type() -> None:
    torch.manual_seed(12345)
    weight_grad = torch.rand(10, 20)
    bias_grad = torch.rand(1, 10)  # DL4J's test uses a 1x10 bias gradient here
    w_copy, b_copy = weight_grad.clone(), bias_grad.clone()
    w = nn.Parameter(torch.zeros_like(weight_grad))
    b = nn.Parameter(torch.zeros_like(bias_grad))
    w.grad, b.grad = weight_grad, bias_grad

    gradclip.normalize_({"0": {"W": w, "b": b}}, "RenormalizeL2PerParamType")

    assert_nd4j_equals(w_copy / w_copy.norm(), w.grad)
    assert_nd4j_equals(b_copy / b_copy.norm(), b.grad)


def test_abs_value_clipping_per_element() -> None:
    torch.manual_seed(12345)
    threshold = 3.0
    layer, _ = layer_with_view_gradients(10, 5)
    w_copy, b_copy = layer.W.grad.clone(), layer.b.grad.clone()

    gradclip.normalize_(layer, "ClipElementWiseAbsoluteValue", threshold)

    assert not torch.equal(w_copy, layer.W.grad)
    assert not torch.equal(b_copy, layer.b.grad)
    expected_w = w_copy.clone()
    for i in range(expected_w.numel()):
        d = float(expected_w.view(-1)[i])
        if d > threshold:
            expected_w.view(-1)[i] = threshold
        elif d < -threshold:
            expected_w.view(-1)[i] = -threshold
    expected_b = b_copy.clone()
    for i in range(expected_b.numel()):
        d = float(expected_b.view(-1)[i])
        if d > threshold:
            expected_b.view(-1)[i] = threshold
        elif d < -threshold:
            expected_b.view(-1)[i] = -threshold
    assert_nd4j_equals(expected_w, layer.W.grad)
    assert_nd4j_equals(expected_b, layer.b.grad)


def test_l2_clipping_per_layer() -> None:
    torch.manual_seed(12345)
    threshold = 3.0
    for t in range(2):
        # t=0: small -> no clipping; t=1: large -> clipping
        layer, grad_array = layer_with_view_gradients(0.05 if t == 0 else 10, 0 if t == 0 else 5)
        w_copy, b_copy = layer.W.grad.clone(), layer.b.grad.clone()
        layer_grad_l2 = float(grad_array.double().norm())
        if t == 0:
            assert layer_grad_l2 < threshold
        else:
            assert layer_grad_l2 > threshold

        gradclip.normalize_(layer, "ClipL2PerLayer", threshold)

        if t == 0:
            # norm2 < threshold -> no change, bit for bit
            assert torch.equal(w_copy, layer.W.grad)
            assert torch.equal(b_copy, layer.b.grad)
            continue
        assert not torch.equal(w_copy, layer.W.grad)
        assert not torch.equal(b_copy, layer.b.grad)
        scaling_factor = threshold / layer_grad_l2
        assert_nd4j_equals(w_copy * scaling_factor, layer.W.grad)
        assert_nd4j_equals(b_copy * scaling_factor, layer.b.grad)


def test_l2_clipping_per_param_type() -> None:
    torch.manual_seed(12345)
    threshold = 3.0
    weight_grad = torch.rand(10, 20) * 0.05
    bias_grad = torch.rand(1, 10) * 10
    w_copy, b_copy = weight_grad.clone(), bias_grad.clone()
    w = nn.Parameter(torch.zeros_like(weight_grad))
    b = nn.Parameter(torch.zeros_like(bias_grad))
    w.grad, b.grad = weight_grad, bias_grad
    weight_l2 = float(weight_grad.double().norm())
    bias_l2 = float(bias_grad.double().norm())
    assert weight_l2 < threshold
    assert bias_l2 > threshold

    gradclip.normalize_({"0": {"W": w, "b": b}}, "ClipL2PerParamType", threshold)

    assert torch.equal(w_copy, w.grad)  # weight norm2 < threshold -> no change
    assert not torch.equal(b_copy, b.grad)  # bias norm2 > threshold -> rescaled
    assert_nd4j_equals(b_copy * (threshold / bias_l2), b.grad)


# -- thresholds against the gradients' dtype -------------------------------------------------
def test_value_clip_above_the_dtype_range_leaves_finite_values_alone() -> None:
    # 1e5 is beyond float16's largest finite value (65504): nothing to clamp there
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].to(torch.bfloat16)
    model[1].to(torch.float16)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape) * 6e4).to(p.dtype)
    p16 = [p.grad.clone() for p in model[1].parameters()]
    gradclip.normalize_(model, "ClipElementWiseAbsoluteValue", 1e5)
    assert all(torch.equal(p.grad, g) for p, g in zip(model[1].parameters(), p16))
    bf = torch.cat([p.grad.float().flatten() for p in model[0].parameters()])
    assert float(bf.abs().max()) <= 1e5


def test_chain_with_a_value_clip_beyond_float16_runs_to_the_end() -> None:
    layer = torch.nn.Linear(4, 4).to(torch.float16)
    for p in layer.parameters():
        p.grad = torch.full(p.shape, 100.0, dtype=torch.float16)
    gradclip.normalize_(
        layer, gradclip.chain(("ClipL2PerLayer", 1.0), ("ClipElementWiseAbsoluteValue", 1e5))
    )
    total = torch.cat([p.grad.float().flatten() for p in layer.parameters()]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-3)
