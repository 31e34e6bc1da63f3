"""``torch.compile(normalizer.apply)`` over targets × rules × {default, dynamic, reduce-overhead}.

Every target form (a model, a dict of layers, ``model.parameters()``, a bare
layer) with every kind of rule (per-layer, p-norms, a chain, the adaptive
rules) compiles with ``fullgraph=True``, statically and with ``dynamic=True``,
through AOTAutograd (``aot_eager``: quick, and where aliasing and symbolic
shapes are checked). A model or a dict holds all the rules at once, one per
layer (one compile); a one-layer grouping takes one rule of each kind at a
time. Inductor's generated code, slow to compile on a CPU, runs on one-layer
groupings (where torch 2.13's CPU Inductor cannot ``index_add_`` into a
one-element buffer), once in each mode. The compiled gradients equal the
eager ones, step after step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import skipping_torch_inductor_scalar_bug
from torch import nn
from torch._dynamo.utils import counters

import gradclip

# a per-layer rule on model.parameters() is one layer, as the warning says: meant here
pytestmark = pytest.mark.filterwarnings("ignore:a per-layer rule was given a flat list")

RULES: dict[str, Callable[[], gradclip.Rule | str]] = {
    "ClipL2PerLayer": lambda: "ClipL2PerLayer",
    "p1": lambda: gradclip.ClipGlobalNorm(1.0, 1.0),
    "pinf": lambda: gradclip.ClipGlobalNorm(0.5, math.inf),
    "chain": lambda: gradclip.chain(
        ("ClipElementWiseAbsoluteValue", 0.5), gradclip.ZClip(warmup_steps=3)
    ),
    "AutoClip": lambda: gradclip.AutoClip(),
    "ZClip-layer": lambda: gradclip.ZClip(warmup_steps=3, scope="layer"),
}
STEPS = 8
Build = Callable[[nn.Sequential], gradclip.GradientNormalizer]


def _every_rule(key: Callable[[int], str]) -> dict[str, gradclip.Rule | str]:
    return {key(i): make() for i, make in enumerate(RULES.values())}


TARGETS: dict[str, Build] = {
    "module": lambda m: gradclip.GradientNormalizer(
        m, "None", overrides=_every_rule(lambda i: str(2 * i))
    ),
    "dict": lambda m: gradclip.GradientNormalizer(
        {f"l{i}": m[2 * i] for i in range(len(RULES))},
        "None",
        overrides=_every_rule(lambda i: f"l{i}"),
    ),
}
ONE_LAYER: dict[str, Callable[[nn.Sequential], Any]] = {
    "parameters": lambda m: m.parameters(),
    "bare-layer": lambda m: m[0],
}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in RULES:
        layers += [nn.Linear(5, 5), nn.Tanh()]
    return nn.Sequential(*layers)


def _run(build: Build, **compile_kw: Any) -> None:
    models = [_model(), _model()]
    eager, compiled = build(models[0]), build(models[1])
    apply = torch.compile(compiled.apply, fullgraph=True, **compile_kw)
    for step in range(STEPS):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        scale = 40.0 if step == STEPS - 2 else 1.0  # a spike after the warm-ups
        for model in models:
            model.zero_grad()
            (scale * model(x).square().sum()).backward()
        eager.apply()
        apply()
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert not counters["graph_break"], dict(counters["graph_break"])


def _one_layer(target: str, rule: str) -> Build:
    return lambda m: gradclip.GradientNormalizer(ONE_LAYER[target](m), RULES[rule]())


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("target", TARGETS)
def test_every_rule_at_once_traces_in_one_graph(target: str, dynamic: bool) -> None:
    _run(TARGETS[target], backend="aot_eager", dynamic=dynamic)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("rule", ["ClipL2PerLayer", "p1", "chain", "AutoClip"])
@pytest.mark.parametrize("target", ONE_LAYER)
def test_one_layer_groupings_trace_in_one_graph(target: str, rule: str, dynamic: bool) -> None:
    _run(_one_layer(target, rule), backend="aot_eager", dynamic=dynamic)


INDUCTOR: list[tuple[str, Build, dict[str, Any]]] = [
    ("bare-layer-ClipL2PerLayer", _one_layer("bare-layer", "ClipL2PerLayer"), {}),
    ("parameters-p1-dynamic", _one_layer("parameters", "p1"), {"dynamic": True}),
    (
        "bare-layer-AutoClip-reduce-overhead",
        _one_layer("bare-layer", "AutoClip"),
        {"mode": "reduce-overhead"},
    ),
]


@pytest.mark.parametrize(
    ("build", "options"), [c[1:] for c in INDUCTOR], ids=[c[0] for c in INDUCTOR]
)
def test_inductor_compiles_and_matches_eager(build: Build, options: dict[str, Any]) -> None:
    with skipping_torch_inductor_scalar_bug():
        _run(build, **options)
