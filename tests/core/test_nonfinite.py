"""The non-finite policies: propagate, zero, error, skip."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import HostReadCounter, OpCounter, fill_grads
from torch import nn

import gradclip
from gradclip.core.nonfinite import NonFiniteGradientError


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))


def _poison(model: nn.Sequential, index: int, value: float) -> None:
    model[index].weight.grad[0, 1] = value


def test_propagate_is_the_default_and_leaves_nan_and_inf() -> None:
    model = _model()
    fill_grads(model)
    _poison(model, 1, math.nan)
    _poison(model, 2, math.inf)
    report = gradclip.normalize_(model, "ClipL2PerLayer")
    assert math.isnan(model[1].weight.grad[0, 1])
    assert report.nonfinite_layers() == ["1", "2"]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "mode",
    [
        "ClipL2PerLayer",
        "None",
        ("ClipElementWiseAbsoluteValue", 0.5),
        gradclip.AdaptiveGradClip(),
        gradclip.ClipGlobalNorm(1.0),
        gradclip.AutoClip(),
        gradclip.chain(("ClipElementWiseAbsoluteValue", 0.5), gradclip.ClipGlobalNorm(1.0)),
    ],
    ids=str,
)
def test_zero_policy_zeros_bad_layers_and_leaves_the_rest_as_if_they_were_zero(
    mode: object, value: float
) -> None:
    strategy = gradclip.rules.dl4j.resolve_rule(*mode) if isinstance(mode, tuple) else mode
    model, reference = _model(), _model()
    grads = fill_grads(model)
    for p, g in zip(reference.parameters(), grads):
        p.grad = g.clone()
    reference[1].weight.grad.zero_()
    reference[1].bias.grad.zero_()
    _poison(model, 1, value)
    report = gradclip.GradientNormalizer(model, strategy, nonfinite="zero").apply()
    gradclip.GradientNormalizer(reference, strategy).apply()
    assert torch.equal(model[1].weight.grad, torch.zeros(4, 4))
    assert torch.equal(model[1].bias.grad, torch.zeros(4))
    assert not torch.signbit(model[1].weight.grad).any()  # +0.0, from the bit mask
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert report.nonfinite_layers() == ["1"]
    assert report.to_dict()["changed"]["1"] is not False  # None: the rule cannot tell


def test_zero_policy_bfloat16_and_no_sync() -> None:
    model = _model().to(torch.bfloat16)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", nonfinite="zero")
    fill_grads(model)
    normalizer.apply()  # builds the plan
    fill_grads(model, seed=1)
    _poison(model, 0, math.inf)
    with OpCounter() as counter, HostReadCounter() as reads:
        normalizer.apply()
    assert counter.syncs == 0 and sum(reads.calls.values()) == 0
    assert torch.equal(model[0].weight.grad, torch.zeros(4, 4, dtype=torch.bfloat16))
    assert torch.isfinite(model[1].weight.grad).all()


def test_error_policy_names_layers_and_modifies_nothing() -> None:
    model = _model()
    fill_grads(model)
    _poison(model, 0, math.nan)
    _poison(model, 2, math.inf)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError, match=r"layer\(s\) '0', '2'") as info:
        gradclip.normalize_(model, gradclip.ClipGlobalNorm(1e-3), nonfinite="error")
    assert info.value.layers == ["0", "2"]
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)


def test_error_policy_reads_once_and_passes_finite_steps() -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", nonfinite="error")
    fill_grads(model)
    normalizer.apply()
    fill_grads(model, seed=3)
    with HostReadCounter() as reads:
        normalizer.apply()
    assert reads.calls["tolist"] == 1 and sum(reads.calls.values()) == 1


def _train(normalizer_policy: str, poison_at: set[int]) -> tuple[nn.Sequential, list[float]]:
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    normalizer = gradclip.GradientNormalizer(
        model, gradclip.ZClip(warmup_steps=2), nonfinite=normalizer_policy
    )
    handle = normalizer.attach(optimizer)
    means = []
    for step in range(6):
        optimizer.zero_grad()
        gen = torch.Generator().manual_seed(step)
        model(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
        if step in poison_at:
            _poison(model, 1, math.nan)
        optimizer.step()
        means.append(normalizer.last_report.to_dict()["stats"].get("zclip_mean", math.nan))
    handle.remove()
    return model, means


def test_skip_policy_skips_the_optimizer_step_and_keeps_rule_state() -> None:
    propagated, _ = _train("propagate", {2})
    assert not all(torch.isfinite(p).all() for p in propagated.parameters())
    skipped, means = _train("skip", {2})
    assert all(torch.isfinite(p).all() for p in skipped.parameters())
    assert all(math.isfinite(m) for m in means[3:])  # ZClip's EMA was not poisoned

    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    normalizer = gradclip.GradientNormalizer(
        model, gradclip.ZClip(warmup_steps=2), nonfinite="skip"
    )
    handle = normalizer.attach(optimizer)
    fill_grads(model)
    optimizer.step()
    weights = [p.detach().clone() for p in model.parameters()]
    adam_steps = [float(optimizer.state[p]["step"]) for p in model.parameters()]
    zstate = normalizer.state_dict()
    fill_grads(model, seed=1)
    _poison(model, 2, math.inf)
    assert optimizer.step() is None
    assert handle.skipped_steps == 1
    assert normalizer.last_report.nonfinite_layers() == ["2"]
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert [float(optimizer.state[p]["step"]) for p in model.parameters()] == adam_steps
    (after,), (before,) = normalizer.state_dict()["rules"].values(), zstate["rules"].values()
    assert after["steps"] == before["steps"]  # ZClip saw nothing
    assert all(torch.equal(after["rows"]["*"][k], v) for k, v in before["rows"]["*"].items())
    fill_grads(model, seed=2)
    optimizer.step()
    assert not all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    handle.remove()
    assert "step" not in optimizer.__dict__


def test_skip_works_with_an_lr_scheduler_created_after_attach() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", nonfinite="skip")
    handle = normalizer.attach(optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    fill_grads(model)
    _poison(model, 0, math.nan)
    optimizer.step()
    scheduler.step()
    assert handle.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_needs_an_optimizer_with_normalize_() -> None:
    with pytest.raises(ValueError, match="needs an optimizer"):
        gradclip.normalize_(_model(), "ClipL2PerLayer", nonfinite="skip")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        gradclip.GradientNormalizer(_model(), "ClipL2PerLayer", nonfinite="ignore")
