"""``torch.compile(normalizer.apply)``: one graph, no breaks, the eager results.

Dynamo's tracing (graphs, breaks, guards) is checked with the ``aot_eager``
backend, which is quick; the numbers with Inductor's generated code, on one
normalizer whose layers cover all six DL4J modes at once (one compile).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import skipping_torch_inductor_scalar_bug
from torch import nn
from torch._dynamo.utils import counters

import gradclip

RULES: list[gradclip.Rule | str] = [
    *[m.value for m in gradclip.GradientNormalization],
    gradclip.ClipGlobalNorm(1.0),
    gradclip.ClipGlobalNorm(1.0, 1.0),
    gradclip.ClipGlobalNorm(1.0, math.inf),
    gradclip.AdaptiveGradClip(),
    gradclip.AutoClip(30.0, history_size=8),
    gradclip.AutoClip(30.0, scope="layer"),
    gradclip.ZClip(warmup_steps=5),
    gradclip.ZClip(warmup_steps=5, max_grad_norm=2.0, scope="layer"),
    gradclip.chain(("ClipElementWiseAbsoluteValue", 0.5), gradclip.ZClip(warmup_steps=5)),
]
DL4J = {m.value for m in gradclip.GradientNormalization}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3)
    )


def _backward(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    model.zero_grad()
    scale = 50.0 if step % 11 == 10 else 1.0  # a spike now and then
    (scale * model(torch.randn(4, 6, generator=gen)).pow(2).sum()).backward()


def _run(
    rule: gradclip.Rule | str,
    steps: int,
    compile_with: Callable[[Callable[[], Any]], Callable[[], Any]],
    overrides: dict[str, Any] | None = None,
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], list[int]]:
    """Gradients per step, eager and compiled, and the graphs compiled so far at each step."""
    eager_model, compiled_model = _model(), _model()
    eager = gradclip.GradientNormalizer(eager_model, rule, 0.5, overrides)
    compiled = gradclip.GradientNormalizer(compiled_model, rule, 0.5, overrides)
    apply = compile_with(compiled.apply)
    out_eager, out_compiled, graphs = [], [], []
    for step in range(steps):
        for model in (eager_model, compiled_model):
            _backward(model, step)
        eager.apply()
        apply()
        out_eager.append([p.grad.clone() for p in eager_model.parameters()])
        out_compiled.append([p.grad.clone() for p in compiled_model.parameters()])
        graphs.append(counters["stats"]["unique_graphs"])
    return out_eager, out_compiled, graphs


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r if isinstance(r, str) else r.describe())
def test_fullgraph_compile_traces_every_rule_in_one_graph(rule: gradclip.Rule | str) -> None:
    def compile_with(fn: Callable[[], Any]) -> Callable[[], Any]:
        return torch.compile(fn, fullgraph=True, backend="aot_eager")  # type: ignore[no-any-return]

    eager, compiled, graphs = _run(rule, 30, compile_with)
    for step, (a, b) in enumerate(zip(eager, compiled)):
        for x, y in zip(a, b):
            if isinstance(rule, str) and rule in DL4J:
                assert torch.equal(x, y), step
            else:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[-1] <= 2, graphs  # a stateful rule compiles at most a few graphs...
    assert graphs[-1] == graphs[10], graphs  # ...and none after its warm-up


def test_inductor_gives_the_eager_gradients_bit_for_bit_in_every_dl4j_mode() -> None:
    overrides = {
        "0": ("RenormalizeL2PerLayer", 1.0),
        "2": ("RenormalizeL2PerParamType", 1.0),
        "4": ("ClipElementWiseAbsoluteValue", 0.05),
        "5": ("ClipL2PerParamType", 0.3),
    }

    def compile_with(fn: Callable[[], Any]) -> Callable[[], Any]:
        return torch.compile(fn, fullgraph=True)  # type: ignore[no-any-return]

    with skipping_torch_inductor_scalar_bug():
        eager, compiled, graphs = _run("ClipL2PerLayer", 4, compile_with, overrides)
    for a, b in zip(eager, compiled):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert graphs[-1] == 1 and not counters["graph_break"]


def test_a_compiled_training_step_calling_apply() -> None:
    def train(model: nn.Module, normalizer: gradclip.GradientNormalizer, opt: Any, x: Any) -> Any:
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        normalizer.apply()
        opt.step()
        return loss.detach()

    eager_model = _model()
    compiled_model = copy.deepcopy(eager_model)
    eager_norm = gradclip.GradientNormalizer(eager_model, gradclip.ZClip(warmup_steps=3))
    compiled_norm = gradclip.GradientNormalizer(compiled_model, gradclip.ZClip(warmup_steps=3))
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.01)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.01)
    step = torch.compile(train, backend="aot_eager")
    for i in range(8):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) * (1 + 30 * (i == 6))
        train(eager_model, eager_norm, eager_opt, x)
        step(compiled_model, compiled_norm, compiled_opt, x)
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
