"""Lightning callback: DL4J-style per-layer gradient normalization in ``Trainer.fit``.

Where it runs. Lightning calls ``Callback.on_before_optimizer_step`` after the
training step's backward pass and, with ``precision="16-mixed"``, after
``scaler.unscale_(optimizer)`` (``MixedPrecision.optimizer_step`` unscales, then
calls the hooks, then Lightning's own ``gradient_clip_val`` clipping, then
``scaler.step``). So the normalizer always sees unscaled gradients:

* 32-bit and ``"bf16-mixed"`` (no scaler): the normalizer runs in that hook,
  before Lightning's own clipping, with no host-device synchronization.
* ``"16-mixed"`` (a ``GradScaler``): the normalizer runs as a one-shot step
  pre-hook inside ``scaler.step``, i.e. only when the scaler does not skip the
  step for inf/NaN gradients, so adaptive strategies never see a skipped step.
  Lightning's own clipping, if configured, then runs before it.

Per-layer norms (measured before normalization) are logged with
``pl_module.log_dict`` as ``grad_norm/<layer>`` on the steps Lightning logs
(``log_every_n_steps``), read from the device with one transfer per logged step.

Example:
    >>> from gradclip.integrations.lightning import GradientNormalizationCallback
    >>> trainer = lightning.pytorch.Trainer(
    ...     callbacks=[GradientNormalizationCallback("ClipL2PerLayer", threshold=1.0,
    ...                                              overrides={"head": "None"})])
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        from pytorch_lightning import LightningModule, Trainer  # type: ignore[assignment]
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment]
    except ImportError as error:
        raise ImportError(
            "gradclip.integrations.lightning needs Lightning: pip install 'gradclip[lightning]'"
        ) from error

from gradclip.integrations._common import CallbackSettings, norms_for_logging
from gradclip.normalizer import Mode

__all__ = ["GradientNormalizationCallback"]


class GradientNormalizationCallback(CallbackSettings, Callback):  # type: ignore[misc]
    """Normalize gradients per layer before every optimizer step of a Lightning ``Trainer``.

    The normalizer is a `GradientNormalizer` over the
    ``LightningModule`` itself, so layer names and override keys are the
    module's attribute paths (``"encoder.0"``, ``"head"``).

    Args:
        mode: the default mode: a `GradientNormalization`, a
            DL4J name such as ``"ClipL2PerLayer"``, ``None``, or a strategy.
        threshold: the default threshold, a finite number > 0.
        overrides: per-layer overrides, as for `GradientNormalizer`.
        log_norms: log each layer's gradient norm (before normalization) as
            ``grad_norm/<layer>`` through ``pl_module.log_dict``.
        log_prefix: the prefix of the logged names.

    Attributes:
        normalizer: the `GradientNormalizer`, built when fitting starts.
        last_report: the `NormReport` of the latest step that ran.

    Example:
        >>> callback = GradientNormalizationCallback("ClipL2PerLayer", threshold=0.5)
        >>> Trainer(precision="16-mixed", callbacks=[callback]).fit(model, data)

    Note:
        Using Lightning's ``gradient_clip_val`` as well clips twice; a warning says so.
    """

    def __init__(
        self,
        mode: Mode,
        threshold: float = 1.0,
        overrides: Mapping[str, Any] | None = None,
        log_norms: bool = True,
        *,
        log_prefix: str = "grad_norm/",
    ) -> None:
        super().__init__()
        self._init_settings(mode, threshold, overrides, log_norms, log_prefix)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._make_normalizer(pl_module)
        clip = getattr(trainer, "gradient_clip_val", None)
        if clip:
            warnings.warn(
                f"Trainer(gradient_clip_val={clip}) clips gradients as well as gradclip's "
                "GradientNormalizationCallback; Lightning's clip runs after gradclip's "
                "(before it with precision='16-mixed'). Set gradient_clip_val=None to let "
                "gradclip alone normalize.",
                UserWarning,
                stacklevel=2,
            )

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._applier is None:
            raise RuntimeError("GradientNormalizationCallback was not set up for fitting")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._applier.step(optimizer, scaler)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._applier is None:
            return
        report = self._applier.take_report()
        if report is None or not self.log_norms or not _should_log(trainer):
            return
        norms = norms_for_logging(report, self.log_prefix)
        if norms:
            pl_module.log_dict(norms, on_step=True, on_epoch=False, batch_size=1)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._applier is not None:
            self._applier.cancel()


def _should_log(trainer: Trainer) -> bool:
    connector = getattr(trainer, "_logger_connector", None)
    should = getattr(connector, "should_update_logs", None)
    return True if should is None else bool(should)
