"""State follows what is normalized, however it is named; custom groupings follow swaps;
``None`` layers are not read; rules that never square accept huge finite gradients."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gradclip
import gradclip.normalize as normalize_module


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _grads(model: nn.Module, scale: float) -> None:
    model.zero_grad()
    torch.manual_seed(1)
    (scale * model(torch.randn(16, 4)).pow(2).sum()).backward()


def _total(model: nn.Module) -> float:
    return float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())


FORMS: dict[str, Callable[[nn.Sequential], Any]] = {
    "module": lambda m: m,
    "parameters": lambda m: m.parameters(),
    "list": lambda m: list(m.parameters()),
    "dict of modules": lambda m: {"a": m[0], "b": m[2]},
    "list of modules": lambda m: [m[0], m[2]],
    "list of lists": lambda m: [list(m[0].parameters()), list(m[2].parameters())],
}


@pytest.mark.parametrize("form", list(FORMS))
def test_zclip_learns_across_calls_whatever_the_target_form(form: str) -> None:
    model = _model()
    for _ in range(30):
        _grads(model, 1.0)
        gradclip.normalize_(FORMS[form](model), gradclip.ZClip(warmup_steps=10))
    _grads(model, 1000.0)
    spike = _total(model)
    gradclip.normalize_(FORMS[form](model), gradclip.ZClip(warmup_steps=10))
    assert _total(model) < spike / 100  # rebuilt state would still be warming up


def test_different_parameters_never_share_state_and_nothing_is_kept_alive() -> None:
    first, second = _model(), _model()
    for _ in range(12):
        _grads(first, 1.0)
        gradclip.normalize_(first.parameters(), gradclip.ZClip(warmup_steps=10))
    _grads(second, 1000.0)
    before = _total(second)
    gradclip.normalize_(second.parameters(), gradclip.ZClip(warmup_steps=10))
    assert _total(second) == pytest.approx(before)  # its own state: still warming up
    refs = [weakref.ref(p) for p in first.parameters()]
    gc.collect()  # entries of earlier tests' targets go first, not counted below
    held = len(normalize_module._by_holders)
    del first
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert len(normalize_module._by_holders) == held - 1


def test_a_scheduled_cap_keeps_the_state_of_a_parameter_list() -> None:
    model = _model()
    for step in range(30):
        _grads(model, 1.0)
        rule = gradclip.ZClip(warmup_steps=10, max_grad_norm=100.0 + step)
        gradclip.normalize_(model.parameters(), rule)
    _grads(model, 1000.0)
    spike = _total(model)
    gradclip.normalize_(model.parameters(), gradclip.ZClip(warmup_steps=10, max_grad_norm=1e9))
    assert _total(model) < spike / 100


@pytest.mark.parametrize("grouping", ["dict", "list"])
def test_custom_groupings_follow_replaced_parameters(grouping: str) -> None:
    model = _model()
    enc, head = model[0], model[2]
    target: Any = {"enc": enc, "head": head} if grouping == "dict" else [enc, head]
    normalizer = gradclip.GradientNormalizer(target, "ClipL2PerLayer", threshold=0.5)
    state = {k: v.clone() * 2 for k, v in enc.state_dict().items()}
    enc.load_state_dict(state, assign=True)  # new Parameter objects in enc
    _grads(model, 10.0)
    normalizer.apply()
    norm = float(torch.cat([enc.weight.grad.flatten(), enc.bias.grad]).norm())
    assert norm == pytest.approx(0.5, rel=1e-5)
    # a parameter put in place behind the registration hooks too
    enc._parameters["bias"] = nn.Parameter(enc.bias.detach().clone())
    _grads(model, 10.0)
    normalizer.apply()
    norm = float(torch.cat([enc.weight.grad.flatten(), enc.bias.grad]).norm())
    assert norm == pytest.approx(0.5, rel=1e-5)


@pytest.mark.filterwarnings("ignore:a per-layer rule was given a flat list")  # on purpose
def test_an_iterator_target_is_walked_once() -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model.parameters(), "ClipL2PerLayer")
    _grads(model, 10.0)
    normalizer.apply()
    assert _total(model) == pytest.approx(1.0, rel=1e-5)
    assert len(normalizer.layers[0].params) == 4


# -- None layers are not read --------------------------------------------------------------
def _with_sparse_embedding() -> nn.Module:
    model = nn.Module()
    model.emb = nn.Embedding(10, 4, sparse=True)
    model.head = nn.Linear(4, 2)
    return model


def _sparse_step(model: nn.Module) -> None:
    model.zero_grad()
    model.head(model.emb(torch.tensor([1, 2, 3]))).sum().backward()


def test_a_none_override_never_reads_a_sparse_gradient() -> None:
    model = _with_sparse_embedding()
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", threshold=1e-3, overrides={"emb": "None"}
    )
    _sparse_step(model)
    before = model.emb.weight.grad.coalesce().values().clone()
    report = normalizer.apply()
    assert torch.equal(model.emb.weight.grad.coalesce().values(), before)
    assert report.changed_layers() == ["head"]


@pytest.mark.parametrize("asks", ["measure_all", "error", "zero"])
def test_a_none_layer_asked_for_its_norm_says_why_a_sparse_gradient_is_refused(
    asks: str,
) -> None:
    model = _with_sparse_embedding()
    kwargs: dict[str, Any] = {"measure_all": True} if asks == "measure_all" else {"nonfinite": asks}
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", overrides={"emb": "None"}, **kwargs
    )
    _sparse_step(model)
    with pytest.raises(TypeError, match=r"'emb.weight' has layout torch.sparse_coo.*dense.*asks"):
        normalizer.apply()


# -- rules that never square ---------------------------------------------------------------
@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "error"])
@pytest.mark.parametrize("mode", ["None", ("ClipElementWiseAbsoluteValue", 5.0)])
@pytest.mark.parametrize(("dtype", "huge"), [(torch.float64, 1e200), (torch.float32, 1e20)])
def test_rules_that_never_square_accept_huge_finite_gradients(
    nonfinite: str, mode: Any, dtype: torch.dtype, huge: float
) -> None:
    net = nn.Linear(2, 2).to(dtype)
    net.weight.grad = torch.full((2, 2), huge, dtype=dtype)
    net.bias.grad = torch.ones(2, dtype=dtype)
    name, threshold = mode if isinstance(mode, tuple) else (mode, 1.0)
    gradclip.normalize_(net, name, threshold, nonfinite=nonfinite)
    expected = huge if name == "None" else threshold
    assert float(net.weight.grad[0, 0]) == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["None", "ClipElementWiseAbsoluteValue"])
def test_rules_that_never_square_still_refuse_inf_and_nan(mode: str) -> None:
    for bad in (float("inf"), float("nan")):
        net = nn.Linear(2, 2).double()
        net.weight.grad = torch.full((2, 2), 1e200, dtype=torch.float64)
        net.weight.grad[0, 1] = bad
        net.bias.grad = torch.ones(2, dtype=torch.float64)
        with pytest.raises(gradclip.NonFiniteGradientError):
            gradclip.normalize_(net, mode, nonfinite="error")
