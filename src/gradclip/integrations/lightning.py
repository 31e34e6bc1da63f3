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

Several optimizers. Each optimizer of the module (``trainer.optimizers``) has a
normalizer of its own over that optimizer's parameters, with its own rule
state: a GAN's generator step normalizes the generator's gradients only, under
manual optimization too, with or without ``toggle_optimizer``.

Checkpoints. The rules' state is the callback's state (``state_dict``), saved
in Lightning's checkpoints and restored by ``trainer.fit(..., ckpt_path=...)``;
a second ``fit()`` on the same trainer continues it.

Per-layer norms (measured before normalization) are logged with
``pl_module.log_dict`` as ``grad_norm/<layer>`` on the steps Lightning logs
(``log_every_n_steps``), read from the device with one transfer per optimizer that
stepped, on logged steps only.

Examples:
    >>> import lightning
    >>> from gradclip.integrations.lightning import GradientNormalizationCallback
    >>> callback = GradientNormalizationCallback(
    ...     "ClipL2PerLayer", threshold=1.0, overrides={"head": "None"})
    >>> trainer = lightning.pytorch.Trainer(
    ...     callbacks=[callback], logger=False, enable_progress_bar=False,
    ...     enable_model_summary=False, enable_checkpointing=False)

    The page "Integrations" of the documentation trains with it, resumes from
    its checkpoints, and logs the norms.
"""

from __future__ import annotations

import os
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

from gradclip.core.agreement import ddp_group, replica_group
from gradclip.integrations._common import CallbackSettings
from gradclip.integrations._optimizers import PerOptimizer
from gradclip.normalizer import GradientNormalizer, Mode

__all__ = ["GradientNormalizationCallback"]


class GradientNormalizationCallback(CallbackSettings, Callback):  # type: ignore[misc]
    """Normalize gradients per layer before every optimizer step of a Lightning ``Trainer``.

    Layer names and override keys are the ``LightningModule``'s attribute paths
    (``"encoder.0"``, ``"head"``), also through ``torch.compile``-d submodules
    (``self.body = torch.compile(net)`` has layers ``"body.0"``, ...). Each
    optimizer gets a `GradientNormalizer` over the layers restricted to its
    parameters, built when fitting starts; an override may name a layer of any
    optimizer, and a key that names no layer of the module raises ``KeyError``
    (naming the closest layer) before the first step.

    Args:
        mode: the default mode: a `GradientNormalization`, a
            DL4J name such as ``"ClipL2PerLayer"``, ``None``, or a strategy.
        threshold: the default threshold, a finite number > 0.
        overrides: per-layer overrides, as for `GradientNormalizer`.
        log_norms: log each layer's gradient norm (before normalization) as
            ``grad_norm/<layer>`` through ``pl_module.log_dict``.
        log_prefix: the prefix of the logged names.
        record: record every step's per-layer norms to this file (see
            `GradientNormalizer`); with several optimizers one file each,
            ``name.opt<i>.ext``, under the trainer's global step; steps a
            ``GradScaler`` skips are recorded too, as non-finite.
        record_every: steps kept on the device between two writes.
        record_tensors: also record every parameter's norm.

    Attributes:
        normalizers: one `GradientNormalizer` per optimizer, in
            ``trainer.optimizers`` order, built when fitting starts.
        normalizer: the normalizer of the only optimizer (``None`` before fitting).
        last_report: the `NormReport` of the latest step that ran.

    Examples:
        >>> callback = GradientNormalizationCallback(gradclip.ZClip(), threshold=1.0)
        >>> callback.state_dict()  # filled in when fitting starts, saved in checkpoints
        {}

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
        record: str | os.PathLike[str] | None = None,
        record_every: int = 100,
        record_tensors: bool = False,
    ) -> None:
        super().__init__()
        recording = {
            "record": record,
            "record_every": record_every,
            "record_tensors": record_tensors,
        }
        self._init_settings(mode, threshold, overrides, log_norms, log_prefix, recording)
        self._optimizers = PerOptimizer(mode, threshold, self._record, self.recording)
        self._state_missing: str | None = None

    # -- what the callback holds -------------------------------------------------------------
    @property
    def normalizers(self) -> list[GradientNormalizer]:
        """One normalizer per optimizer, in ``trainer.optimizers`` order."""
        return [entry.normalizer for entry in self._optimizers.entries]

    @property
    def normalizer(self) -> GradientNormalizer | None:
        """The normalizer of the only optimizer; ``None`` before fitting starts.

        Raises:
            RuntimeError: the module has several optimizers (see `normalizers`).
        """
        normalizers = self.normalizers
        if len(normalizers) > 1:
            raise RuntimeError(
                f"the module has {len(normalizers)} optimizers, each with its own normalizer: "
                "use callback.normalizers[i]"
            )
        return normalizers[0] if normalizers else None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(gradclip=self._settings_key())

    def state_dict(self) -> dict[str, Any]:
        """The rules' state: per optimizer, the normalizer's `state_dict`."""
        return self._optimizers.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore `state_dict` (or a `GradientNormalizer.state_dict`, for one optimizer).

        Before fitting starts it is kept and installed when the normalizers are
        built; so a state can be restored by hand before ``trainer.fit``. A
        state saved with another configuration restores what matches it (see
        `gradclip.core.identity`); the rest starts afresh with a
        `gradclip.StateNotRestoredWarning`, and fitting goes on.

        Raises:
            ValueError: not a gradclip state dict, or another number of optimizers.
        """
        self._optimizers.load_state_dict(state_dict)
        self._state_missing = None

    # -- Lightning's hooks -------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
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

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After configure_model and configure_optimizers: the parameters are final.
        # under a DDP strategy the ranks hold replicas: their configurations are compared
        replicas = ddp_group(getattr(trainer.strategy, "model", None))
        self._optimizers.bind(pl_module, self.overrides, replica_group(replicas))
        self._optimizers.sync(trainer.optimizers)

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get("callbacks") or {}
        if self.state_key in saved:
            return
        others = [k for k in saved if isinstance(k, str) and k.startswith(type(self).__qualname__)]
        if others:
            # saved under another configuration: Lightning hands it to no callback, but
            # the rules whose state identity matches are restored from it, the rest warn
            self.load_state_dict(saved[others[-1]])
            return
        self._state_missing = "it holds no gradclip state"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        missing, self._state_missing = self._state_missing, None
        if missing is not None and self._optimizers.has_state():
            warnings.warn(
                f"resuming from a checkpoint, but {missing}: gradclip's adaptive rules start "
                f"afresh (this callback's state key is {self.state_key!r})",
                UserWarning,
                stacklevel=2,
            )

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._optimizers.applier(optimizer).step(optimizer, scaler, trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._optimizers.finish()
        reports = self._optimizers.reports()
        if not reports or not self.log_norms or not _should_log(trainer):
            return
        shared = self._optimizers.shared_layers() if len(reports) > 1 else set()
        norms: dict[str, float] = {}
        for index, report in reports:
            for layer, value in report.to_dict()["layer_norms"].items():
                if value is None:
                    continue
                suffix = f"/optimizer_{index}" if layer in shared else ""
                norms[f"{self.log_prefix}{layer or 'root'}{suffix}"] = value
        if norms:
            pl_module.log_dict(norms, on_step=True, on_epoch=False, batch_size=1)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._optimizers.cancel()
        self._optimizers.flush()


def _should_log(trainer: Trainer) -> bool:
    connector = getattr(trainer, "_logger_connector", None)
    should = getattr(connector, "should_update_logs", None)
    return True if should is None else bool(should)
