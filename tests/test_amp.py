"""``normalizer.attach(optimizer)`` with ``torch.amp.GradScaler``, in both orders users write.

The scaler multiplies the loss by a power of two and divides the gradients by it
again, so with fp32 parameters and no autocast the unscaled gradients equal
those of a plain ``loss.backward()`` bit for bit: the normalizer must see
exactly those, never the scaled ones, and must not run on a step the scaler skips.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradclip

SCALE = 2.0**12


class Recording(gradclip.InPlaceRule):
    """A stateful pass-through rule that records what it was handed.

    Its state (a step counter and the largest norm seen per layer, on the device)
    stands for the history of an adaptive rule such as AutoClip or ZClip.
    """

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    @property
    def per_layer_state(self) -> bool:
        return True

    def init_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> gradclip.State:
        return {
            "calls": torch.zeros(rows, dtype=torch.int64, device=device),
            "max_norm": torch.zeros(rows, dtype=dtype, device=device),
        }

    def transform_(
        self, m: gradclip.Measured, state: gradclip.State
    ) -> tuple[torch.Tensor | None, gradclip.State]:
        self.seen.append([g.clone() for g in m.grads])
        assert m.layer_norms is not None
        return None, {
            "calls": state["calls"] + 1,
            "max_norm": torch.maximum(state["max_norm"], m.layer_norms),
        }


def _state(normalizer: gradclip.GradientNormalizer) -> dict[str, dict[str, torch.Tensor]]:
    (rule,) = normalizer.state_dict()["rules"].values()
    return rule["rows"]  # type: ignore[no-any-return]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)


def _reference_grads(model: nn.Module) -> list[torch.Tensor]:
    twin = copy.deepcopy(model)
    x, y = _batch()
    nn.functional.mse_loss(twin(x), y).backward()
    return [p.grad.clone() for p in twin.parameters()]  # type: ignore[union-attr]


def test_cpu_grad_scaler_is_available() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    assert scaler.is_enabled()


@pytest.mark.parametrize("explicit_unscale", [True, False], ids=["unscale_-then-step", "step-only"])
def test_normalizer_sees_unscaled_gradients(explicit_unscale: bool) -> None:
    model = _model()
    expected = _reference_grads(model)
    strategy = Recording()
    normalizer = gradclip.GradientNormalizer(model, strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = normalizer.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)

    x, y = _batch()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    scaled = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    for s, e in zip(scaled, expected):
        torch.testing.assert_close(s, e * SCALE, rtol=0, atol=0)
    if explicit_unscale:
        scaler.unscale_(optimizer)
        assert strategy.seen == []  # unscale_ alone does not run the normalizer
    scaler.step(optimizer)
    scaler.update()
    handle.remove()

    assert len(strategy.seen) == 1
    for got, e in zip(strategy.seen[0], expected):
        torch.testing.assert_close(got, e, rtol=0, atol=0)
    report = normalizer.last_report
    assert report is not None
    want = torch.cat([e.flatten() for e in expected[:2]]).norm()
    torch.testing.assert_close(report.layer_norms["0"], want)


@pytest.mark.parametrize("explicit_unscale", [True, False], ids=["unscale_-then-step", "step-only"])
def test_clipping_applies_to_unscaled_gradients(explicit_unscale: bool) -> None:
    # The clipped result must be what normalize_ gives on the unscaled gradients.
    model = _model()
    twin = copy.deepcopy(model)
    for p, g in zip(twin.parameters(), _reference_grads(model)):
        p.grad = g
    gradclip.normalize_(twin, "ClipL2PerLayer", 0.01)
    want = [p.grad for p in twin.parameters()]

    captured: list[list[torch.Tensor]] = []

    class Capture(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            captured.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
            return super().step(closure)

    optimizer = Capture(model.parameters(), lr=0.1)
    gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.01).attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = _batch()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    if explicit_unscale:
        scaler.unscale_(optimizer)
    scaler.step(optimizer)
    assert len(captured) == 1
    for got, w in zip(captured[0], want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)


@pytest.mark.parametrize("explicit_unscale", [True, False], ids=["unscale_-then-step", "step-only"])
def test_skipped_step_leaves_adaptive_state_untouched(explicit_unscale: bool) -> None:
    model = _model()
    strategy = Recording()
    normalizer = gradclip.GradientNormalizer(model, strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    normalizer.attach(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    x, y = _batch()

    def step(poison: bool) -> None:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if poison:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if explicit_unscale:
            scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()

    step(poison=False)
    report = normalizer.last_report
    before = _state(normalizer)
    weights = [p.detach().clone() for p in model.parameters()]

    step(poison=True)  # the scaler finds inf, skips the step and halves the scale
    assert scaler.get_scale() == SCALE / 2
    assert len(strategy.seen) == 1
    assert normalizer.last_report is report
    after = _state(normalizer)
    assert after.keys() == before.keys()
    for layer, values in before.items():
        assert all(torch.equal(values[k], after[layer][k]) for k in values)
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))

    step(poison=False)  # training goes on, and so does the normalizer
    assert len(strategy.seen) == 2
    assert all(int(row["calls"]) == 2 for row in _state(normalizer).values())
