"""Accelerate: attach to its optimizer wrapper; every step normalized, resumes carry the state.

On the CPU; the fp16 path (a ``GradScaler`` inside ``AcceleratedOptimizer``,
which swaps ``optimizer.step`` during every step and puts back the one it saw
when it was built) is simulated with ``torch.amp.GradScaler("cpu")``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradclip
from gradclip.integrations._common import inner_optimizer

accelerate = pytest.importorskip("accelerate")
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402

THRESHOLD = 0.1


def _model() -> nn.Sequential:
    torch.manual_seed(40)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen), 50 * torch.randn(8, 1, generator=gen)


def _update_norms(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, the norm of this step's parameter change (SGD, lr=1: the gradient used)."""
    out: dict[str, float] = {}
    for name, module in model.named_children():
        params = list(module.named_parameters())
        if params:
            deltas = [(p.detach() - before[f"{name}.{k}"]).flatten() for k, p in params]
            out[name] = float(torch.cat(deltas).norm())
    return out


def _train(
    model: nn.Module, optimizer: Any, steps: int, backward: Any = None
) -> list[dict[str, float]]:
    norms = []
    for step in range(steps):
        x, y = _batch(step)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        (backward or (lambda t: t.backward()))(loss)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        optimizer.step()
        norms.append(_update_norms(model, before))
    return norms


def _assert_clipped(norms: list[dict[str, float]]) -> None:
    # the targets are large: every layer's gradient is clipped to exactly THRESHOLD
    for step, layers in enumerate(norms):
        for layer, norm in layers.items():
            assert abs(norm - THRESHOLD) <= 1e-5 * THRESHOLD, (step, layer, norm)


@pytest.fixture
def accelerator() -> Any:
    return accelerate.Accelerator(cpu=True)


def test_attach_accepts_an_accelerated_optimizer(accelerator: Any) -> None:
    model = _model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    assert isinstance(optimizer, AcceleratedOptimizer)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", THRESHOLD)
    handle = normalizer.attach(optimizer)
    _assert_clipped(_train(model, optimizer, 3, accelerator.backward))
    with pytest.raises(RuntimeError, match="already attached"):
        normalizer.attach(optimizer.optimizer)  # the same optimizer, unwrapped
    handle.remove()
    unclipped = _train(model, optimizer, 1, accelerator.backward)
    assert max(unclipped[0].values()) > THRESHOLD


def test_a_wrapper_without_the_optimizer_inside_is_refused() -> None:
    class Hollow(torch.optim.Optimizer):  # a subclass that never ran Optimizer.__init__
        def __init__(self) -> None:
            pass

    normalizer = gradclip.GradientNormalizer(_model(), "ClipL2PerLayer")
    with pytest.raises(TypeError, match=r"or a wrapper keeping one in \.optimizer, got Hollow"):
        normalizer.attach(Hollow())


def test_integrations_see_the_optimizer_inside(accelerator: Any) -> None:
    sgd = torch.optim.SGD(_model().parameters(), lr=1.0)
    wrapped = accelerator.prepare(sgd)
    assert inner_optimizer(wrapped) is sgd
    assert inner_optimizer(object()) is None


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
@pytest.mark.parametrize("attach_to", ["inner-first", "inner-after", "wrapper", "scaler="])
def test_fp16_scaler_path_normalizes_every_step(
    accelerator: Any, nonfinite: str, attach_to: str, fused: bool
) -> None:
    """The scaler's step swaps ``optimizer.step``: gradclip still runs in every step
    (a fused optimizer's wrapped step too, and with ``scaler=`` inside ``scaler.step``)."""
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=1.0, fused=fused)
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", THRESHOLD, nonfinite=nonfinite
    )
    if attach_to == "inner-first":
        normalizer.attach(sgd)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = AcceleratedOptimizer(sgd, device_placement=False, scaler=scaler)
    if attach_to == "scaler=":
        normalizer.attach(sgd, scaler=scaler)
    elif attach_to != "inner-first":
        normalizer.attach(optimizer if attach_to == "wrapper" else sgd)

    def backward(loss: torch.Tensor) -> None:
        scaler.scale(loss).backward()

    _assert_clipped(_train(model, optimizer, 4, backward))


def _poison(model: nn.Module) -> None:
    with torch.no_grad():
        model[2].weight.grad[0, 0] = float("nan")


def test_skip_still_skips_when_step_is_replaced_after_attach() -> None:
    """Something replaces ``optimizer.step`` after attach: the step is still normalized,
    and skipped (no update, no optimizer state) when a gradient is not finite."""
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=1.0)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", THRESHOLD, nonfinite="skip")
    handle = normalizer.attach(adam)
    adam.step = functools.partial(torch.optim.Adam.step, adam)  # type: ignore[method-assign]
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    _poison(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = [p.grad for p in model.parameters()]
    adam.step()
    assert handle.skipped_steps == 1
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert adam.state == {} or all(not s for s in adam.state.values())
    assert all(p.grad is g for p, g in zip(model.parameters(), grads)), "gradients given back"
    assert normalizer.last_report is not None
    assert normalizer.last_report.nonfinite_layers() == ["2"]
    # a finite step goes ahead, normalized
    sgd_like = torch.optim.SGD(model.parameters(), lr=1.0)
    normalizer.attach(sgd_like)
    sgd_like.step = functools.partial(torch.optim.SGD.step, sgd_like)  # type: ignore[method-assign]
    norms = _train(model, sgd_like, 2)
    _assert_clipped(norms)


def test_accumulate_normalizes_only_real_steps(tmp_path: Path) -> None:
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = _model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", THRESHOLD)
    calls = []
    apply = normalizer.apply
    normalizer.apply = lambda: calls.append(1) or apply()  # type: ignore[method-assign,func-returns-value]
    normalizer.attach(optimizer)
    for step in range(6):
        with accelerator.accumulate(model):
            x, y = _batch(step)
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    assert len(calls) == 3, calls


def test_save_state_and_load_state_carry_the_normalizer(tmp_path: Path) -> None:
    accelerator = accelerate.Accelerator(cpu=True)
    model = _model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(warmup_steps=2))
    normalizer.attach(optimizer)
    accelerator.register_for_checkpointing(normalizer)
    _train(model, optimizer, 3, accelerator.backward)
    saved = normalizer.state_dict()
    accelerator.save_state(str(tmp_path / "ckpt"))
    _train(model, optimizer, 2, accelerator.backward)
    assert _flat(normalizer.state_dict()) != _flat(saved)  # the state moved on
    accelerator.load_state(str(tmp_path / "ckpt"))
    restored = normalizer.state_dict()
    assert _flat(restored) == _flat(saved)


def _flat(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _flat(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_flat(v) for v in state]
    if isinstance(state, torch.Tensor):
        return state.tolist()
    return state
