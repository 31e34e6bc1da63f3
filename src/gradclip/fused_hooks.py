"""How `GradientNormalizer.attach` and the trainer callbacks run a normalizer for a fused optimizer.

`fused_hook` is what ``attach`` uses (`gradclip.fused.attach_fused` where the
optimizer is fused); `fused_once` and `ScalerCheckOnce` serve the trainer
callbacks, which normalize one step at a time. Each runs the normalizer as
``apply_at`` does: under its lock, counted and recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from gradclip.core.engine import Engine
from gradclip.core.report import NormReport
from gradclip.fused import (
    FusedStep,
    attach_fused,
    fusable,
    kernel_scale,
    momentum_if_skipping,
    skip_flag,
)
from gradclip.fused_scaler import attach_scaler, check_scaler
from gradclip.hooks import AttachHandle

__all__ = ["ScalerCheckOnce", "fused_hook", "fused_once"]


class _Normalizer(Protocol):
    """What `fused_hook` uses of a `GradientNormalizer`."""

    _engine: Engine
    _lock: Any
    last_report: NormReport | None
    nonfinite: str

    def _refresh(self, force: bool = False) -> bool: ...

    def _keep(self, report: NormReport, step: int | None) -> None: ...

    def _failed(self, error: BaseException, step: int | None) -> None: ...


def _run_locked(
    normalizer: _Normalizer,
    fused_step: FusedStep,
    scale: torch.Tensor | None,
    found: torch.Tensor | None,
    find_inf: bool,
    step: int | None,
) -> Engine | None:
    """One fused step of ``normalizer`` (as `GradientNormalizer.apply_at`: locked,
    counted, recorded); the engine that ran it, ``None`` where ``find_inf`` cannot be."""
    with normalizer._lock:
        try:
            normalizer._refresh()
            engine = normalizer._engine
            if find_inf and not fused_step.checks_all(engine):
                return None
            report = fused_step(engine, scale, found, find_inf)
            if report.tensor_norms.numel() == 0 and normalizer._refresh(force=True):
                engine = normalizer._engine
                report = fused_step(engine, scale, found, find_inf)
        except Exception as error:
            normalizer._failed(error, step)
            raise
        normalizer.last_report = report
        normalizer._keep(report, step)
        return engine


def fused_once(
    normalizer: _Normalizer, optimizer: torch.optim.Optimizer, step: int | None
) -> NormReport:
    """Normalize for a fused optimizer's step from inside it (a step pre-hook).

    For the trainer callbacks, whose ``GradScaler`` calls the step: reads the
    ``grad_scale`` (gradients still scaled) and ``found_inf`` the scaler set,
    runs the normalizer on the true norms, folding a uniform coefficient, and
    sets both for the kernel; the scaler removes them after the step.
    """
    scale = optimizer.__dict__.get("grad_scale")
    found = optimizer.__dict__.get("found_inf")
    fused_step = FusedStep(optimizer, True, skip_on_device=normalizer.nonfinite == "skip")
    engine = _run_locked(normalizer, fused_step, scale, found, False, step)
    assert engine is not None and normalizer.last_report is not None
    # None: unscaled already (the scaler deletes the attribute after the step)
    optimizer.grad_scale = kernel_scale(engine.divisor)  # type: ignore[attr-defined]
    if engine.bad_step is not None:
        optimizer.found_inf = skip_flag(found, engine.bad_step)  # type: ignore[attr-defined]
    momentum_if_skipping(optimizer)
    return normalizer.last_report


class ScalerCheckOnce:
    """For the trainer callbacks: the coming ``scaler.step(optimizer)`` of a fused
    optimizer leaves its inf/NaN check to the normalizer, once (`gradclip.fused_scaler`).

    Installed before the trainer steps; `taken` is set when the scaler's step
    ran the normalizer, and the optimizer's step pre-hook then only calls
    `before_step`. `remove` takes it away (it also goes after the step it took).

    Args:
        normalizer: what runs.
        optimizer: the fused optimizer.
        scaler: the trainer's ``GradScaler``.
        step: the trainer's step, for a recording.
        on_report: called with the step's report when it ran.
    """

    def __init__(
        self,
        normalizer: _Normalizer,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        step: int | None,
        on_report: Callable[[NormReport], None],
    ) -> None:
        self.taken = False
        fused_step = FusedStep(optimizer, True, skip_on_device=normalizer.nonfinite == "skip")

        def prepare(scale: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor] | None:
            engine = _run_locked(normalizer, fused_step, scale, None, True, step)
            if engine is None:
                return None
            found = skip_flag(engine.found_inf, engine.bad_step)
            assert found is not None and normalizer.last_report is not None
            on_report(normalizer.last_report)
            self.taken = True
            return kernel_scale(engine.divisor), found

        self._off = attach_scaler(scaler, optimizer, prepare, self.remove)

    def remove(self) -> None:
        """Give the scaler its own step back (again: nothing)."""
        self._off()

    @staticmethod
    def before_step(optimizer: torch.optim.Optimizer) -> None:
        """In the step the scaler prepared: what a step skipped through ``found_inf`` needs."""
        momentum_if_skipping(optimizer)


def fused_hook(
    normalizer: _Normalizer, fold: bool, scaler: torch.amp.GradScaler | None = None
) -> Callable[[torch.optim.Optimizer, Callable[[], None]], AttachHandle | None]:
    """How `GradientNormalizer.attach` hooks an optimizer (`gradclip.fused.attach_fused`).

    Returns a function of the optimizer and the handle's ``forget``, which gives
    ``None`` for an optimizer that is not fused (it is then hooked as before,
    and ``scaler.step`` unscales before its step).

    Raises:
        TypeError: ``scaler`` is not a ``torch.amp.GradScaler``.
    """
    if scaler is not None:
        check_scaler(scaler)

    def hook(optimizer: torch.optim.Optimizer, forget: Callable[[], None]) -> AttachHandle | None:
        if fusable(optimizer) is not None:
            return None
        fused_step = FusedStep(optimizer, fold, skip_on_device=normalizer.nonfinite == "skip")

        def run(
            scale: torch.Tensor | None, found: torch.Tensor | None, find_inf: bool
        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None:
            engine = _run_locked(normalizer, fused_step, scale, found, find_inf, None)
            return None if engine is None else (engine.divisor, engine.bad_step, engine.found_inf)

        return attach_fused(optimizer, run, forget, scaler)

    return hook
