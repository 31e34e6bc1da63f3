"""Flat cost over long runs: with default settings no rule's state grows with the step count.

Running 10⁵ steps in a test would take minutes, so the state a run of ``N``
steps leaves is made by loading a state dict whose step counters read ``N``
(every counter, the device's and the host's) and running on: what a rule
keeps depends on those counters only. The per-step time measured the same way
on a real run is in ``tools/long_run_cost.py`` and docs/strategies.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import gradclip
from gradclip.core.state import unpack_tensor

DEFAULTS: dict[str, Callable[[], gradclip.Rule | str]] = {
    "ClipL2PerLayer": lambda: "ClipL2PerLayer",
    "ClipGlobalNorm": lambda: gradclip.ClipGlobalNorm(1.0),
    "AdaptiveGradClip": lambda: gradclip.AdaptiveGradClip(),
    "AutoClip": lambda: gradclip.AutoClip(),
    "AutoClip-layer": lambda: gradclip.AutoClip(scope="layer"),
    "ZClip": lambda: gradclip.ZClip(),
    "ZClip-layer": lambda: gradclip.ZClip(scope="layer"),
    "chain": lambda: gradclip.chain(gradclip.ZClip(), gradclip.AutoClip(scope="layer")),
}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3))


def _bank(model: nn.Module, size: int = 16) -> list[list[torch.Tensor]]:
    """Gradients for ``size`` steps, one in five a spike (set, not back-propagated: quick)."""
    gen = torch.Generator().manual_seed(1)
    return [
        [
            torch.randn(p.shape, generator=gen) * (30.0 if i % 5 == 4 else 1.0)
            for p in model.parameters()
        ]
        for i in range(size)
    ]


def _set_grads(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def _state_bytes(state: Any) -> int:
    """Bytes of every tensor in a state dict, packed buffers included."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        if set(state) == {"dtype", "shape", "data"}:
            return len(state["data"])
        return sum(_state_bytes(v) for v in state.values())
    return 0


def _shapes(normalizer: gradclip.GradientNormalizer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, slot in normalizer.state_dict()["rules"].items():
        for row, tensors in slot["rows"].items():
            for key, value in tensors.items():
                shape = unpack_tensor(value).shape if isinstance(value, dict) else value.shape
                out[f"{name}/{row}/{key}"] = tuple(shape)
    return out


def _fast_forward(normalizer: gradclip.GradientNormalizer, steps: int) -> None:
    """Load the state as it would be after ``steps`` steps: every step counter set to it."""
    state = normalizer.state_dict()
    for slot in state["rules"].values():
        slot["steps"] = steps
        for tensors in slot["rows"].values():
            tensors["count"] = torch.tensor(steps, dtype=torch.long)
    normalizer.load_state_dict(state)


def _run(
    normalizer: gradclip.GradientNormalizer, model: nn.Module, steps: int, start: int = 0
) -> None:
    bank = _bank(model)
    for i in range(start, start + steps):
        _set_grads(model, bank[i % len(bank)])
        normalizer.apply()


@pytest.mark.parametrize("name", DEFAULTS)
def test_state_is_the_same_size_at_steps_100_10k_and_100k(name: str) -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, DEFAULTS[name]())
    _run(normalizer, model, 100)
    shapes, size = _shapes(normalizer), _state_bytes(normalizer.state_dict())
    for steps in (10_000, 100_000):
        _fast_forward(normalizer, steps)
        _run(normalizer, model, 3, start=steps)
        assert _shapes(normalizer) == shapes, steps
        assert _state_bytes(normalizer.state_dict()) == size, steps
    assert size <= 2 * 3 * 1000 * 8 + 1024  # AutoClip-layer's three rows of 1,000 float64s, at most


def test_the_unbounded_history_grows_with_the_run_as_documented() -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, gradclip.AutoClip(history_size=None))
    _run(normalizer, model, 100)
    (key,) = [k for k in _shapes(normalizer) if k.endswith("/history")]
    assert _shapes(normalizer)[key] == (128,)
    _fast_forward(normalizer, 100_000)
    _run(normalizer, model, 1, start=100_000)
    assert _shapes(normalizer)[key] == (131_072,)  # the next power of two: 8 bytes a step


def test_the_default_window_clips_at_the_percentile_of_the_last_1000_norms() -> None:
    """2,500 steps: the ring buffer has wrapped twice; the threshold is numpy's on the window."""
    model = nn.Linear(3, 1, bias=False)
    normalizer = gradclip.GradientNormalizer(model, gradclip.AutoClip(percentile=10.0))
    gen = torch.Generator().manual_seed(3)
    norms = []
    threshold = 0.0
    for step in range(2_500):
        # norms drift upwards: the window's percentile differs from the whole run's
        g = torch.randn(1, 3, generator=gen, dtype=torch.float64).float() * (1.0 + step / 100)
        model.weight.grad = g
        norms.append(float(torch.linalg.vector_norm(g.double())))
        threshold = normalizer.apply().to_dict()["stats"]["autoclip_threshold"]
    window = np.percentile(np.array(norms[-1000:]), 10.0)
    assert threshold == pytest.approx(window, rel=1e-6)
    assert abs(threshold - np.percentile(np.array(norms), 10.0)) > 1.0  # not the whole run's


def test_no_default_configuration_recompiles_after_warm_up_over_5000_compiled_steps() -> None:
    """Every default rule at once, one per layer (one compile: a test of minutes otherwise).

    Recompiles are Dynamo's decision (its guards), whatever the backend: the
    ``eager`` backend runs the captured graphs without compiling them further.
    """
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in DEFAULTS])
    overrides = {str(i): make() for i, make in enumerate(DEFAULTS.values())}
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", overrides=overrides)
    apply = torch.compile(normalizer.apply, fullgraph=True, backend="eager")
    bank = _bank(model)
    graphs = 0
    for step in range(5_000):
        _set_grads(model, bank[step % len(bank)])
        apply()
        if step == 50:  # the warm-ups (ZClip's 25 steps) are over
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
