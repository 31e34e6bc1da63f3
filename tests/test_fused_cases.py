"""Fused optimizers on the cases users meet: what ``grad_scale`` may carry, and when.

Each case is compared with the same step without folding: ``scaler.unscale_``
where a ``GradScaler`` is used, ``normalizer.apply()``, then the same fused
optimizer's step, each step from the same state. Parameters the normalizer
does not normalize must come out identical. The normalized ones may differ by
the rounding of their gradient (the kernel divides by ``1 / c`` where
``apply()`` multiplies by ``c``): within one unit in the last place of the
step's magnitude for SGD, two for AdamW, whose update rounds that difference
once more (the worst measured, on AVX-512 and with ATEN_CPU_CAPABILITY=default).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import backward_at, fused_net
from test_fused import _within_ulps
from torch import nn

import gradclip

MakeOpt = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, MakeOpt] = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True),
}
ULPS = {torch.optim.SGD: 1, torch.optim.AdamW: 2}  # see the module docstring


class _Loop:
    """A model, its fused optimizer (over ``extra`` too) and a normalizer of the model.

    ``how``: ``"attach"``, ``"attach fold=False"``, ``"attach scaler="`` or
    ``"reference"`` (``unscale_``, ``apply()``, then the step).
    """

    def __init__(self, how: str, make_opt: MakeOpt, amp: bool, extra: bool = False) -> None:
        self.model = fused_net()
        self.extra = [nn.Parameter(torch.linspace(-1.0, 1.0, 5))] if extra else []
        self.opt = make_opt([*self.model.parameters(), *self.extra])
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp else None
        self.normalizer = gradclip.GradientNormalizer(self.model, gradclip.ClipGlobalNorm(0.05))
        self.how = how
        if how != "reference":
            scaler = self.scaler if how == "attach scaler=" else None
            self.normalizer.attach(self.opt, fold=how != "attach fold=False", scaler=scaler)

    def backward(self, k: int) -> None:
        self.opt.zero_grad()
        backward_at(self.model, k, self.scaler)
        for p in self.extra:
            grad = torch.full_like(p, 2.0)
            p.grad = grad if self.scaler is None else self.scaler.scale(grad)

    def copy_from(self, other: _Loop) -> None:
        """Start the next step from ``other``'s state (each step is compared on its own)."""
        with torch.no_grad():
            for p, q in zip(self.params(), other.params(), strict=True):
                p.copy_(q)
        self.opt.load_state_dict(copy.deepcopy(other.opt.state_dict()))
        self.normalizer.load_state_dict(other.normalizer.state_dict())
        if self.scaler is not None and other.scaler is not None:
            self.scaler.load_state_dict(other.scaler.state_dict())

    def params(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.extra]

    def step(self) -> None:
        if self.how == "reference":
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            self.normalizer.apply()
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()


def _same_step(ours: _Loop, ref: _Loop, k: int, before: list[torch.Tensor]) -> None:
    normalized = {id(p) for p in ours.model.parameters() if p.requires_grad}
    pairs = zip(ours.params(), ref.params(), before, strict=True)
    for i, (p, q, b) in enumerate(pairs):
        if id(p) in normalized:
            ulps = next(n for kind, n in ULPS.items() if isinstance(ours.opt, kind))
            assert _within_ulps(p.detach(), q.detach(), b, ulps), (k, i)
        else:  # left to the optimizer: divided by the scale only
            assert torch.equal(p, q), (k, i)
    ref.copy_from(ours)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["attach", "attach fold=False", "attach scaler="])
def test_a_parameter_the_normalizer_does_not_cover_is_unscaled_all_the_same(
    opt_name: str, how: str
) -> None:
    # The optimizer also updates a parameter outside the model: its gradient still
    # carries the GradScaler's S, so grad_scale must stay S for it and the
    # coefficient be multiplied into the model's gradients.
    ours = _Loop(how, OPTIMIZERS[opt_name], amp=True, extra=True)
    ref = _Loop("reference", OPTIMIZERS[opt_name], amp=True, extra=True)
    for k in range(3):
        before = [p.detach().clone() for p in ours.params()]
        for loop in (ours, ref):
            loop.backward(k)
            loop.step()
        _same_step(ours, ref, k, before)
        assert "grad_scale" not in ours.opt.__dict__


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize(
    ("amp", "how"),
    [
        (False, "attach"),
        (False, "attach fold=False"),
        (True, "attach"),
        (True, "attach fold=False"),
        (True, "attach scaler="),
    ],
)
def test_a_frozen_parameter_that_kept_its_gradient_is_not_divided_by_the_coefficient(
    opt_name: str, amp: bool, how: str
) -> None:
    # Frozen after backward (or zero_grad(set_to_none=False)): the normalizer
    # leaves it out of its norms, the optimizer still updates it
    ours = _Loop(how, OPTIMIZERS[opt_name], amp)
    ref = _Loop("reference", OPTIMIZERS[opt_name], amp)
    for k in range(3):
        before = [p.detach().clone() for p in ours.params()]
        for loop in (ours, ref):
            loop.backward(k)
            loop.model[2].bias.requires_grad_(k % 2 == 1)
            loop.step()
        _same_step(ours, ref, k, before)
    report = ours.normalizer.last_report
    assert report is not None and float(report.total_norm()) < 100  # true norms


