"""Every DL4J mode against the independent float64 reference, over random layouts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from reference import MODES, layer_norm, reference_layer

import gradclip

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Relative tolerance of one rounding of the result in each dtype, with room for
# the different summation order of the norms.
RTOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def layouts(draw: st.DrawFn) -> list[list[torch.Tensor]]:
    """A random model: 1-4 layers of 1-3 gradient tensors of random shape and scale."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(DTYPES))
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        tensors = []
        for _ in range(draw(st.integers(1, 3))):
            shape = draw(shapes)
            scale = 10 ** draw(st.floats(-3, 3))
            if dtype == torch.float16:
                scale = min(scale, 100.0)
            kind = draw(st.sampled_from(["normal", "zeros", "constant"]))
            if kind == "zeros":
                x = torch.zeros(shape)
            elif kind == "constant":
                x = torch.full(shape, scale)
            else:
                x = torch.randn(shape, generator=gen) * scale
            x = x.to(dtype)
            layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
            if layout == "transposed" and x.dim() >= 2:
                x = x.transpose(0, 1).contiguous().transpose(0, 1)  # dense, not contiguous
            elif layout == "strided" and x.dim() >= 1:
                wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=dtype)
                wide[..., ::2] = x
                x = wide[..., ::2]  # every other element: not dense
            tensors.append(x)
        layers.append(tensors)
    return layers


def params_for(layers: list[list[torch.Tensor]]) -> list[list[torch.nn.Parameter]]:
    result = []
    for tensors in layers:
        params = []
        for g in tensors:
            p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
            # a copy with the same strides (clone() would make a strided one dense)
            p.grad = torch.empty_strided(g.shape, g.stride(), dtype=g.dtype).copy_(g)
            params.append(p)
        result.append(params)
    return result


def near_boundary(norm: float, threshold: float, rtol: float) -> bool:
    return abs(norm - threshold) <= 4 * rtol * threshold


def pick_threshold(layers: list[list[torch.Tensor]], log_t: float, relative: bool) -> float:
    """Either an absolute threshold, or one near a layer's norm, where decisions are close."""
    if not relative:
        return 10**log_t
    base = layer_norm(layers[0]) or 1.0
    return base * 10 ** (log_t / 30)


@given(
    layers=layouts(), mode=st.sampled_from(MODES), log_t=st.floats(-3, 3), relative=st.booleans()
)
def test_matches_float64_reference(
    layers: list[list[torch.Tensor]], mode: str, log_t: float, relative: bool
) -> None:
    threshold = pick_threshold(layers, log_t, relative)
    dtype = layers[0][0].dtype
    rtol = RTOL[dtype]
    params = params_for(layers)
    report = gradclip.normalize_(params, mode, threshold)

    for i, (tensors, layer_params) in enumerate(zip(layers, params)):
        norm = layer_norm(tensors)
        per_tensor = [layer_norm([t]) for t in tensors]
        if mode == "ClipL2PerLayer" and near_boundary(norm, threshold, rtol):
            continue  # whether rounding puts the norm over t is a coin toss
        if mode == "ClipL2PerParamType" and any(
            near_boundary(n, threshold, rtol) for n in per_tensor
        ):
            continue
        expected = reference_layer(tensors, mode, threshold)
        for g, p, e, n in zip(tensors, layer_params, expected, per_tensor):
            assert p.grad.dtype == dtype
            assert not torch.isnan(p.grad).any(), "a finite gradient must never become NaN"
            unchanged = (
                mode == "None"
                or (mode == "ClipL2PerLayer" and norm <= threshold)
                or (mode == "ClipL2PerParamType" and n <= threshold)
            )
            if unchanged:
                assert torch.equal(p.grad, g), "a tensor DL4J leaves alone must be bit-identical"
            else:
                info = torch.finfo(dtype)
                subnormal_step = info.smallest_normal * info.eps
                torch.testing.assert_close(
                    p.grad.double(), e, rtol=rtol, atol=max(rtol * 1e-3 * threshold, subnormal_step)
                )
        if mode not in ("None", "ClipElementWiseAbsoluteValue"):
            reported = report.to_dict()["layer_norms"][str(i)]
            assert math.isclose(reported, norm, rel_tol=1e-5, abs_tol=1e-30)


CLIPS = ["ClipL2PerLayer", "ClipL2PerParamType", "ClipElementWiseAbsoluteValue"]


@given(
    layers=layouts(), mode=st.sampled_from(CLIPS), log_t=st.floats(-2, 2), relative=st.booleans()
)
def test_clipping_twice_equals_clipping_once(
    layers: list[list[torch.Tensor]], mode: str, log_t: float, relative: bool
) -> None:
    threshold = pick_threshold(layers, log_t, relative)
    rtol = RTOL[layers[0][0].dtype]
    params = params_for(layers)
    gradclip.normalize_(params, mode, threshold)
    once = [p.grad.clone() for ps in params for p in ps]
    gradclip.normalize_(params, mode, threshold)
    for a, b in zip(once, (p.grad for ps in params for p in ps)):
        torch.testing.assert_close(b, a, rtol=4 * rtol, atol=0.0)


