"""Normalizers built before the model has data: on the meta device, or with lazy modules.

Large models are built on ``meta`` and materialized with ``to_empty``; lazy
modules get their shapes at the first forward. A normalizer built before
either works from its first step, as if built after, and its ``state_dict()``
is available at any moment (its record of each lazy parameter's shape reads
``(?)`` until the first forward, and matches any shape).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradclip

RULES: dict[str, Callable[[], gradclip.Rule | str]] = {
    "ZClip": lambda: gradclip.ZClip(warmup_steps=3),
    "ZClip-layer": lambda: gradclip.ZClip(warmup_steps=3, scope="layer"),
    "AutoClip": lambda: gradclip.AutoClip(30.0),
    "AutoClip-layer": lambda: gradclip.AutoClip(30.0, scope="layer"),
    "chain": lambda: gradclip.chain("ClipL2PerLayer", gradclip.ZClip(warmup_steps=3)),
    "ClipL2PerLayer": lambda: "ClipL2PerLayer",
}


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _steps(
    model: nn.Module, normalizer: gradclip.GradientNormalizer, n: int = 8
) -> list[torch.Tensor]:
    out = []
    for step in range(n):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        model.zero_grad()
        ((30.0 if step == 6 else 1.0) * model(x).square().sum()).backward()
        normalizer.apply()
        out.extend(p.grad.clone() for p in model.parameters())
    return out


def _same_state(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("name", RULES)
def test_built_on_meta_then_to_empty_works_as_if_built_after(name: str) -> None:
    torch.manual_seed(0)
    reference = _net()
    with torch.device("meta"):
        model = _net()
    normalizer = gradclip.GradientNormalizer(model, RULES[name]())
    assert normalizer.state_dict()["format"] == "gradclip.GradientNormalizer"
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    after = gradclip.GradientNormalizer(reference, RULES[name]())
    for a, b in zip(_steps(model, normalizer), _steps(reference, after)):
        assert torch.equal(a, b)
    _same_state(normalizer.state_dict(), after.state_dict())


@pytest.mark.parametrize("name", RULES)
def test_lazy_modules_work_from_the_first_step(name: str) -> None:
    torch.manual_seed(0)
    lazy = nn.Sequential(nn.LazyLinear(6), nn.Tanh(), nn.Linear(6, 2))
    normalizer = gradclip.GradientNormalizer(lazy, RULES[name]())
    before = normalizer.state_dict()  # before the first forward
    assert "0.weight(?)" in before["params"] and "2.weight(2, 6)" in before["params"]
    lazy(torch.zeros(1, 4))  # materialize, then copy to an ordinary model
    reference = _net()
    reference.load_state_dict(lazy.state_dict())
    after = gradclip.GradientNormalizer(reference, RULES[name]())
    for a, b in zip(_steps(lazy, normalizer), _steps(reference, after)):
        assert torch.equal(a, b)
    _same_state(normalizer.state_dict(), after.state_dict())


def test_a_lazy_models_normalizer_resumes_before_its_first_forward() -> None:
    torch.manual_seed(0)
    trained = _net()
    first = gradclip.GradientNormalizer(trained, gradclip.ZClip(warmup_steps=3, scope="layer"))
    _steps(trained, first, 5)
    saved = first.state_dict()

    lazy = nn.Sequential(nn.LazyLinear(6), nn.Tanh(), nn.Linear(6, 2))
    resumed = gradclip.GradientNormalizer(lazy, gradclip.ZClip(warmup_steps=3, scope="layer"))
    resumed.load_state_dict(saved)  # shapes unknown yet: "(?)" matches (6, 4)
    lazy(torch.zeros(1, 4))
    lazy.load_state_dict(trained.state_dict())
    for a, b in zip(_steps(lazy, resumed), _steps(trained, first)):
        assert torch.equal(a, b)

    other = gradclip.GradientNormalizer(
        nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 2)), gradclip.ZClip(scope="layer")
    )
    with pytest.raises(ValueError, match="different model"):  # a known shape still must match
        other.load_state_dict(
            gradclip.GradientNormalizer(_net(), gradclip.ZClip(scope="layer")).state_dict()
        )


def test_loading_a_state_while_the_model_is_on_meta_says_to_materialize_first() -> None:
    trained = _net()
    first = gradclip.GradientNormalizer(trained, gradclip.ZClip(warmup_steps=3))
    _steps(trained, first, 4)
    with torch.device("meta"):
        model = _net()
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(warmup_steps=3))
    with pytest.raises(RuntimeError, match=r"to_empty\(device=\.\.\.\)\), then load"):
        normalizer.load_state_dict(first.state_dict())
    model.to_empty(device="cpu")
    normalizer.load_state_dict(first.state_dict())
    _same_state(normalizer.state_dict(), first.state_dict())