def test_parameter_groups_that_are_not_all_fused() -> None:
    # torch's unfused update asserts that grad_scale and found_inf are None
    model = fused_net()
    first, *rest = model.parameters()
    opt = torch.optim.AdamW(
        [{"params": [first]}, {"params": rest, "fused": False}], lr=0.01, fused=True
    )
    assert gradclip.fused.fusable(opt) == "a parameter group has fused=False"
    normalizer = gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05), nonfinite="skip")
    handle = normalizer.attach(opt)
    assert not isinstance(handle, gradclip.fused.FusedHandle)  # normalized as by apply()
    backward_at(model, 0, None)
    opt.step()
    assert float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()) == (  # type: ignore[union-attr]
        pytest.approx(0.05, rel=1e-6)
    )
    # such a group added after attach: refused before anything changes
    model = fused_net()
    first, *rest = model.parameters()
    opt = torch.optim.AdamW([first], lr=0.01, fused=True)
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(warmup_steps=1))
    handle = normalizer.attach(opt)
    opt.add_param_group({"params": rest, "fused": False})
    backward_at(model, 0, None)
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    params = [p.detach().clone() for p in model.parameters()]
    state = repr(normalizer.state_dict())
    with pytest.raises(RuntimeError, match=r"fused=False.*attach again"):
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert repr(normalizer.state_dict()) == state
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    handle.remove()
    normalizer.attach(opt)  # as the message says: now the unfused path
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_a_closure_is_evaluated_first_and_its_gradients_normalized(
    opt_name: str, nonfinite: str
) -> None:
    # torch's fused steps evaluate the closure, then update with its gradients
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    ours, ref = fused_net(), fused_net()
    opt, opt_ref = (OPTIMIZERS[opt_name](list(m.parameters())) for m in (ours, ref))
    normalizer = gradclip.GradientNormalizer(ours, "ClipL2PerLayer", 0.05, nonfinite=nonfinite)
    handle = normalizer.attach(opt)
    hand = gradclip.GradientNormalizer(ref, "ClipL2PerLayer", 0.05)
    calls = []

    def closure() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = ours(x).square().mean()
        loss.backward()
        return loss

    for k in range(3):
        with torch.no_grad():  # as a training loop under no_grad would call it
            loss = opt.step(closure) if k else opt.step(closure=closure)
        opt_ref.zero_grad()
        expected = ref(x).square().mean()
        expected.backward()
        hand.apply()
        opt_ref.step()
        assert torch.equal(loss, expected)
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q), k
    assert calls == [True] * 3
    assert isinstance(handle, gradclip.fused.FusedHandle) and handle.skipped_steps == 0
    # a step that bypasses the wrapper (a copy of the step taken before attach)
    # cannot normalize what its closure computes later: refused, nothing changed
    params = [p.detach().clone() for p in ours.parameters()]
    with pytest.raises(RuntimeError, match="bypassed"):
        type(opt).step(opt, closure)
    assert calls == [True] * 3
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), params, strict=True))
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__


class _FailsOnDemand(torch.optim.AdamW):
    """A fused AdamW whose step raises while ``fail`` is set (after gradclip ran)."""

    fail = False

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if self.fail:
            raise ValueError("the optimizer's own error")
        return super().step(closure)


@pytest.mark.parametrize("how", ["attach", "attach scaler="])
def test_an_error_in_the_optimizer_step_leaves_the_scaler_and_the_next_steps_right(
    how: str,
) -> None:
    def make(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
        return _FailsOnDemand(ps, lr=0.01, weight_decay=0.1, fused=True)

    ours = _Loop(how, make, amp=True)
    assert ours.scaler is not None and isinstance(ours.opt, _FailsOnDemand)
    ours.backward(0)
    ours.step()
    ours.backward(1)
    scaler_state = repr(ours.scaler.state_dict())
    ours.opt.fail = True
    with pytest.raises(ValueError, match="own error"):
        ours.step()
    ours.opt.fail = False
    assert "grad_scale" not in ours.opt.__dict__ and "found_inf" not in ours.opt.__dict__
    assert repr(ours.scaler.state_dict()) == scaler_state  # scale and growth tracker
    ref = _Loop("reference", make, amp=True)
    ref.copy_from(ours)
    for k in range(2, 5):
        before = [p.detach().clone() for p in ours.params()]
        for loop in (ours, ref):
            loop.backward(k)
            loop.step()
        _same_step(ours, ref, k, before)


def test_a_compiled_training_step_with_an_attached_fused_optimizer() -> None:
    # dynamo runs the attached step (gradclip's wrapper, its skip on the device)
    # as eager code does: the same parameters, the same skipped step
    def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    loops = []
    for _ in range(2):
        model = fused_net()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
        rule = gradclip.ZClip(warmup_steps=2)
        handle = gradclip.GradientNormalizer(model, rule, nonfinite="skip").attach(opt)
        loops.append((model, opt, handle))
    step = torch.compile(train, backend="aot_eager")
    for k in range(5):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(k))
        if k == 3:
            x[0, 0] = float("nan")
        train(*loops[0][:2], x)
        step(*loops[1][:2], x)
        for p, q in zip(loops[0][0].parameters(), loops[1][0].parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert [h.skipped_steps for _, _, h in loops] == [1, 1]
