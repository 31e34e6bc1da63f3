"""Several normalizers attached to one optimizer run in the order they were attached.

A per-layer clip and a global one do not commute, so the order shows in the
parameters. Each loop is compared with the same step by hand: every
normalizer's ``apply()`` in attach order, then the optimizer's own step (for a
fused optimizer the folded coefficient is divided where ``apply()`` multiplies:
within one unit in the last place of the step for SGD).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import backward_at, fused_net
from test_fused import _within_ulps

import gradclip

RULES: list[Callable[[], Any]] = [
    lambda: gradclip.ClipL2PerLayer(0.05),
    lambda: gradclip.ClipGlobalNorm(0.03),
    lambda: gradclip.ClipL2PerLayer(0.02),
]


class _Loop:
    def __init__(self, fused: bool, amp: bool, nonfinite: str = "propagate") -> None:
        self.model = fused_net()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, fused=fused, foreach=False)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp else None
        self.normalizers = [
            gradclip.GradientNormalizer(self.model, rule(), nonfinite=nonfinite) for rule in RULES
        ]

    def step(self, k: int, by_hand: list[int] | None = None) -> None:
        self.opt.zero_grad()
        backward_at(self.model, k, self.scaler)
        if by_hand is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            for i in by_hand:
                self.normalizers[i].apply()
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)
            self.scaler.update()


def _agree(ours: _Loop, ref: _Loop, before: list[torch.Tensor]) -> None:
    pairs = zip(ours.model.parameters(), ref.model.parameters(), before, strict=True)
    assert all(_within_ulps(p.detach(), q.detach(), b) for p, q, b in pairs)
    with torch.no_grad():
        for p, q in zip(ref.model.parameters(), ours.model.parameters(), strict=True):
            p.copy_(q)  # the next step from the same parameters


@pytest.mark.parametrize(
    ("fused", "how"),
    [
        (True, "plain"),
        (True, "GradScaler"),
        (True, "scaler="),
        (False, "plain"),
        (False, "nonfinite=skip"),
    ],
)
def test_normalizers_run_in_attach_order_and_leave_it_in_any_order(fused: bool, how: str) -> None:
    nonfinite = "skip" if how == "nonfinite=skip" else "propagate"
    amp = how in ("GradScaler", "scaler=")
    ours, ref = _Loop(fused, amp, nonfinite), _Loop(fused, amp, nonfinite)
    scaler = ours.scaler if how == "scaler=" else None
    handles = [n.attach(ours.opt, scaler=scaler) for n in ours.normalizers]
    # all three; the middle one removed; the first removed; the last removed
    for k, order in enumerate([[0, 1, 2], [0, 2], [2], []]):
        before = [p.detach().clone() for p in ours.model.parameters()]
        ours.step(k)
        ref.step(k, by_hand=order)
        _agree(ours, ref, before)
        if k < 3:
            handles[[1, 0, 2][k]].remove()
    assert "step" not in vars(ours.opt)
    if ours.scaler is not None:
        assert "step" not in vars(ours.scaler)
    # attached again after the others: last
    handles = [ours.normalizers[i].attach(ours.opt, scaler=scaler) for i in (1, 0)]
    before = [p.detach().clone() for p in ours.model.parameters()]
    ours.step(9)
    ref.step(9, by_hand=[1, 0])
    _agree(ours, ref, before)


def test_a_wrapper_on_top_of_the_attached_ones_keeps_them_in_order() -> None:
    # something wraps the step after attach (as accelerate does): a later attach
    # goes on top of it, and the first one, removed, stays as a pass-through
    ours, ref = _Loop(True, False), _Loop(True, False)
    first = ours.normalizers[0].attach(ours.opt)
    inner = ours.opt.step
    ours.opt.step = lambda *args, **kwargs: inner(*args, **kwargs)  # type: ignore[method-assign]
    second = ours.normalizers[1].attach(ours.opt)
    ours.normalizers[2].attach(ours.opt)
    first.remove()
    second.remove()
    for k in range(2):
        before = [p.detach().clone() for p in ours.model.parameters()]
        ours.step(k)
        ref.step(k, by_hand=[2])
        _agree(ours, ref, before)


def test_attached_optimizers_and_scalers_are_freed_with_their_normalizers() -> None:
    # the record of wrappers per owner (for the order) must not keep owners alive
    refs = []
    for fused, nonfinite in ((True, "propagate"), (False, "skip")):
        model = fused_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused)
        scaler = torch.amp.GradScaler("cpu")
        normalizers = [gradclip.GradientNormalizer(model, r(), nonfinite=nonfinite) for r in RULES]
        for n in normalizers:
            n.attach(opt, scaler=scaler)
        refs += [weakref.ref(opt), weakref.ref(scaler)]
        del model, opt, scaler, normalizers, n
    gc.collect()
    assert all(r() is None for r in refs)
