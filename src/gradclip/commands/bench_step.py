"""The ``train_step`` scenario of ``python -m gradclip bench``: clipping and a fused AdamW step.

GPT-2-small shaped gradients, ``torch.optim.AdamW(fused=True)``, global L2
clipping at 1.0, timed as whole optimizer steps:

* ``torch clip_grad_norm_ + step`` (the reference) against gradclip attached
  with the coefficient folded into the optimizer's ``grad_scale`` and with
  ``fold=False`` (a multiply pass, then the step);
* the AMP recipe ``scaler.unscale_`` + ``clip_grad_norm_`` + ``scaler.step``
  against gradclip attached with ``scaler=`` and ``scaler.step`` alone (no
  ``unscale_``, and no pass of the scaler's own over the gradients).

The scaler's scale is 1 and never grows, so that repeated steps keep the
gradients' values (an unscale by 2^16 per repetition would drive them to
denormals); the passes over memory are those of any scale. Parameters and
gradients are shared by the methods; each method has its own optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import gradclip
from gradclip.commands.bench_floor import READ, READ_WRITE, floor_methods, floor_ms
from gradclip.commands.bench_rows import Row
from gradclip.commands.bench_timing import count_launches, time_methods

__all__ = ["AMP_RECIPE", "CLIP_STEP", "step_methods", "train_step_rows"]

Method = Callable[[], object]
CLIP_STEP = "torch clip_grad_norm_ + step"
AMP_RECIPE = "torch AMP: unscale_ + clip_grad_norm_ + scaler.step"


def _scaler(device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)


def step_methods(
    model: nn.Module, device: torch.device
) -> tuple[dict[str, Method], dict[str, tuple[str, float | None]]]:
    """The timed methods, and for each but the reference what it is compared to and its target."""
    params = [p for p in model.parameters() if p.grad is not None]

    def adamw() -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)

    plain, folded, unfolded = adamw(), adamw(), adamw()
    torch_scaler, gradclip_scaler = _scaler(device), _scaler(device)
    clip = gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(1.0))
    clip.attach(folded, scaler=gradclip_scaler)  # scaler.step leaves its check to gradclip
    gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(1.0)).attach(unfolded, fold=False)
    # GradScaler creates its scale at its first scale(): once, before timing
    for scaler in (torch_scaler, gradclip_scaler):
        scaler.scale(torch.ones((), device=device))

    def clip_step() -> None:
        nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        plain.step()

    def amp_recipe() -> None:
        torch_scaler.unscale_(plain)
        nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        torch_scaler.step(plain)
        torch_scaler.update()

    def amp_gradclip() -> None:
        gradclip_scaler.step(folded)
        gradclip_scaler.update()

    methods: dict[str, Method] = {
        CLIP_STEP: clip_step,
        "gradclip folded + step": folded.step,
        "gradclip unfolded + step": unfolded.step,
        AMP_RECIPE: amp_recipe,
        "gradclip AMP: scaler.step (folded, no unscale_)": amp_gradclip,
    }
    targets: dict[str, tuple[str, float | None]] = {
        "gradclip folded + step": (CLIP_STEP, 0.85),
        "gradclip unfolded + step": (CLIP_STEP, None),
        AMP_RECIPE: (CLIP_STEP, None),
        "gradclip AMP: scaler.step (folded, no unscale_)": (AMP_RECIPE, 0.75),
    }
    return methods, targets


def train_step_rows(model: nn.Module, device: torch.device, reps: int) -> list[Row]:
    """Time `step_methods` and the hardware floor of the gradients, interleaved."""
    methods, targets = step_methods(model, device)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    timed = {**methods, **floor_methods(grads, device)}
    timings = time_methods(timed, device, reps)
    floor = floor_ms(timings, (READ, READ_WRITE))
    rows = []
    for name, timing in timings.items():
        reference, target = targets.get(name, (CLIP_STEP, None))
        ratio = None if name == reference else timing.wall_ms / timings[reference].wall_ms
        rows.append(
            Row(
                "train_step",
                name,
                timing.wall_ms,
                ratio,
                reference,
                target,
                None,
                timing.host_ms,
                timing.gpu_ms,
                count_launches(timed[name], device),
                timing.wall_ms / floor,
            )
        )
    return rows
