"""``normalizer.attach(optimizer)``: closures, attaching twice, several normalizers."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from helpers import fill_grads, mlp
from torch import nn

import gradclip


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g) * 3, torch.randn(16, 3, generator=g)


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "LBFGS": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=5),
    "SGD": lambda p: torch.optim.SGD(p, lr=0.1),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["ClipL2PerLayer", "ClipElementWiseAbsoluteValue"])
def test_closure_gradients_are_normalized_as_by_hand(name: str, mode: str) -> None:
    x, y = _data()
    by_hand, attached = _model(), _model()
    opt_hand = OPTIMIZERS[name](list(by_hand.parameters()))
    opt_att = OPTIMIZERS[name](list(attached.parameters()))
    normalizer = gradclip.GradientNormalizer(attached, mode, 0.05)
    normalizer.attach(opt_att)
    hand = gradclip.GradientNormalizer(by_hand, mode, 0.05)
    evaluations = {"hand": 0, "attached": 0}

    def closure_hand() -> torch.Tensor:
        evaluations["hand"] += 1
        opt_hand.zero_grad()
        loss = nn.functional.mse_loss(by_hand(x), y)
        loss.backward()
        hand.apply()  # what attach must do for every evaluation
        return loss

    def closure_attached() -> torch.Tensor:
        evaluations["attached"] += 1
        opt_att.zero_grad()
        loss = nn.functional.mse_loss(attached(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt_hand.step(closure_hand)
        opt_att.step(closure_attached)
    assert evaluations["hand"] == evaluations["attached"] >= 3
    for a, b in zip(by_hand.parameters(), attached.parameters()):
        assert torch.equal(a, b)
    plain = _model()  # and the normalization did change the training
    opt_plain = OPTIMIZERS[name](list(plain.parameters()))

    def closure_plain() -> torch.Tensor:
        opt_plain.zero_grad()
        loss = nn.functional.mse_loss(plain(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt_plain.step(closure_plain)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), attached.parameters()))


def test_closure_is_passed_by_keyword_too() -> None:
    x, y = _data()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1e-3)
    normalizer.attach(optimizer)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure=closure)
    assert normalizer.last_report is not None
    for layer in ("0", "2"):
        grads = [p.grad.flatten() for p in getattr(model, layer).parameters()]
        assert float(torch.cat(grads).norm()) == pytest.approx(1e-3, rel=1e-5)


def test_nothing_is_normalized_twice_per_step() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(warmup_steps=100))
    normalizer.attach(optimizer)
    x, y = _data()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    (slot,) = normalizer.state_dict()["rules"].values()
    assert int(slot["rows"]["*"]["count"]) == 5


def test_attaching_twice_to_one_optimizer_is_refused() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer")
    handle = normalizer.attach(optimizer)
    with pytest.raises(RuntimeError, match="already attached"):
        normalizer.attach(optimizer)
    handle.remove()
    handle.remove()  # idempotent
    normalizer.attach(optimizer).remove()  # after remove(), attaching again is fine


def test_skip_policy_refuses_a_closure_and_attaching_twice() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", nonfinite="skip")
    normalizer.attach(optimizer)
    with pytest.raises(RuntimeError, match="already attached"):
        normalizer.attach(optimizer)
    with pytest.raises(RuntimeError, match="closure"):
        optimizer.step(lambda: torch.tensor(0.0))


def test_two_normalizers_on_one_optimizer_both_run() -> None:
    x, y = _data()
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = gradclip.GradientNormalizer(model, "ClipElementWiseAbsoluteValue", 0.01)
    second = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1e-3)
    first.attach(optimizer)
    second.attach(optimizer)
    reference = copy.deepcopy(model)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    nn.functional.mse_loss(reference(x), y).backward()
    gradclip.normalize_(reference, "ClipElementWiseAbsoluteValue", 0.01)
    gradclip.normalize_(reference, "ClipL2PerLayer", 1e-3)
    expected = [p - 0.1 * p.grad for p in reference.parameters()]
    optimizer.step()
    assert all(torch.allclose(a, b) for a, b in zip(model.parameters(), expected))
    assert first.last_report is not None and second.last_report is not None


def test_attach_applies_before_every_step_and_detaches() -> None:
    model = mlp(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    normalizer = gradclip.GradientNormalizer(model, "RenormalizeL2PerLayer")
    handle = normalizer.attach(optimizer)
    fill_grads(model)
    optimizer.step()
    assert normalizer.last_report is not None
    assert float(
        model[0].weight.grad.norm() ** 2 + model[0].bias.grad.norm() ** 2
    ) == pytest.approx(1.0, rel=1e-5)
    handle.remove()
    grads = fill_grads(model)
    optimizer.step()
    assert torch.equal(model[0].weight.grad, grads[0])


def test_attach_with_grad_scaler_sees_unscaled_gradients() -> None:
    model = mlp(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1.0)
    normalizer.attach(optimizer)
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    scaler.scale(model(x).pow(2).sum() * 100).backward()
    unscaled = [p.grad / 1024.0 for p in model.parameters()]
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    reported = normalizer.last_report.to_dict()["layer_norms"]
    expected = math.sqrt(sum(float(g.double().norm()) ** 2 for g in unscaled[:2]))
    assert reported["0"] == pytest.approx(expected, rel=1e-5)
    assert float(
        torch.cat([p.grad.flatten() for p in model[0].parameters()]).norm()
    ) == pytest.approx(1.0, rel=1e-5)


def test_attach_refuses_gradients_still_scaled_for_a_fused_optimizer() -> None:
    model = mlp(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    gradclip.GradientNormalizer(model, "ClipL2PerLayer").attach(optimizer)
    grads = fill_grads(model)
    optimizer.grad_scale = torch.tensor(1024.0)  # what GradScaler sets for fused optimizers
    with pytest.raises(RuntimeError, match="unscale_"):
        optimizer.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    # GradScaler would have removed it only after a step that returned: the error
    # removes it, so that a fixed loop (unscale_ first) is not refused again
    assert "grad_scale" not in optimizer.__dict__
    optimizer.step()
