"""Attached to a fused optimizer: folding into ``grad_scale``, AMP without ``unscale_``, skips.

Folded and unfolded steps are compared step by step from the same state: the
gradients the optimizer uses are the same, the parameters are the same (within
one unit in the last place of the step for bf16 parameters, which the fused
kernels update with the unrounded quotient), and the reports agree.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import HostReadCounter, OpCounter, backward_at, fused_net
from torch import nn

import gradclip
import gradclip.fused

RuleFactory = Callable[[], Any]
FOLDABLE: dict[str, RuleFactory] = {
    "ClipGlobalNorm": lambda: gradclip.ClipGlobalNorm(0.05),
    "ZClip": lambda: gradclip.ZClip(warmup_steps=2),
    "AutoClip": lambda: gradclip.AutoClip(percentile=50.0),
    "chain": lambda: gradclip.chain(gradclip.ClipGlobalNorm(0.2), gradclip.ClipGlobalNorm(0.05)),
    "ClipGlobalNorm p=inf": lambda: gradclip.ClipGlobalNorm(0.05, norm_type=math.inf),
    "ClipGlobalNorm p=3": lambda: gradclip.ClipGlobalNorm(0.05, norm_type=3.0),
}
ONE_LAYER: dict[str, RuleFactory] = {  # per-layer rules fold on a model of one layer
    "ClipL2PerLayer one layer": lambda: gradclip.ClipL2PerLayer(0.05),
    "RenormalizeL2PerLayer one layer": lambda: gradclip.RenormalizeL2PerLayer(),
    "ZClip layer one layer": lambda: gradclip.ZClip(warmup_steps=2, scope="layer"),
}
OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "AdamW+wd": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, fused=True),
    "Adam+maximize": lambda ps: torch.optim.Adam(ps, lr=0.01, maximize=True, fused=True),
    "SGD+momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
}


def _step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


class _Twin:
    def __init__(
        self,
        fold: bool,
        rule: RuleFactory,
        make_opt: Any,
        dtype: torch.dtype,
        amp: bool,
        layers: int,
    ) -> None:
        self.model = fused_net(dtype, layers)
        self.opt = make_opt(list(self.model.parameters()))
        self.normalizer = gradclip.GradientNormalizer(self.model, rule())
        self.handle = self.normalizer.attach(self.opt, fold=fold)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp else None

    def step(self, k: int) -> None:
        self.opt.zero_grad()
        backward_at(self.model, k, self.scaler)
        _step(self.opt, self.scaler)

    def copy_from(self, other: _Twin) -> None:
        with torch.no_grad():
            for p, q in zip(self.model.parameters(), other.model.parameters(), strict=True):
                p.copy_(q)
        self.opt.load_state_dict(copy.deepcopy(other.opt.state_dict()))  # no shared tensors
        self.normalizer.load_state_dict(other.normalizer.state_dict())
        if self.scaler is not None and other.scaler is not None:
            self.scaler.load_state_dict(other.scaler.state_dict())


def _ulp(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, math.inf)) - x


def _within_ulps(
    a: torch.Tensor, b: torch.Tensor, before: torch.Tensor | None = None, ulps: int = 1
) -> bool:
    """``|a - b|`` at most ``ulps`` units in the last place of the step's magnitude.

    The magnitude is the largest of the parameter before and after the step and
    of the update: an update that cancels most of a parameter leaves a result
    whose own ulp is finer than the rounding of the update itself.
    """
    scale = torch.maximum(a.abs(), b.abs())
    if before is not None:
        scale = torch.maximum(torch.maximum(scale, before.abs()), (a - before).abs())
    return bool(((a.double() - b.double()).abs() <= ulps * _ulp(scale).double()).all())


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("rule_name", [*FOLDABLE, *ONE_LAYER])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("amp", [False, True], ids=["plain", "GradScaler"])
def test_folded_and_unfolded_steps_agree_to_the_last_place(
    opt_name: str, rule_name: str, dtype: torch.dtype, amp: bool
) -> None:
    layers = 1 if rule_name.endswith("one layer") else 2
    rule = FOLDABLE.get(rule_name) or ONE_LAYER[rule_name]
    folded = _Twin(True, rule, OPTIMIZERS[opt_name], dtype, amp, layers)
    plain = _Twin(False, rule, OPTIMIZERS[opt_name], dtype, amp, layers)
    for k in range(4):
        before = [p.detach().clone() for p in folded.model.parameters()]
        folded.step(k)
        plain.step(k)
        params = zip(folded.model.parameters(), plain.model.parameters(), before, strict=True)
        for p, q, b in params:
            # unfolded, the gradients are divided by the divisor the kernel divides by
            assert p.grad is not None and q.grad is not None
            assert torch.equal(p.grad, q.grad), k
            if dtype == torch.float32:
                assert torch.equal(p, q), k
            else:
                # The bf16 kernels update with g / D unrounded; unfolded, the same
                # quotient is stored in the bf16 gradient first, one bf16 rounding
                # apart. Adam's moments may amplify it where they cancel: over
                # 14,400 tensor-steps (20 seeds x 8 steps, every rule and optimizer
                # here), 99.9% were within 1 ulp of the step's magnitude, the worst 5.
                assert _within_ulps(p.detach(), q.detach(), b, ulps=8), k
        a, b = folded.normalizer.last_report, plain.normalizer.last_report
        assert a is not None and b is not None
        torch.testing.assert_close(a.layer_norm_vector, b.layer_norm_vector, rtol=1e-6, atol=0)
        assert torch.equal(a.changed_vector, b.changed_vector)
        plain.copy_from(folded)


class _SeesScale(torch.optim.AdamW):
    """A fused AdamW that records the ``grad_scale``/``found_inf`` its step is given."""

    seen: list[tuple[Any, Any]]

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.seen.append((getattr(self, "grad_scale", None), getattr(self, "found_inf", None)))
        return super().step(closure)


def _sees_scale(model: nn.Module) -> _SeesScale:
    opt = _SeesScale(model.parameters(), lr=0.01, fused=True)
    opt.seen = []
    return opt


def test_a_global_rule_folds_into_grad_scale_without_a_multiply() -> None:
    model = fused_net()
    opt = _sees_scale(model)
    gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05)).attach(opt)
    backward_at(model, 0, None)
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    total = torch.cat([g.flatten() for g in grads]).norm()
    with OpCounter() as ops:
        opt.step()
    assert "_foreach_mul_" not in ops.ops and "mul_" not in ops.ops
    ((scale, found),) = opt.seen
    assert found is None
    torch.testing.assert_close(scale, total / 0.05, rtol=1e-6, atol=0)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    # the fused kernel wrote the clipped gradients back
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g * (0.05 / total), rtol=1e-6, atol=0)


def test_per_layer_rules_and_fold_false_keep_a_pass() -> None:
    # per-layer coefficients are multiplied in; a uniform one with fold=False is
    # divided in, by the divisor the kernel would have divided by
    for fold, mode, op in (
        (True, "ClipL2PerLayer", "_foreach_mul_"),
        (False, gradclip.ClipGlobalNorm(0.05), "_foreach_div_"),
    ):
        model = fused_net()
        opt = _sees_scale(model)
        gradclip.GradientNormalizer(model, mode, 0.05).attach(opt, fold=fold)
        backward_at(model, 0, None)
        with OpCounter() as ops:
            opt.step()
        assert ops.ops[op] == 1
        assert opt.seen == [(None, None)]


def test_no_fold_when_the_optimizer_updates_other_parameters_too() -> None:
    model = fused_net()
    extra = nn.Parameter(torch.ones(3))
    opt = _SeesScale([*model.parameters(), extra], lr=0.01, fused=True)
    opt.seen = []
    gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05)).attach(opt)
    backward_at(model, 0, None)
    extra.grad = torch.ones(3)
    opt.step()
    assert opt.seen == [(None, None)]
    assert torch.equal(extra.grad, torch.ones(3))  # not divided by anything


def test_amp_without_unscale_matches_unscaled_gradients_per_layer() -> None:
    # a per-layer rule: multiplied in, the scale left to the kernel
    ref, amp = fused_net(), fused_net()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.01, fused=True)
    opt_amp = _sees_scale(amp)
    gradclip.GradientNormalizer(ref, "ClipL2PerLayer", 0.05).attach(opt_ref)
    normalizer = gradclip.GradientNormalizer(amp, "ClipL2PerLayer", 0.05)
    normalizer.attach(opt_amp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    backward_at(ref, 0, None)
    backward_at(amp, 0, scaler)
    scale_before = scaler._scale
    opt_ref.step()
    scaler.step(opt_amp)
    assert scaler._scale is scale_before and float(scaler._scale) == 2.0**12  # not touched
    scaler.update()
    for p, q in zip(ref.parameters(), amp.parameters(), strict=True):
        assert _within_ulps(p.detach(), q.detach())
    report = normalizer.last_report
    assert report is not None and float(report.total_norm()) < 100  # true norms, not scaled
    assert "grad_scale" not in opt_amp.__dict__ and "found_inf" not in opt_amp.__dict__


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_step_the_scaler_skips_changes_no_rule_state(scope: str) -> None:
    model = fused_net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(warmup_steps=1, scope=scope))
    normalizer.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for k in range(3):
        opt.zero_grad()
        backward_at(model, k, scaler)
        _step(opt, scaler)
    state = normalizer.state_dict()["rules"]
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    backward_at(model, 5, scaler)
    first = next(model.parameters())
    assert first.grad is not None
    first.grad[0, 0] = math.inf  # in one layer only
    scale = float(scaler._scale)
    _step(opt, scaler)
    assert float(scaler._scale) == scale / 2  # the scaler saw it and skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    after = normalizer.state_dict()["rules"]
    assert _flat_state(after) == _flat_state(state)


def _flat_state(rules: dict[str, Any]) -> list[tuple[str, list[float]]]:
    out = []
    for name, rule in rules.items():
        for row, values in rule["rows"].items():
            for key, t in values.items():
                out.append((f"{name}/{row}/{key}", t.flatten().tolist()))
    return sorted(out)


def test_nonfinite_skip_on_a_fused_optimizer_reads_nothing_on_the_host() -> None:
    model = fused_net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    normalizer = gradclip.GradientNormalizer(
        model, gradclip.ZClip(warmup_steps=1), nonfinite="skip"
    )
    handle = normalizer.attach(opt)
    for k in range(2):
        opt.zero_grad()
        backward_at(model, k, None)
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = _flat_state(normalizer.state_dict()["rules"])
    opt.zero_grad()
    backward_at(model, 3, None)
    first = next(model.parameters())
    assert first.grad is not None
    first.grad[1, 1] = math.nan
    with HostReadCounter() as reads, OpCounter() as ops:
        opt.step()
    assert sum(reads.calls.values()) == 0
    assert ops.syncs == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert _flat_state(normalizer.state_dict()["rules"]) == state
    assert handle.skipped_steps == 1
    opt.zero_grad()
    backward_at(model, 4, None)
    opt.step()  # a finite step goes through
    assert handle.skipped_steps == 1
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_fused_sgd_with_momentum_survives_a_skipped_first_step() -> None:
    # torch's fused SGD leaves the momentum buffers uninitialized when its first
    # step is skipped through found_inf; here they start as zeros
    model, ref = fused_net(), fused_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, fused=True)
    gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05), nonfinite="skip").attach(opt)
    gradclip.GradientNormalizer(ref, gradclip.ClipGlobalNorm(0.05)).attach(opt_ref)
    for p in model.parameters():
        p.grad = torch.full_like(p, math.inf)
    opt.step()  # skipped
    for k in range(2):
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            backward_at(m, k, None)
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.isfinite(p).all()
        assert _within_ulps(p.detach(), q.detach())


def test_fused_sgd_with_dampening_keeps_the_old_path() -> None:
    model = fused_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5, fused=True)
    assert gradclip.fused.fusable(opt) is not None
    handle = gradclip.GradientNormalizer(model, "ClipL2PerLayer").attach(opt)
    assert not isinstance(handle, gradclip.fused.FusedHandle)


def test_attributes_are_removed_when_the_step_raises_and_the_error_does_not_stick() -> None:
    model = fused_net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    # an in-place rule needs unscaled gradients: the step refuses them
    normalizer = gradclip.GradientNormalizer(model, "ClipElementWiseAbsoluteValue", 0.01)
    normalizer.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    backward_at(model, 0, scaler)
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    # the user fixes the loop: unscale_ first, and every later step works
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for k in range(2):
        opt.zero_grad()
        backward_at(model, k, scaler)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    assert all(float(p.grad.abs().max()) <= 0.01 for p in model.parameters())  # type: ignore[union-attr]


def test_an_optimizer_error_removes_what_was_set() -> None:
    model = fused_net()

    class Failing(torch.optim.AdamW):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            raise ValueError("boom")

    opt = Failing(model.parameters(), lr=0.01, fused=True)
    gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05)).attach(opt)
    backward_at(model, 0, None)
    with pytest.raises(ValueError, match="boom"):
        opt.step()
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__


def test_remove_restores_the_plain_step() -> None:
    model = fused_net()
    opt = _sees_scale(model)
    handle = gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05)).attach(opt)
    handle.remove()
    backward_at(model, 0, None)
    opt.step()
    assert opt.seen == [(None, None)]
    assert "step" not in opt.__dict__


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True], ids=["plain", "GradScaler"])
def test_on_cuda_folded_steps_agree_and_skip_without_a_sync(amp: bool) -> None:
    def twin(fold: bool) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = fused_net().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, fused=True)
        normalizer = gradclip.GradientNormalizer(
            model, gradclip.ClipGlobalNorm(0.05), nonfinite="skip"
        )
        return model, opt, normalizer.attach(opt, fold=fold)

    (a, opt_a, handle), (b, opt_b, _) = twin(True), twin(False)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**10) if amp else None for _ in "ab"]
    for k in range(3):
        for model, opt, scaler in ((a, opt_a, scalers[0]), (b, opt_b, scalers[1])):
            opt.zero_grad()
            gen = torch.Generator().manual_seed(k)
            loss = model(torch.randn(16, 6, generator=gen).cuda()).square().mean() * 10
            if scaler is not None:
                loss = scaler.scale(loss)
            loss.backward()
            if k == 2:
                next(model.parameters()).grad[0, 0] = math.nan  # type: ignore[index]
            torch.cuda.set_sync_debug_mode("error" if k else "default")  # planned at k = 0
            try:
                if scaler is None:
                    opt.step()
                else:
                    scaler.step(opt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if scaler is not None:
                scaler.update()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert _within_ulps(p.detach(), q.detach(), ulps=4)
    assert handle.skipped_steps == 1
