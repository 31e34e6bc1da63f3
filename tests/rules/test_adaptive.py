"""AutoClip and ZClip traced over fixed norm sequences against plain-Python references."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

import gradclip

# A sequence with a warm-up regime, drift, and spikes (steps 9, 14, 15, 22).
NORMS = [
    1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.3, 1.0, 1.1, 9.0,
    1.0, 1.2, 0.8, 1.1, 25.0, 30.0, 1.0, 0.9, 1.4, 1.2,
    1.1, 1.0, 50.0, 1.3, 0.7, 1.0, 1.1, 2.0, 1.5, 1.2,
]  # fmt: skip


# -- plain-Python references ---------------------------------------------------------------
def percentile(values: list[float], p: float) -> float:
    """numpy.percentile(values, p) with its default linear interpolation."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def autoclip_reference(
    norms: list[float], p: float, history_size: int | None = None
) -> list[float]:
    """Seetharaman et al. 2020's loop: append, percentile, clip_grad_norm_. Returns the scale."""
    history: list[float] = []
    scales = []
    for n in norms:
        history.append(n)
        if history_size is not None:
            history = history[-history_size:]
        clip = percentile(history, p)
        scales.append(min(1.0, clip / (n + 1e-6)))
    return scales


def zclip_reference(
    norms: list[float], alpha: float, z_thresh: float, warmup: int, max_norm: float | None
) -> list[float]:
    """The zclip package's step() (zscore mode, adaptive scaling), one scale per step."""
    buffer: list[float] = []
    mean = var = 0.0
    initialized = False
    scales = []
    for n in norms:
        if not initialized:
            buffer.append(n)
            if len(buffer) >= warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
                initialized = True
            scales.append(1.0 if max_norm is None else min(1.0, max_norm / (n + 1e-6)))
            continue
        std = math.sqrt(var)
        z = (n - mean) / (std + 1e-6)
        clip_val = mean + (z_thresh * std) / (z / z_thresh) if z > z_thresh else None
        bound = clip_val if clip_val is not None else n
        if max_norm is not None:
            bound = min(bound, max_norm)
        coef = bound / (n + 1e-6) if n > bound else 1.0
        scales.append(coef if coef < 1.0 else 1.0)
        x = clip_val if clip_val is not None else n
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return scales


# -- tracing the strategies ------------------------------------------------------------------
def trace(strategy: gradclip.Rule, sequences: dict[str, list[float]]) -> dict[str, list[float]]:
    """Run ``strategy`` on layers whose gradient norm follows ``sequences``; the applied scales."""
    layers = {name: [nn.Parameter(torch.zeros(3, dtype=torch.float64))] for name in sequences}
    normalizer = gradclip.GradientNormalizer(layers, strategy)
    direction = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)  # unit norm
    out: dict[str, list[float]] = {name: [] for name in sequences}
    for step in range(len(next(iter(sequences.values())))):
        for name, (param,) in layers.items():
            param.grad = direction * sequences[name][step]
        normalizer.apply()
        for name, (param,) in layers.items():
            out[name].append(float(param.grad.norm()) / sequences[name][step])
    return out


@pytest.mark.parametrize("p", [10.0, 50.0, 90.0])
@pytest.mark.parametrize("history_size", [None, 4])
def test_autoclip_trace_matches_reference(p: float, history_size: int | None) -> None:
    scales = trace(gradclip.AutoClip(p, history_size=history_size), {"a": NORMS})["a"]
    expected = autoclip_reference(NORMS, p, history_size)
    assert scales == pytest.approx(expected, rel=1e-12)
    assert any(s < 1.0 for s in expected) and any(s == 1.0 for s in expected)


def test_autoclip_percentile_equals_numpy() -> None:
    np = pytest.importorskip("numpy")
    for p in (0.0, 10.0, 37.5, 100.0):
        assert percentile(NORMS[:13], p) == pytest.approx(float(np.percentile(NORMS[:13], p)))


def test_autoclip_history_grows_past_its_initial_capacity() -> None:
    norms = [1.0 + (i % 7) * 0.1 for i in range(150)]
    scales = trace(gradclip.AutoClip(10.0), {"a": norms})["a"]
    assert scales == pytest.approx(autoclip_reference(norms, 10.0), rel=1e-12)


@pytest.mark.parametrize("max_norm", [None, 5.0])
@pytest.mark.parametrize(("alpha", "z_thresh", "warmup"), [(0.97, 2.5, 5), (0.8, 1.5, 3)])
def test_zclip_trace_matches_reference(
    max_norm: float | None, alpha: float, z_thresh: float, warmup: int
) -> None:
    strategy = gradclip.ZClip(alpha, z_thresh, warmup_steps=warmup, max_grad_norm=max_norm)
    scales = trace(strategy, {"a": NORMS})["a"]
    expected = zclip_reference(NORMS, alpha, z_thresh, warmup, max_norm)
    assert scales == pytest.approx(expected, rel=1e-12)
    assert sum(s < 1.0 for s in expected[warmup:]) >= 3  # the spikes were clipped


def test_zclip_stats_are_reported() -> None:
    layers = {"a": [nn.Parameter(torch.zeros(2))]}
    normalizer = gradclip.GradientNormalizer(layers, gradclip.ZClip(warmup_steps=2))
    for n in (1.0, 3.0):
        layers["a"][0].grad = torch.tensor([n, 0.0])
        report = normalizer.apply()
    stats = report.to_dict()["stats"]
    assert stats["zclip_mean"] == pytest.approx(2.0) and stats["zclip_std"] == pytest.approx(1.0)


