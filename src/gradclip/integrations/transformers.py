"""Hugging Face ``Trainer`` callback: DL4J-style per-layer gradient normalization.

Where it runs. ``Trainer`` calls ``TrainerCallback.on_pre_optimizer_step`` once
per optimizer step, after the backward passes of all accumulation steps, after
its own gradient clipping (``TrainingArguments.max_grad_norm``, which also
unscales fp16 gradients) and right before ``optimizer.step()``:

* without a gradient scaler (fp32, ``bf16=True``) the normalizer runs in that
  hook, with no host-device synchronization;
* with fp16 and accelerate's ``GradScaler``, it runs as a one-shot step
  pre-hook on the wrapped optimizer, inside ``scaler.step``: after unscaling,
  and only when the scaler does not skip the step for inf/NaN gradients.

``max_grad_norm``. ``TrainingArguments.max_grad_norm`` defaults to ``1.0``: the
Trainer then clips the *global* norm of all gradients to 1.0 first, and gradclip
normalizes the already-clipped gradients per layer — two clips. A warning says
so when training starts; pass ``max_grad_norm=0`` to let gradclip alone
normalize (the Trainer still logs ``grad_norm``, the global norm measured before
gradclip ran).

Logging. Per-layer norms (before normalization) are read once per logging step
(``logging_steps``) and added to the ``logs`` of ``on_log`` as
``grad_norm/<layer>``: they land in ``trainer.state.log_history`` and reach the
reporting callbacks that come after this one. The ``report_to`` reporters are
created before user callbacks; to send the norms to TensorBoard, pass
``report_to="none"`` and list the reporter after this callback, e.g.
``callbacks=[GradientNormalizationCallback(...), TensorBoardCallback()]``.

Example:
    >>> from gradclip.integrations.transformers import GradientNormalizationCallback
    >>> args = TrainingArguments("out", max_grad_norm=0)
    >>> trainer = Trainer(model, args, train_dataset=data,
    ...                   callbacks=[GradientNormalizationCallback("ClipL2PerLayer", 1.0)])
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as error:  # pragma: no cover
    raise ImportError(
        "gradclip.integrations.transformers needs transformers: "
        "pip install 'gradclip[transformers]'"
    ) from error

from gradclip.core.layers import unwrap_module
from gradclip.integrations._common import CallbackSettings, StepApplier, norms_for_logging
from gradclip.normalizer import Mode
from gradclip.rules.dl4j import NoNormalization

__all__ = ["GradientNormalizationCallback"]


class GradientNormalizationCallback(CallbackSettings, TrainerCallback):  # type: ignore[misc]
    """Normalize gradients per layer before every optimizer step of a ``transformers.Trainer``.

    The normalizer is a `GradientNormalizer` over the Trainer's
    model (unwrapped from DDP), built when training starts; layer names and
    override keys are the model's module names (``"transformer.h.0.attn.c_attn"``,
    globs such as ``"transformer.h.*.mlp.*"``).

    Args:
        mode: the default mode: a `GradientNormalization`, a
            DL4J name such as ``"ClipL2PerLayer"``, ``None``, or a strategy.
        threshold: the default threshold, a finite number > 0.
        overrides: per-layer overrides, as for `GradientNormalizer`.
        log_norms: add each layer's gradient norm to the Trainer's logs.
        log_prefix: the prefix of the logged names.

    Attributes:
        normalizer: the `GradientNormalizer` (``None`` before training).

    Example:
        >>> callback = GradientNormalizationCallback(
        ...     "ClipL2PerLayer", 1.0, overrides={"lm_head": "None"})
        >>> Trainer(model, TrainingArguments("out", max_grad_norm=0), callbacks=[callback])
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
        self._init_settings(mode, threshold, overrides, log_norms, log_prefix)
        self._model: torch.nn.Module | None = None
        self._to_log: dict[str, float] | None = None

    def _ensure(self, model: torch.nn.Module | None) -> StepApplier:
        if model is None:
            raise RuntimeError("the Trainer passed no model to GradientNormalizationCallback")
        model = unwrap_module(model)
        if self._applier is None or self._model is not model:
            self._model = model
            return self._make_normalizer(model)
        return self._applier

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._ensure(model)
        normalizer = self.normalizer
        assert normalizer is not None
        clips = any(not isinstance(s, NoNormalization) for s in normalizer.strategies.values())
        if args.max_grad_norm and args.max_grad_norm > 0 and clips:
            warnings.warn(
                f"TrainingArguments.max_grad_norm={args.max_grad_norm} makes the Trainer clip the "
                "global gradient norm before gradclip normalizes each layer, so gradients are "
                "clipped twice. Pass max_grad_norm=0 to let gradclip alone normalize.",
                UserWarning,
                stacklevel=2,
            )

    def on_pre_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        applier = self._ensure(model)
        applier.step(optimizer, getattr(optimizer, "scaler", None))

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._applier is None:
            return
        report = self._applier.take_report()
        # DefaultFlowCallback (always first) has set should_log for this step already.
        if report is not None and self.log_norms and control.should_log:
            self._to_log = norms_for_logging(report, self.log_prefix)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._to_log is None or logs is None or "loss" not in logs:
            return
        logs.update(self._to_log)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._to_log)
        self._to_log = None

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._applier is not None:
            self._applier.cancel()
