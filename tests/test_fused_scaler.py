"""``attach(optimizer, scaler=scaler)``: ``scaler.step`` without the scaler's own pass.

The steps are compared with the same loop attached without ``scaler=`` (where
``GradScaler`` reads every gradient for inf/NaN first): parameters, scales and
the rules' state agree exactly, while the scaler's check never runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import HostReadCounter, OpCounter, backward_at, fused_net
from torch import nn

import gradclip

CHECK = "_amp_foreach_non_finite_check_and_unscale_"
RULES: dict[str, Callable[[], Any]] = {
    "ClipGlobalNorm": lambda: gradclip.ClipGlobalNorm(0.05),
    "chain": lambda: gradclip.chain(gradclip.ClipGlobalNorm(0.2), gradclip.ClipGlobalNorm(0.05)),
    "ClipL2PerLayer": lambda: gradclip.ClipL2PerLayer(0.05),
    "ZClip layer": lambda: gradclip.ZClip(warmup_steps=2, scope="layer"),
    "AutoClip": lambda: gradclip.AutoClip(percentile=50.0),
    # p-norm rules measure no L2 norms: the flag reads those tensors' largest values
    "ClipGlobalNorm p=inf": lambda: gradclip.ClipGlobalNorm(0.05, norm_type=math.inf),
    "ClipGlobalNorm p=3": lambda: gradclip.ClipGlobalNorm(0.05, norm_type=3.0),
}


class _Loop:
    def __init__(
        self,
        rule: Any,
        takeover: bool,
        nonfinite: str = "propagate",
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.model = fused_net()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.01, weight_decay=0.1, fused=True)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        self.normalizer = gradclip.GradientNormalizer(
            self.model, rule, nonfinite=nonfinite, overrides=overrides
        )
        self.handle = self.normalizer.attach(self.opt, scaler=self.scaler if takeover else None)
        self.checks = 0
        check = self.scaler._check_inf_per_device

        def counted(opt: torch.optim.Optimizer) -> Any:
            self.checks += 1
            return check(opt)

        self.scaler._check_inf_per_device = counted  # type: ignore[method-assign]

    def step(self, k: int, poison: float | None = None) -> None:
        self.opt.zero_grad()
        backward_at(self.model, k, self.scaler)
        if poison is not None:
            first = next(self.model.parameters())
            assert first.grad is not None
            first.grad[0, 0] = poison
        self.scaler.step(self.opt)
        self.scaler.update()


@pytest.mark.parametrize("rule_name", [*RULES, "a layer of None"])
def test_the_scaler_step_is_the_same_without_its_check(rule_name: str) -> None:
    # "a layer of None": its gradients are not measured, the flag reads them
    rule = RULES.get(rule_name, RULES["ClipL2PerLayer"])
    overrides = {"0": None} if rule_name == "a layer of None" else None
    ours, theirs = (_Loop(rule(), takeover, overrides=overrides) for takeover in (True, False))
    for k in range(6):
        poison = math.inf if k == 2 else (math.nan if k == 4 else None)
        for loop in (ours, theirs):
            loop.step(k, poison)
        for p, q in zip(ours.model.parameters(), theirs.model.parameters(), strict=True):
            assert torch.equal(p, q), k
        assert float(ours.scaler._scale) == float(theirs.scaler._scale), k
        a, b = ours.normalizer.last_report, theirs.normalizer.last_report
        assert a is not None and b is not None
        torch.testing.assert_close(
            a.layer_norm_vector, b.layer_norm_vector, rtol=0, atol=0, equal_nan=True
        )
    assert ours.checks == 0 and theirs.checks == 6
    assert float(ours.scaler._scale) == 2.0**10 / 4 * 2  # two skips, one growth after 2
    state, other = ours.normalizer.state_dict()["rules"], theirs.normalizer.state_dict()["rules"]
    assert repr(state) == repr(other)
    assert "grad_scale" not in ours.opt.__dict__ and "found_inf" not in ours.opt.__dict__


def test_no_pass_over_the_gradients_but_the_norms_and_the_step() -> None:
    loop = _Loop(gradclip.ClipGlobalNorm(0.05), True)
    loop.step(0)
    loop.opt.zero_grad()
    backward_at(loop.model, 1, loop.scaler)
    with OpCounter() as ops, HostReadCounter() as reads:
        loop.scaler.step(loop.opt)
        loop.scaler.update()
    assert CHECK not in ops.ops and "_foreach_mul_" not in ops.ops
    assert sum(reads.calls.values()) == 0 and ops.syncs == 0


def test_finite_gradients_whose_squares_overflow_lower_the_scale() -> None:
    # float32 elements of 1e20 are finite, their squares are not: the norm is inf,
    # the scaler skips the step and halves its scale, as for an inf
    loop = _Loop(gradclip.ClipGlobalNorm(0.05), True)
    before = [p.detach().clone() for p in loop.model.parameters()]
    loop.step(0, poison=1e20)
    assert float(loop.scaler._scale) == 2.0**9
    assert all(torch.equal(p, q) for p, q in zip(loop.model.parameters(), before, strict=True))


@pytest.mark.parametrize("takeover", [True, False], ids=["scaler=", "without"])
def test_skip_counts_on_the_device_and_the_scaler_sees_it(takeover: bool) -> None:
    # (without scaler=, the scaler's float flag and gradclip's bool one are combined)
    loop = _Loop(gradclip.ZClip(warmup_steps=1), takeover, nonfinite="skip")
    loop.step(0)
    with HostReadCounter() as reads:
        loop.step(1, poison=math.nan)
    assert sum(reads.calls.values()) == 0
    assert loop.handle.skipped_steps == 1 and float(loop.scaler._scale) == 2.0**9


def test_unscale_first_stays_correct() -> None:
    ours, ref = _Loop(RULES["ClipGlobalNorm"](), True), _Loop(RULES["ClipGlobalNorm"](), True)
    for k in range(3):
        ours.opt.zero_grad()
        backward_at(ours.model, k, ours.scaler)
        ours.scaler.unscale_(ours.opt)  # the scaler's own pass; gradclip sees true gradients
        ours.scaler.step(ours.opt)
        ours.scaler.update()
        ref.step(k)
    for p, q in zip(ours.model.parameters(), ref.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=0)


def test_the_scaler_checks_itself_what_gradclip_does_not_read() -> None:
    model = fused_net()
    extra = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([*model.parameters(), extra], lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05)).attach(opt, scaler=scaler)
    backward_at(model, 0, scaler)
    extra.grad = torch.full((3,), math.inf)  # only the scaler's check sees it
    before = [p.detach().clone() for p in model.parameters()]
    with OpCounter() as ops:
        scaler.step(opt)
    scaler.update()
    assert CHECK in ops.ops and float(scaler._scale) == 2.0**9
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    # a frozen parameter that kept a gradient: the same
    model = fused_net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05)).attach(opt, scaler=scaler)
    backward_at(model, 0, scaler)
    model[2].bias.requires_grad_(False)
    with OpCounter() as ops:
        scaler.step(opt)
    assert CHECK in ops.ops


def test_an_in_place_rule_refuses_before_anything_changes_and_unscale_fixes_it() -> None:
    model = fused_net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    normalizer = gradclip.GradientNormalizer(model, "ClipElementWiseAbsoluteValue", 0.01)
    normalizer.attach(opt, scaler=scaler)
    backward_at(model, 0, scaler)
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    scaler.unscale_(opt)  # the scaler's state for this step was left as it was
    scaler.step(opt)
    scaler.update()
    assert all(float(p.grad.abs().max()) <= 0.01 for p in model.parameters())  # type: ignore[union-attr]


def test_remove_gives_the_scaler_its_step_back() -> None:
    loop = _Loop(gradclip.ClipGlobalNorm(0.05), True)
    assert "step" in vars(loop.scaler)
    loop.handle.remove()
    assert "step" not in vars(loop.scaler) and "step" not in vars(loop.opt)
    loop.step(0)
    assert loop.checks == 1


def test_scaler_must_be_a_grad_scaler_and_is_ignored_for_unfused_optimizers() -> None:
    model = fused_net()
    normalizer = gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05))
    fused = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    with pytest.raises(TypeError, match="GradScaler"):
        normalizer.attach(fused, scaler=object())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    normalizer.attach(opt, scaler=scaler)  # scaler.step unscales before a plain step
    assert "step" not in vars(scaler)
    backward_at(model, 0, scaler)
    scaler.step(opt)
    scaler.update()
    report = normalizer.last_report
    assert report is not None and float(report.total_norm()) < 100  # true norms


@pytest.mark.parametrize("rule_name", ["ClipGlobalNorm", "ClipL2PerLayer", "ZClip layer"])
def test_a_callback_step_on_gradients_the_scaler_left_scaled(rule_name: str) -> None:
    # accelerate's fp16 step without clipping: scaler.step(optimizer), no unscale_;
    # the callbacks' hook must read true norms, as after an unscale_
    from gradclip.integrations._common import StepApplier

    loops = []
    checks: list[int] = []
    for unscale in (False, True):
        model = fused_net()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        applier = StepApplier(gradclip.GradientNormalizer(model, RULES[rule_name]()))
        loops.append((model, opt, scaler, applier, unscale))
        if not unscale:
            check = scaler._check_inf_per_device
            scaler._check_inf_per_device = lambda o, c=check: (checks.append(1), c(o))[1]  # type: ignore[method-assign,misc]
    for k in range(5):
        for model, opt, scaler, applier, unscale in loops:
            opt.zero_grad()
            backward_at(model, k, scaler)
            if k == 2:
                next(model.parameters()).grad[0, 0] = math.inf  # type: ignore[index]
            if unscale:
                scaler.unscale_(opt)
            applier.step(opt, scaler)
            scaler.step(opt, None)  # as accelerate calls it, with its closure
            scaler.update()
            applier.finish()
            assert "step" not in vars(scaler)  # the one-step wrapper is gone
        (a, *_), (b, *_) = loops
        assert checks == []  # the scaler's own pass never ran
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    norms = [loop[3].normalizer.last_report.layer_norm_vector for loop in loops]
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-6, atol=0)
    states = [repr(loop[3].normalizer.state_dict()["rules"]) for loop in loops]
    assert states[0] == states[1]


def test_an_attached_fused_optimizer_counts_and_records_its_steps(tmp_path: Any) -> None:
    loop = _Loop(gradclip.ClipGlobalNorm(0.05), True)
    recorded = gradclip.GradientNormalizer(
        fused_net(), gradclip.ClipGlobalNorm(0.05), record=tmp_path / "run.gcr", record_every=1
    )
    model = recorded._module()
    assert model is not None
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    recorded.attach(opt, scaler=loop.scaler)
    for k in range(3):
        loop.step(k)
        opt.zero_grad()
        backward_at(model, k, loop.scaler)
        loop.scaler.step(opt)
        loop.scaler.update()
    assert loop.normalizer.steps == 3 and recorded.steps == 3
    recorded.close()
    assert (tmp_path / "run.gcr").stat().st_size > 0


@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_the_unscale_error_of_a_hooked_fused_optimizer_does_not_stick(nonfinite: str) -> None:
    # fused SGD with dampening is hooked as a non-fused optimizer: scaled gradients
    # are refused, and once the loop calls unscale_ every step works
    model = fused_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.5, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.05, nonfinite=nonfinite)
    normalizer.attach(opt, scaler=scaler)
    backward_at(model, 0, scaler)
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.step(opt)
    assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for k in range(3):
        opt.zero_grad()
        backward_at(model, k, scaler)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        report = normalizer.last_report
        assert report is not None and float(report.total_norm()) < 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_scaler_step_is_the_same_without_its_check_and_without_a_sync() -> None:
    def loop(takeover: bool) -> tuple[nn.Module, torch.optim.Optimizer, torch.amp.GradScaler]:
        model = fused_net().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, fused=True)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
        normalizer = gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(0.05))
        normalizer.attach(opt, scaler=scaler if takeover else None)
        return model, opt, scaler

    ours, theirs = loop(True), loop(False)
    for k in range(4):
        for model, opt, scaler in (ours, theirs):
            opt.zero_grad()
            x = torch.randn(16, 6, generator=torch.Generator().manual_seed(k)).cuda()
            scaler.scale(model(x).square().mean() * 10).backward()
            if k == 2:
                next(model.parameters()).grad[0, 0] = math.inf  # type: ignore[index]
            torch.cuda.set_sync_debug_mode("error" if k and scaler is ours[2] else "default")
            try:
                scaler.step(opt)
                scaler.update()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for p, q in zip(ours[0].parameters(), theirs[0].parameters(), strict=True):
            assert torch.equal(p, q), k
        assert float(ours[2]._scale) == float(theirs[2]._scale)


def test_one_scaler_for_two_attached_optimizers() -> None:
    # a GAN's loop: one scaler steps two optimizers, each with its normalizer
    loops = [_Loop(gradclip.ClipGlobalNorm(0.05), takeover) for takeover in (True, False)]
    ours, theirs = loops
    extra = [fused_net() for _ in loops]
    extra_opts = [torch.optim.AdamW(m.parameters(), lr=0.01, fused=True) for m in extra]
    for m, opt, loop in zip(extra, extra_opts, loops, strict=True):
        normalizer = gradclip.GradientNormalizer(m, "ClipL2PerLayer", 0.05)
        normalizer.attach(opt, scaler=loop.scaler if loop is ours else None)
    for k in range(3):
        for m, opt, loop in zip(extra, extra_opts, loops, strict=True):
            loop.opt.zero_grad()
            opt.zero_grad()
            backward_at(loop.model, k, loop.scaler)
            backward_at(m, k + 10, loop.scaler)
            if k == 1:
                next(m.parameters()).grad[0, 0] = math.nan  # type: ignore[index]
            loop.scaler.step(loop.opt)
            loop.scaler.step(opt)
            loop.scaler.update()
        for a, b in ((ours.model, theirs.model), (extra[0], extra[1])):
            for p, q in zip(a.parameters(), b.parameters(), strict=True):
                assert torch.equal(p, q), k
        assert float(ours.scaler._scale) == float(theirs.scaler._scale)
    assert float(ours.scaler._scale) == 2.0**9  # the NaN of the second optimizer
    assert ours.checks == 0
