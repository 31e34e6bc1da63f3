"""Warnings for calls that run but most likely do not do what was meant, each shown once."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradclip
from gradclip.advice import NO_GRADIENTS, ONE_FLAT_LAYER


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _backward(model: nn.Module) -> None:
    model(torch.randn(5, 3)).square().sum().backward()


def _caught(fn: object) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every emission, not Python's once per place
        fn()  # type: ignore[operator]
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_apply_with_no_gradient_at_all_warns_once_per_normalizer() -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer")
    assert _caught(normalizer.apply) == [NO_GRADIENTS]
    assert _caught(normalizer.apply) == []  # once
    _backward(model)
    assert _caught(normalizer.apply) == []  # gradients: nothing to say
    assert "loss.backward()" in NO_GRADIENTS


def test_some_gradients_missing_is_not_warned_about() -> None:
    model = _model()
    model[2].requires_grad_(False)  # a frozen head: normal
    _backward(model)
    assert _caught(gradclip.GradientNormalizer(model, "ClipL2PerLayer").apply) == []


@pytest.mark.parametrize(
    "rule",
    [
        "ClipL2PerLayer",
        "RenormalizeL2PerLayer",
        "ClipL2PerParamType",
        gradclip.ZClip(scope="layer"),
        gradclip.AutoClip(scope="layer"),
        gradclip.chain(gradclip.ClipGlobalNorm(5.0), gradclip.ClipL2PerLayer(1.0)),
    ],
    ids=str,
)
def test_a_per_layer_rule_on_a_flat_parameter_list_warns(rule: gradclip.Rule | str) -> None:
    model = _model()
    _backward(model)
    assert _caught(lambda: gradclip.normalize_(model.parameters(), rule)) == [ONE_FLAT_LAYER]
    assert _caught(lambda: gradclip.GradientNormalizer(list(model.parameters()), rule)) == [
        ONE_FLAT_LAYER
    ]


@pytest.mark.parametrize(
    ("target", "rule"),
    [
        (lambda m: m.parameters(), gradclip.ClipGlobalNorm(1.0)),  # clip_grad_norm_'s meaning
        (lambda m: m.parameters(), gradclip.ZClip()),
        (lambda m: m.parameters(), "ClipElementWiseAbsoluteValue"),
        (lambda m: m, "ClipL2PerLayer"),  # the model: a layer per module
        (lambda m: [list(m[0].parameters()), list(m[2].parameters())], "ClipL2PerLayer"),
        (lambda m: {"a": m[0], "b": m[2]}, "ClipL2PerLayer"),
        (lambda m: [m[0].weight], "ClipL2PerLayer"),  # one tensor: one layer either way
        (lambda m: m[0], "ClipL2PerLayer"),  # a bare layer is one layer on purpose
    ],
)
def test_no_flat_list_warning_where_the_layers_are_what_was_asked(
    target: object, rule: gradclip.Rule | str
) -> None:
    model = _model()
    _backward(model)
    assert _caught(lambda: gradclip.normalize_(target(model), rule)) == []  # type: ignore[operator]


def test_python_shows_each_warning_once_per_place_by_default() -> None:
    model = _model()
    _backward(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(5):  # the clip_grad_norm_ calling style, every step
            gradclip.normalize_(model.parameters(), "ClipL2PerLayer")
    assert [str(w.message) for w in caught] == [ONE_FLAT_LAYER]