@given(layers=layouts(), log_t=st.floats(-2, 2), relative=st.booleans())
def test_clip_never_increases_a_norm_beyond_threshold(
    layers: list[list[torch.Tensor]], log_t: float, relative: bool
) -> None:
    threshold = pick_threshold(layers, log_t, relative)
    rtol = RTOL[layers[0][0].dtype]
    params = params_for(layers)
    gradclip.normalize_(params, "ClipL2PerLayer", threshold)
    for layer_params in params:
        assert layer_norm([p.grad for p in layer_params]) <= threshold * (1 + 8 * rtol)


def test_clip_decision_is_strictly_greater_at_the_boundary() -> None:
    for dtype in (torch.float32, torch.float64):
        g = torch.tensor([3.0, 4.0], dtype=dtype)  # norm exactly 5
        for threshold, clipped in ((5.0, False), (4.999, True), (5.001, False), (4.5, True)):
            for mode in ("ClipL2PerLayer", "ClipL2PerParamType"):
                p = torch.nn.Parameter(torch.zeros_like(g))
                p.grad = g.clone()
                report = gradclip.normalize_([p], mode, threshold)
                if clipped:
                    assert not torch.equal(p.grad, g)
                    assert math.isclose(float(p.grad.double().norm()), threshold, rel_tol=1e-6)
                else:
                    assert torch.equal(p.grad, g)
                assert report.to_dict()["changed"][""] is clipped


LAYER_KINDS = ("linear", "conv", "layernorm", "rnn", "gru", "bias_free")


@st.composite
def modules(draw: st.DrawFn) -> tuple[torch.nn.Module, list[tuple[str, list[str]]]]:
    """A random nn.Sequential of common layers, with random gradients and some frozen params.

    Returns the module and, per expected layer, its name and its gradient-carrying params.
    """
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    layers: list[torch.nn.Module] = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(LAYER_KINDS))
        a, b = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        if kind == "linear":
            layers.append(torch.nn.Linear(a, b))
        elif kind == "conv":
            layers.append(torch.nn.Conv1d(a, b, kernel_size=draw(st.integers(1, 3))))
        elif kind == "layernorm":
            layers.append(torch.nn.LayerNorm(a))
        elif kind == "rnn":
            layers.append(torch.nn.RNN(a, b))
        elif kind == "gru":
            layers.append(torch.nn.GRU(a, b))
        else:
            layers.append(torch.nn.Linear(a, b, bias=False))
    model = torch.nn.Sequential(*layers)
    expected = []
    for name, module in model.named_children():
        names = []
        for pname, p in module.named_parameters():
            frozen = draw(st.integers(0, 9)) == 0
            if frozen:
                p.requires_grad_(False)
            p.grad = torch.randn(p.shape, generator=gen) * 10 ** draw(st.floats(-2, 2))
            if not frozen:
                names.append(pname)
        if names:
            expected.append((name, names))
    return model, expected


# some generated modules have no gradient at all, which apply() warns about: meant here
@pytest.mark.filterwarnings("ignore:apply\\(\\) found no gradient")
@given(built=modules(), mode=st.sampled_from(MODES), log_t=st.floats(-2, 2), relative=st.booleans())
def test_random_modules_match_the_reference_layer_by_layer(
    built: tuple[torch.nn.Module, list[tuple[str, list[str]]]],
    mode: str,
    log_t: float,
    relative: bool,
) -> None:
    model, expected = built
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    first = [before[f"{expected[0][0]}.{p}"] for p in expected[0][1]] if expected else []
    threshold = pick_threshold([first], log_t, relative) if first else 10**log_t
    report = gradclip.normalize_(model, mode, threshold)
    assert report.layer_names == [name for name, _ in expected]
    for name, param_names in expected:
        grads = [before[f"{name}.{p}"] for p in param_names]
        norm = layer_norm(grads)
        if mode == "ClipL2PerLayer" and near_boundary(norm, threshold, 1e-6):
            continue
        if mode == "ClipL2PerParamType" and any(
            near_boundary(layer_norm([g]), threshold, 1e-6) for g in grads
        ):
            continue
        expected_grads = reference_layer(grads, mode, threshold)
        module = dict(model.named_children())[name]
        for p_name, e in zip(param_names, expected_grads):
            got = dict(module.named_parameters())[p_name].grad
            torch.testing.assert_close(got.double(), e, rtol=2e-6, atol=1e-30)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.grad, before[n]), "frozen parameters are skipped"
