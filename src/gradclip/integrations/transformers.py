"""Hugging Face ``Trainer`` callback: DL4J-style per-layer gradient normalization.

Where it runs. ``Trainer`` calls ``TrainerCallback.on_pre_optimizer_step`` once
per optimizer step, after the backward passes of all accumulation steps, after
its own gradient clipping (``TrainingArguments.max_grad_norm``, which also
unscales fp16 gradients) and right before ``optimizer.step()``:

* without a gradient scaler (fp32, ``bf16=True``) the normalizer runs in that
  hook, with no host-device synchronization;
* with fp16 and accelerate's ``GradScaler``, it runs as a one-shot step
  pre-hook on the wrapped optimizer, inside ``scaler.step``: after unscaling,
  and only when the scaler does not skip the step for inf/NaN gradients. A
  fused optimizer (``fused=True``) steps either way, skipping in its kernel;
  the hook then reads the true norms of gradients the scaler may have left
  scaled (``max_grad_norm=0``: no unscale) and leaves the rules' state alone
  on a skipped step (`gradclip.fused_hooks.fused_once`).

``max_grad_norm``. ``TrainingArguments.max_grad_norm`` defaults to ``1.0``: the
Trainer then clips the *global* norm of all gradients to 1.0 first, and gradclip
normalizes the already-clipped gradients per layer — two clips. A warning says
so when training starts; pass ``max_grad_norm=0`` to let gradclip alone
normalize (the Trainer still logs ``grad_norm``, the global norm measured before
gradclip ran).

Checkpoints. Each checkpoint the Trainer saves gets a file ``gradclip_state.pt``
(the rules' state, `STATE_FILE`) next to the optimizer's; ``trainer.train(
resume_from_checkpoint=...)`` reads it back from ``<output_dir>/checkpoint-<step>``
(or ``TrainingArguments.resume_from_checkpoint``). A checkpoint elsewhere:
``callback.load_checkpoint(directory)`` before ``train``.

Logging. Per-layer norms (before normalization) are read once per log of the
training loss (``logging_steps``, or each epoch's end with
``logging_strategy="epoch"``), from the step just taken, and added to the logs
as ``grad_norm/<layer>``: they land in ``trainer.state.log_history`` and in
every reporter of ``report_to`` (TensorBoard's ``train/grad_norm/<layer>``): the
callback places itself before the reporters when the Trainer is made.

Examples:
    >>> from gradclip.integrations.transformers import GradientNormalizationCallback
    >>> callback = GradientNormalizationCallback("ClipL2PerLayer", 1.0)

    passed as ``Trainer(model, TrainingArguments(..., max_grad_norm=0),
    callbacks=[callback])``; the page "Integrations" of the documentation trains
    a model with it and resumes from its checkpoints.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_callback import CallbackHandler
except ImportError as error:  # pragma: no cover
    raise ImportError(
        "gradclip.integrations.transformers needs transformers: "
        "pip install 'gradclip[transformers]'"
    ) from error

from gradclip.core.agreement import ddp_group, replica_group
from gradclip.core.layers import resolve_override_keys, unwrap_module
from gradclip.core.report import NormReport
from gradclip.integrations._common import (
    CallbackSettings,
    StepApplier,
    norms_for_logging,
    restore,
)
from gradclip.integrations._replicas import trainer_ddp_group
from gradclip.integrations._state import pack, unpack
from gradclip.normalizer import GradientNormalizer, Mode
from gradclip.rules.dl4j import NoNormalization

__all__ = ["STATE_FILE", "GradientNormalizationCallback"]

#: the file in each ``checkpoint-*`` directory that holds gradclip's state
STATE_FILE = "gradclip_state.pt"


class GradientNormalizationCallback(CallbackSettings, TrainerCallback):  # type: ignore[misc]
    """Normalize gradients per layer before every optimizer step of a ``transformers.Trainer``.

    The normalizer is a `GradientNormalizer` over the Trainer's model
    (unwrapped from DDP and ``torch.compile``); layer names and override keys
    are the model's module names (``"transformer.h.0.attn.c_attn"``, globs such
    as ``"transformer.h.*.mlp.*"``). A module whose weights are all tied to an
    earlier layer names that layer: GPT-2's ``lm_head`` is ``transformer.wte``.
    Override keys are checked when the ``Trainer`` is made; a key that names
    no layer raises ``KeyError`` naming the closest one.

    Args:
        mode: the default mode: a `GradientNormalization`, a
            DL4J name such as ``"ClipL2PerLayer"``, ``None``, or a strategy.
        threshold: the default threshold, a finite number > 0.
        overrides: per-layer overrides, as for `GradientNormalizer`.
        log_norms: add each layer's gradient norm to the Trainer's logs.
        log_prefix: the prefix of the logged names.
        record: record every step's per-layer norms to this file (see
            `GradientNormalizer`), under ``state.global_step``; steps a
            ``GradScaler`` skips are recorded too, as non-finite.
        record_every: steps kept on the device between two writes.
        record_tensors: also record every parameter's norm.

    Attributes:
        normalizer: the `GradientNormalizer` (``None`` before the Trainer is made).

    Examples:
        >>> callback = GradientNormalizationCallback(
        ...     "ClipL2PerLayer", 1.0, overrides={"head": "None"})
        >>> print(callback.normalizer)  # built for the Trainer's model when training starts
        None
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
        recording = {
            "record": record,
            "record_every": record_every,
            "record_tensors": record_tensors,
        }
        self._init_settings(mode, threshold, overrides, log_norms, log_prefix, recording)
        self.normalizer: GradientNormalizer | None = None
        self._applier: StepApplier | None = None
        self._model: torch.nn.Module | None = None
        self._pending: list[dict[str, Any]] | None = None
        self._latest: NormReport | None = None
        self._placed = False
        self._warned: set[str] = set()

    # -- the normalizer and its state ---------------------------------------------------------
    def _ensure(self, model: torch.nn.Module | None) -> StepApplier:
        if model is None:
            raise RuntimeError("the Trainer passed no model to GradientNormalizationCallback")
        # a DDP-wrapped model: the ranks compare configurations at the first step
        replicas = replica_group(ddp_group(model))
        model = unwrap_module(model)
        if self._applier is None or self._model is not model:
            overrides = resolve_override_keys(model, self.overrides)
            if replicas is None:
                replicas = trainer_ddp_group(model)
            if self.normalizer is not None:
                self.normalizer.close()
            self.normalizer = GradientNormalizer(
                model,
                self.mode,
                self.threshold,
                overrides,
                process_group=replicas,
                **self.recording,
            )
            self._applier = StepApplier(self.normalizer, self._record)
            self._model = model
        return self._applier

    def state_dict(self) -> dict[str, Any]:
        """The rules' state (the normalizer's `state_dict`, in the callbacks' envelope)."""
        if self.normalizer is not None:
            return pack([self.normalizer.state_dict()])
        return pack(self._pending) if self._pending is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore `state_dict` (or a `GradientNormalizer.state_dict`).

        Before training it is kept and installed when training starts, in
        place of the state of the checkpoint resumed from. A state saved with
        another configuration restores what matches it (see
        `gradclip.core.identity`); the rest starts afresh with a
        `gradclip.StateNotRestoredWarning`, and training goes on.

        Raises:
            ValueError: not a gradclip state dict.
        """
        states = unpack(state_dict)
        if len(states) != 1:
            raise ValueError(f"the Trainer has one optimizer; this state has {len(states)}")
        self._pending = states

    def load_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Restore the state saved in a ``checkpoint-*`` directory (`STATE_FILE`).

        For a checkpoint outside ``output_dir``: call before
        ``trainer.train(resume_from_checkpoint=directory)``.
        """
        saved = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
        self.load_state_dict(saved["callback"])

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        """At the start of training: the state given by hand, or the checkpoint's."""
        assert self.normalizer is not None
        states, self._pending = self._pending, None
        if states is None and state.global_step > 0:
            found = self._saved_state(args, state)
            if found is None:
                if self.normalizer.state_dict()["rules"]:
                    warnings.warn(
                        f"training resumes at step {state.global_step}, but no checkpoint of that "
                        f"step next to output_dir has {STATE_FILE}: gradclip's adaptive rules "
                        "start afresh. For a checkpoint elsewhere, call "
                        "callback.load_checkpoint(directory) before trainer.train()",
                        UserWarning,
                        stacklevel=3,
                    )
                return
            states = unpack(found)
        if states is not None:  # what matches is restored; the rest warns and starts afresh
            restore(self.normalizer, states[0], f"resuming at step {state.global_step}")

    def _saved_state(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any] | None:
        for directory in _checkpoint_dirs(args, state, resuming=True):
            path = os.path.join(directory, STATE_FILE)
            if not os.path.isfile(path):
                continue
            saved = torch.load(path, weights_only=True)
            if saved.get("global_step") == state.global_step:
                return dict(saved["callback"])
        return None

    # -- where the callback sits ------------------------------------------------------------
    def _place_before_reporters(self, args: TrainingArguments) -> None:
        """Move this callback before the ``report_to`` reporters, so that they log the norms.

        The Trainer lists its reporters before the user's callbacks and gives a
        callback no handle on that list but the handler's own call frame; if
        that is not found, a warning (once) says how to get the norms.
        """
        if self._placed:
            return
        try:
            from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
        except ImportError:  # pragma: no cover - a transformers that moved it
            INTEGRATION_TO_CALLBACK = {}
        reporters = tuple(c for c in INTEGRATION_TO_CALLBACK.values() if isinstance(c, type))
        handler = _calling_handler(self) if reporters else None
        if handler is not None:
            callbacks = handler.callbacks
            mine = next(i for i, cb in enumerate(callbacks) if cb is self)
            first = next((i for i, cb in enumerate(callbacks) if isinstance(cb, reporters)), mine)
            if first < mine:
                callbacks.insert(first, callbacks.pop(mine))
            self._placed = True
            return
        report_to = [r for r in (args.report_to or []) if r != "none"]
        if report_to and self.log_norms and "report_to" not in self._warned:
            self._warned.add("report_to")
            warnings.warn(
                f"gradclip's per-layer norms reach trainer.state.log_history, but the report_to "
                f"reporters {report_to} may run before this callback and miss them: pass "
                "report_to='none' and list the reporters after this callback, e.g. "
                "callbacks=[GradientNormalizationCallback(...), TensorBoardCallback()]",
                UserWarning,
                stacklevel=3,
            )

    # -- the Trainer's events ---------------------------------------------------------------
    def on_init_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._place_before_reporters(args)
        if model is not None:
            self._ensure(model)  # override keys are checked when the Trainer is made

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self._place_before_reporters(args)
        self._ensure(model)
        self._latest = None
        self._resume(args, state)
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
        applier.step(optimizer, getattr(optimizer, "scaler", None), state.global_step)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._applier is not None:  # before zero_grad: a skipped step's gradients remain
            self._applier.finish()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._applier is None:
            return
        # Kept on the device, read only if the Trainer logs this step: whether it does is
        # not known yet (logging_strategy="epoch" decides in on_epoch_end, after this).
        # None after a step the scaler skipped, so no older step's norms are logged.
        self._latest = self._applier.take_report()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        report = self._latest
        if report is None or not self.log_norms or logs is None or "loss" not in logs:
            return
        self._latest = None  # each step's norms are logged once
        norms = norms_for_logging(report, self.log_prefix)
        logs.update(norms)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(norms)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.normalizer is None or not args.should_save:
            return
        for directory in _checkpoint_dirs(args, state, resuming=False):
            if os.path.isdir(directory):
                saved = {"global_step": state.global_step, "callback": self.state_dict()}
                torch.save(saved, os.path.join(directory, STATE_FILE))
                return
        if "save" not in self._warned:
            self._warned.add("save")
            warnings.warn(
                f"gradclip found no checkpoint-{state.global_step} directory in "
                f"{args.output_dir}: its state is not saved with this checkpoint",
                UserWarning,
                stacklevel=2,
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._applier is not None:
            self._applier.cancel()
        if self.normalizer is not None:
            self.normalizer.flush()


def _checkpoint_dirs(args: TrainingArguments, state: TrainerState, *, resuming: bool) -> list[str]:
    """Where the Trainer keeps the checkpoint of ``state.global_step``."""
    name = f"checkpoint-{state.global_step}"
    output = str(args.output_dir)
    dirs = []
    explicit = getattr(args, "resume_from_checkpoint", None)
    if resuming and isinstance(explicit, str):
        dirs.append(explicit)
    if state.trial_name:
        dirs.append(os.path.join(output, state.trial_name, name))
    dirs.append(os.path.join(output, name))
    return dirs


def _calling_handler(callback: TrainerCallback) -> CallbackHandler | None:
    """The ``CallbackHandler`` whose event is calling ``callback`` now, if any."""
    frame = inspect.currentframe()
    try:
        caller = frame.f_back if frame is not None else None
        for _ in range(4):  # this helper, the callback's method, the handler's call_event
            if caller is None:
                return None
            handler = caller.f_locals.get("self")
            if isinstance(handler, CallbackHandler) and any(
                cb is callback for cb in handler.callbacks
            ):
                return handler
            caller = caller.f_back
        return None
    finally:
        del frame