# -- scope -----------------------------------------------------------------------------------
SECOND = [2.0 * n if i % 5 else 0.5 for i, n in enumerate(reversed(NORMS))]


@pytest.mark.parametrize(
    ("make", "reference"),
    [
        (
            lambda scope: gradclip.AutoClip(20.0, scope=scope),
            lambda norms: autoclip_reference(norms, 20.0),
        ),
        (
            lambda scope: gradclip.ZClip(0.9, 2.0, warmup_steps=4, scope=scope),
            lambda norms: zclip_reference(norms, 0.9, 2.0, 4, None),
        ),
    ],
    ids=["autoclip", "zclip"],
)
def test_layer_scope_tracks_each_layer_and_global_scope_tracks_the_total(
    make: object, reference: object
) -> None:
    per_layer = trace(make("layer"), {"a": NORMS, "b": SECOND})  # type: ignore[operator]
    assert per_layer["a"] == pytest.approx(reference(NORMS), rel=1e-12)  # type: ignore[operator]
    assert per_layer["b"] == pytest.approx(reference(SECOND), rel=1e-12)  # type: ignore[operator]
    together = trace(make("global"), {"a": NORMS, "b": SECOND})  # type: ignore[operator]
    totals = [math.hypot(x, y) for x, y in zip(NORMS, SECOND)]
    assert together["a"] == pytest.approx(reference(totals), rel=1e-12)  # type: ignore[operator]
    assert together["a"] == pytest.approx(together["b"], rel=1e-12)


@pytest.mark.parametrize(
    "rule", [gradclip.AutoClip(50.0, scope="layer"), gradclip.ZClip(warmup_steps=3, scope="layer")]
)
def test_layer_scope_follows_layers_by_name_as_they_come_and_go(rule: gradclip.Rule) -> None:
    # Two heads trained on alternate steps, norms 0.002 and 22: each keeps its own
    # statistics, advanced only on its own steps, so each head's spike is clipped.
    a, b = (
        nn.Parameter(torch.zeros(3, dtype=torch.float64)),
        nn.Parameter(torch.zeros(3, dtype=torch.float64)),
    )
    normalizer = gradclip.GradientNormalizer({"a": [a], "b": [b]}, rule)
    alone = {
        name: gradclip.GradientNormalizer({name: [p]}, rule) for name, p in (("a", a), ("b", b))
    }
    unit = torch.tensor([0.6, 0.0, 0.8], dtype=torch.float64)
    for step in range(16):
        name, param, scale = ("a", a, 0.002) if step % 2 == 0 else ("b", b, 22.0)
        spike = 1000.0 if step >= 12 else 1.0
        a.grad = b.grad = None
        param.grad = unit * scale * spike
        normalizer.apply()
        shared = param.grad.clone()
        param.grad = unit * scale * spike
        alone[name].apply()
        assert torch.equal(shared, param.grad), (step, name)
        if step >= 12:
            assert float(shared.norm()) < scale * spike / 10, (step, name)
    rows = normalizer.state_dict()["rules"]
    (entry,) = rows.values()
    assert set(entry["rows"]) == {"a", "b"}
    assert all(int(row["count"]) == 8 for row in entry["rows"].values())


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="percentile"):
        gradclip.AutoClip(101.0)
    with pytest.raises(ValueError, match="history_size"):
        gradclip.AutoClip(history_size=0)
    with pytest.raises(ValueError, match="scope"):
        gradclip.AutoClip(scope="model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        gradclip.ZClip(alpha=1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        gradclip.ZClip(warmup_steps=0)
    with pytest.raises(ValueError, match="z_thresh"):
        gradclip.ZClip(z_thresh=-1.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda scope: gradclip.ZClip(warmup_steps=5, scope=scope),
        lambda scope: gradclip.AutoClip(10, history_size=8, scope=scope),
        lambda scope: gradclip.AutoClip(10, history_size=None, scope=scope),
    ],
    ids=["zclip", "autoclip-ring", "autoclip-unbounded"],
)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_zero_gradients_count_as_no_gradient(make: Any, scope: str) -> None:
    """A layer idle (all-zero gradients) through the warm-up is not clipped to nothing after
    it: the statistics skip zero norms, as a normalizer that never saw them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    normalizer = gradclip.GradientNormalizer(model, make(scope))
    tracked = model if scope == "global" else model[1]
    alone = copy.deepcopy(tracked)
    reference = gradclip.GradientNormalizer(alone, make("global"))
    gen = torch.Generator().manual_seed(1)
    for step in range(70):  # past the unbounded history's growth at 64
        idle = step < 12 or step in (30, 31)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * (1 + 9 * (step % 11 == 0))
        if idle:
            for p in tracked.parameters():
                p.grad.zero_()
        for p, q in zip(tracked.parameters(), alone.parameters()):
            q.grad = p.grad.clone()
        report = normalizer.apply()
        if idle:
            assert report.to_dict()["changed"]["1"] is False
            assert not any(bool(p.grad.any()) for p in tracked.parameters())
            continue
        reference.apply()
        for p, q in zip(tracked.parameters(), alone.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert float(model[1].weight.grad.norm()) > 0
