"""What the callbacks share: settings, names, the moment a normalizer runs, logging."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from gradclip.core.identity import StateNotRestoredWarning
from gradclip.core.report import NormReport
from gradclip.fused import fusable
from gradclip.fused_hooks import ScalerCheckOnce, fused_once
from gradclip.normalizer import GradientNormalizer, Mode
from gradclip.rules.dl4j import resolve_override, resolve_rule
from gradclip.step_guard import unwrap_optimizer

__all__ = [
    "CallbackSettings",
    "StepApplier",
    "inner_optimizer",
    "norms_for_logging",
    "scaler_is_active",
]


def restore(normalizer: GradientNormalizer, state: Mapping[str, Any], where: str) -> None:
    """Load ``state`` into ``normalizer`` as a resume does: what matches by the state
    identity of `gradclip.core.identity` is restored; the rest starts afresh, with a
    `StateNotRestoredWarning` naming both sides (a resume never aborts for it).

    Raises:
        ValueError: ``state`` is no normalizer state dict (of a readable version).
    """
    left = normalizer.load_state_dict(state, strict=False)
    if left.missing_keys or left.unexpected_keys:
        warnings.warn(
            StateNotRestoredWarning(
                f"{where}: gradclip restored the rules' state that matches this configuration; "
                f"the rest starts afresh ({left.describe()}). To make this an error: "
                "warnings.simplefilter('error', gradclip.StateNotRestoredWarning)"
            ),
            stacklevel=3,
        )


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper, or ``None``.

    Lightning's ``LightningOptimizer`` and accelerate's ``AcceleratedOptimizer``
    both keep the wrapped optimizer in ``.optimizer`` (see
    `gradclip.step_guard.unwrap_optimizer`).
    """
    optimizer = unwrap_optimizer(optimizer)
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def scaler_is_active(scaler: Any) -> bool:
    """Whether ``scaler`` is an enabled ``torch.amp.GradScaler`` (which may skip a step)."""
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(callable(is_enabled) and is_enabled())


class StepApplier:
    """Runs a normalizer for one optimizer step, at the right moment.

    Without a gradient scaler, the callback's hook already sits between the
    unscaled gradients and ``optimizer.step()``, so the normalizer runs at once
    and costs no host-device synchronization.

    With an enabled ``GradScaler`` the scaler decides, inside
    ``scaler.step(optimizer)``, whether the step happens at all (it skips steps
    with inf/NaN gradients, after reading a flag from the device). The
    normalizer is then registered as a one-shot step pre-hook on the wrapped
    optimizer: ``scaler.step`` unscales (if nobody did) and calls
    ``optimizer.step()`` only for a finite step, so a skipped step never runs
    the normalizer and leaves the state of adaptive strategies untouched. A
    fused optimizer's step always runs, the scaler's ``found_inf`` skipping it
    in the kernel: its hook reads the true norms of gradients the scaler may
    have left scaled, folds a uniform coefficient into ``grad_scale`` and
    leaves the state alone on a skipped step (`gradclip.fused_hooks.fused_once`); a
    ``scaler.step`` without ``unscale_`` then leaves its own check for inf/NaN
    to the normalizer (`gradclip.fused_hooks.ScalerCheckOnce`).

    Args:
        normalizer: what to run.
        on_report: called with each step's report (the callback's ``last_report``).
    """

    def __init__(
        self,
        normalizer: GradientNormalizer,
        on_report: Callable[[NormReport], None] | None = None,
    ) -> None:
        self.normalizer = normalizer
        self.pending: NormReport | None = None
        self._on_report = on_report
        self._handle: RemovableHandle | None = None
        self._once: ScalerCheckOnce | None = None
        self._step: int | None = None

    def _run(self) -> None:
        self.pending = report = self.normalizer.apply_at(self._step)
        if self._on_report is not None:
            self._on_report(report)

    def step(self, optimizer: Any, scaler: Any, global_step: int | None = None) -> None:
        """Normalize now, or at ``optimizer``'s next step when ``scaler`` is active.

        ``global_step`` is the trainer's step, under which a recording files it.
        """
        self.cancel()
        self._step = global_step
        inner = inner_optimizer(optimizer)
        if inner is None or not scaler_is_active(scaler):
            self._run()
            return

        def hook(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            once = self._once
            self.cancel()
            if once is not None and once.taken:  # scaler.step ran the normalizer
                once.before_step(opt)
                return
            if fusable(opt) is not None:
                self._run()
                return
            # a fused optimizer: the scaler may have left the gradients scaled (no
            # unscale_), its kernel divides by grad_scale; see gradclip.fused
            self.pending = report = fused_once(self.normalizer, opt, self._step)
            if self._on_report is not None:
                self._on_report(report)

        self._handle = inner.register_step_pre_hook(hook)
        if fusable(inner) is None and isinstance(scaler, torch.amp.GradScaler):
            # a scaler.step without unscale_ then reads no gradient of its own
            self._once = ScalerCheckOnce(self.normalizer, inner, scaler, self._step, self._took)

    def _took(self, report: NormReport) -> None:
        self.pending = report
        if self._on_report is not None:
            self._on_report(report)

    def finish(self) -> None:
        """After the optimizer's step: record a step the scaler skipped (its gradients as
        they are, inf or NaN), without normalizing; nothing when not recording."""
        if self._handle is not None:
            self.cancel()
            self.normalizer.record_only(self._step)

    def cancel(self) -> None:
        """Drop a one-shot hook that a skipped step left behind."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._once is not None:
            self._once.remove()
            self._once = None

    def take_report(self) -> NormReport | None:
        """The report of the last step that ran, once (``None`` if none ran since)."""
        report, self.pending = self.pending, None
        return report


def norms_for_logging(report: NormReport, prefix: str) -> dict[str, float]:
    """``{prefix + layer: norm}`` for the measured layers, read with one transfer."""
    data = report.to_dict()
    out: dict[str, float] = {}
    for name, value in data["layer_norms"].items():
        if value is not None:
            out[f"{prefix}{name or 'root'}"] = value
    return out


class CallbackSettings:
    """The configuration both trainer callbacks take, validated when the callback is made."""

    def _init_settings(
        self,
        mode: Mode,
        threshold: float,
        overrides: Mapping[str, Any] | None,
        log_norms: bool,
        log_prefix: str,
        recording: Mapping[str, Any] | None = None,
    ) -> None:
        #: ``record``, ``record_every``, ``record_tensors``: passed to each normalizer
        self.recording = {k: v for k, v in (recording or {}).items() if k != "record" or v}
        self.mode = mode
        self.threshold = threshold
        self.overrides = dict(overrides or {})
        self.log_norms = log_norms
        self.log_prefix = log_prefix
        self._last_report: NormReport | None = None
        # Validate the mode and threshold now, not when training starts.
        self._default = resolve_rule(mode, threshold)
        GradientNormalizer(torch.nn.Linear(1, 1), mode, threshold)

    def _settings_key(self) -> str:
        """The configuration, as text that names the callback's entry in a checkpoint.

        Spellings of one configuration give one text: ``"ClipL2PerLayer"`` and
        ``("ClipL2PerLayer", 1.0)`` are the same rule.
        """
        overrides = sorted(
            (key, resolve_override(value, self.threshold, key).describe())
            for key, value in self.overrides.items()
        )
        return f"mode={self._default.describe()}, overrides={overrides}"

    def _record(self, report: NormReport) -> None:
        self._last_report = report

    @property
    def last_report(self) -> NormReport | None:
        """The report of the latest step a normalizer ran on."""
        return self._last_report
