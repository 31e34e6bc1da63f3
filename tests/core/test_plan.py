"""The plan: built once per layout of the gradients, reused by every step until it changes."""

from __future__ import annotations

import pytest
import torch
from helpers import fill_grads, mlp

import gradclip


def test_plan_is_cached_and_rebuilt_when_gradients_change() -> None:
    model = mlp(3)
    fill_grads(model)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer")
    normalizer.apply()
    plan = normalizer._engine._plan
    fill_grads(model, seed=2)
    normalizer.apply()
    assert normalizer._engine._plan is plan
    model[1].bias.grad = None
    report = normalizer.apply()
    assert normalizer._engine._plan is not plan
    assert "1.bias" not in report.param_names


def test_the_usual_step_is_planned_at_construction() -> None:
    # torch.compile(normalizer.apply) then finds its plan cached instead of tracing it
    model = mlp(3)
    model[0].weight.requires_grad_(False)
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip())
    plan = normalizer._engine._plan
    assert plan is not None and "0.weight" not in plan.names
    fill_grads(model)
    model[0].weight.grad = None
    normalizer.apply()
    assert normalizer._engine._plan is plan


def test_layers_of_one_mode_with_different_thresholds_run_as_one_group() -> None:
    model = mlp(4)
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", 1.0, {"1": ("ClipL2PerLayer", 0.5), "2": ("ClipL2PerLayer", 3.0)}
    )
    fill_grads(model)
    report = normalizer.apply()
    plan = normalizer._engine._plan
    assert plan is not None and len(plan.groups) == 1 and len(plan.rounds) == 1
    norms = report.to_dict()["layer_norms"]
    for layer, threshold in (("0", 1.0), ("1", 0.5), ("2", 3.0), ("3", 1.0)):
        grads = torch.cat([p.grad.flatten() for p in model[int(layer)].parameters()])
        assert float(grads.norm()) == pytest.approx(min(threshold, norms[layer]), rel=1e-6)


def test_a_chain_runs_in_rounds_with_one_multiply_per_round() -> None:
    model = mlp(3)
    rule = gradclip.chain("ClipL2PerParamType", "ClipL2PerLayer", gradclip.ClipGlobalNorm(1.0))
    normalizer = gradclip.GradientNormalizer(model, rule, overrides={"0": "ClipL2PerLayer"})
    fill_grads(model)
    normalizer.apply()
    plan = normalizer._engine._plan
    assert plan is not None and len(plan.rounds) == 3
    assert [len(r.stages) for r in plan.rounds] == [2, 1, 1]
