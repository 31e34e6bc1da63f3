"""DL4J-style configuration: a default rule for the network, overridable per layer.

``GradientNormalizer`` is the object users configure once; `gradclip.normalize_`
is the one-call form in the style of ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradclip.advice import warn_if_no_gradients, warn_if_one_flat_layer
from gradclip.config import parse_config
from gradclip.copying import Copyable
from gradclip.core.agreement import check_process_group, ddp_group
from gradclip.core.checkpoint import covers_of, fresh_rows, save_state
from gradclip.core.children import ModelStructure, watch_module_structure
from gradclip.core.engine import Engine
from gradclip.core.identity import LoadResult
from gradclip.core.layers import Layer, Target, build_layers, reusable, same_layers
from gradclip.core.nonfinite import check_nonfinite
from gradclip.core.report import NormReport
from gradclip.core.rule import Rule
from gradclip.core.sharding import RankGroup
from gradclip.core.stages import configure_layers, setup_stages, stage_layers
from gradclip.core.state import StateStore
from gradclip.core.validation import check_threshold
from gradclip.fused_hooks import fused_hook
from gradclip.hooks import AttachHandle
from gradclip.recording import Recording, RecordPath
from gradclip.rules import dl4j
from gradclip.rules.dl4j import GradientNormalization, layer_table, resolve_rule
from gradclip.step_guard import attach_once

__all__ = ["GradientNormalizer", "Mode"]

Mode = GradientNormalization | str | Rule | None
_RULES_OF = (dl4j.assign_rules, dl4j.resolve_override)  # for core.stages.configure_layers

_KEEP: Any = object()  # reconfigure(): leave the default rule as it is
# the state store a normalizer starts from (GradientNormalizer._sharing); None: a fresh one
_SEED: contextvars.ContextVar[StateStore | None] = contextvars.ContextVar("seed", default=None)


class GradientNormalizer(Recording, Copyable):
    """Per-layer gradient normalization, configured once, applied every step.

    Every layer (by default, every module that directly owns parameters) is
    normalized with ``mode`` and ``threshold`` unless ``overrides`` names it,
    as DL4J's ``.gradientNormalization(...)`` on the network builder and on a
    layer builder do. The normalizer owns the adaptive rules' state, per layer
    name (`state_dict`).

    Args:
        model: an ``nn.Module`` or a custom grouping (see
            `gradclip.core.layers.build_layers`).
        mode: the default: a `GradientNormalization`, a DL4J name such as
            ``"ClipL2PerLayer"``, ``None``, or a rule object.
        threshold: the default threshold, a finite number > 0 (DL4J's default
            1.0). With a rule object as ``mode`` it is the threshold of
            overrides that name a DL4J mode without one.
        overrides: ``{key: mode}``, ``{key: (mode, threshold)}`` or
            ``{key: {"mode": ..., "threshold": ...}}``. A key is a layer name, the
            name of a module containing layers, or a glob pattern; an exact name
            beats a glob, a glob beats a module name (see
            `gradclip.core.layers.match_overrides`). Each key's layers are one
            group: a global rule clips exactly them, a stateful one keeps a state
            per key. A mode given without a threshold takes the default
            threshold, as in DL4J.
        measure_all: also measure norms of layers whose mode does not need them
            (``None``, element-wise clipping), at the cost of one read of those
            gradients; the report then has every layer's norm.
        nonfinite: ``"propagate"`` (default), ``"zero"``, ``"error"`` or ``"skip"``:
            what a step does with layers whose norm is inf or NaN; see
            `gradclip.core.nonfinite` for the cost of each.
        record: a file to record every step's norms in (`gradclip.recording`).
        process_group: the ranks that hold replicas of ``model`` (e.g. the
            data-parallel group of a pipeline stage, or ``torch.distributed.group.WORLD``);
            their configurations are compared at the first step, and a difference
            raises `RankMismatchError` on all of them. Without it, the ranks of a
            ``DistributedDataParallel`` target, or of the ``DTensor`` parameters'
            mesh, are compared; a plain module under a process group is not
            assumed to be replicated.

        pp_mesh: the 1-D mesh or group of the pipeline stages (`gradclip.core.pipeline`).
        stages: the stage modules this rank holds, when several (``model`` is ``None``).
    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> normalizer = gradclip.GradientNormalizer(
        ...     net, mode="ClipL2PerLayer", threshold=1.0,
        ...     overrides={"2": ("ClipElementWiseAbsoluteValue", 0.5)})
        >>> print(normalizer)
        layer  parameters                mode
        ----------------------------------------------------------------------------
        0      weight (8, 4), bias (8,)  ClipL2PerLayer(threshold=1.0)
        2      weight (2, 8), bias (2,)  ClipElementWiseAbsoluteValue(threshold=0.5)

    Raises:
        ValueError / TypeError: an invalid mode or threshold.
        KeyError: an override key that matches no layer.
    """

    def __init__(
        self,
        model: Target,
        mode: Mode,
        threshold: float = 1.0,
        overrides: Mapping[str, Any] | None = None,
        *,
        measure_all: bool = False,
        nonfinite: str = "propagate",
        record: RecordPath = None,
        record_every: int = 100,
        record_tensors: bool = False,
        process_group: Any = None,
        pp_mesh: Any = None,
        stages: Sequence[nn.Module] | None = None,
    ) -> None:
        self.process_group = check_process_group(process_group)
        self.nonfinite = check_nonfinite(nonfinite)
        self._stages, model, self._pipeline = setup_stages(model, stages, pp_mesh, self.nonfinite)
        self.threshold = check_threshold(threshold)
        self._mode: Mode = mode  # as given: a new threshold applies to a DL4J mode
        self.default = resolve_rule(mode, self.threshold)
        self.overrides = dict(overrides or {})
        self.measure_all = bool(measure_all) or record is not None
        self._model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self._model_ref: weakref.ref[nn.Module] | None = None
        self._target = None if isinstance(model, nn.Module) else reusable(model)
        watch_module_structure()  # model.head = ..., also inside a custom grouping
        self._structure = ModelStructure(stages if stages is not None else model)
        self._lock = threading.Lock()
        self._attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, AttachHandle] = (
            weakref.WeakKeyDictionary()
        )
        self._engine = self._build(_SEED.get())
        self.last_report: NormReport | None = None
        self._start_recording(record, record_every, record_tensors)

    @classmethod
    def _sharing(cls, model: Target, mode: Mode, nonfinite: str, store: Any) -> GradientNormalizer:
        """A normalizer whose rules' state is ``store`` (how `gradclip.normalize_` keeps
        the state of a target it cannot hold a normalizer for)."""
        token = _SEED.set(store)
        try:
            return cls(model, mode, nonfinite=nonfinite)
        finally:
            _SEED.reset(token)

    # -- the model -------------------------------------------------------------------------
    def _hold_weakly(self) -> None:
        # normalize_'s cache is keyed weakly by the module: a value must not hold it
        if self._model is not None:
            self._model_ref = weakref.ref(self._model)
            self._model = None

    def _module(self) -> nn.Module | None:
        if self._model_ref is not None:
            return self._model_ref()
        return self._model

    def _build(self, store: StateStore | None) -> Engine:
        target = self._target if self._target is not None else self._module()
        if target is None:
            raise RuntimeError("the model this GradientNormalizer was built for no longer exists")
        layers, rules, tags, pipeline = configure_layers(target, self, _RULES_OF)
        warn_if_one_flat_layer(target, layers, rules)
        return Engine(
            layers,
            rules,
            measure_all=self.measure_all,
            nonfinite=self.nonfinite,
            store=store,
            tags=tags,
            replicas=self._replicas(),
            pipeline=pipeline,
        )

    def _replicas(self) -> RankGroup | None:
        """The group whose ranks hold replicas of the model: explicit, or DDP's."""
        if self.process_group is not None:
            return RankGroup(self.process_group)
        return ddp_group(self._module())

    def _refresh(self, force: bool = False) -> bool:
        """Rebuild the layers if the model's structure changed; returns whether it did.

        Registration hooks catch ``model.head = nn.Linear(...)``; a parameter
        replaced behind them (``module._parameters[k] = ...``, FSDP2's
        ``fully_shard``) is caught by comparing the modules' entries with the
        parameters in use, or by ``force``, which walks the model.
        """
        model = self._target if self._target is not None else self._module()
        if model is None:
            return False
        stale = force or self._structure.changed() or self._engine.swapped()
        if not stale:
            return False
        structure = ModelStructure(self._stages if self._stages is not None else model)
        layers = stage_layers(self._stages) if self._stages is not None else build_layers(model)
        same = same_layers(layers, self._engine.layers)
        if not same:
            self._engine = self._build(self._engine.store)
        # only once built: a build that raised (an override key that names a removed
        # module) raises again on the next step instead of stepping the old layers
        self._structure = structure
        return not same

    @classmethod
    def from_config(cls, model: Target, config: Any, **recording: Any) -> GradientNormalizer:
        """A normalizer from a DL4J-style configuration: a dict, or a JSON/YAML/TOML file.

            Args:
                model: the model (or custom grouping) to normalize.
                config: a mapping, or the path of a JSON, YAML or TOML file; see
                    `gradclip.config` for the keys.

            Returns:
                The normalizer.

            Raises:
                ConfigError: an invalid configuration (nothing is built).
                KeyError: a layer key that matches no layer of ``model``.

        Examples:
            >>> normalizer = gradclip.GradientNormalizer.from_config(model, {
            ...     "gradientNormalization": "ClipL2PerLayer",
            ...     "gradientNormalizationThreshold": 1.0,
            ...     "layers": {"head": "None"}})
            >>> print(normalizer)
            layer     parameters                   mode
            --------------------------------------------------------------------
            encoder   weight (16, 4), bias (16,)   ClipL2PerLayer(threshold=1.0)
            blocks.0  weight (16, 16), bias (16,)  ClipL2PerLayer(threshold=1.0)
            blocks.2  weight (16, 16), bias (16,)  ClipL2PerLayer(threshold=1.0)
            head      weight (2, 16), bias (2,)    None()
        """
        args = parse_config(config)
        return cls(
            model,
            args["mode"],
            args["threshold"],
            args["overrides"],
            measure_all=args["measure_all"],
            **recording,
        )

    # -- applying ---------------------------------------------------------------------------
    def apply(self) -> NormReport:
        """Normalize the model's current gradients in place.

        Call between ``loss.backward()`` and ``optimizer.step()`` (or use
        `attach`). With AMP, unscale first (``scaler.unscale_(optimizer)``).
        One normalizer may be used from several threads: steps are serialized.

        Returns:
            The `NormReport` of norms measured before normalization; no value is
            read from the device.

        Raises:
            TypeError: a sparse or complex gradient (nothing is modified).
            RuntimeError: a layer's gradients on different devices, or a gradient whose
                elements share memory (``expand``; nothing is modified).
        """
        return self.apply_at(None)

    def _apply(self, step: int | None) -> NormReport:
        self._refresh()
        report = self._engine.step()
        # No gradient at all on a module's parameters: perhaps they were swapped
        # behind our back (e.g. by fully_shard after this normalizer was built).
        if report.tensor_norms.numel() == 0 and self._refresh(force=True):
            report = self._engine.step()
        warn_if_no_gradients(self, report)
        self.last_report = report
        self._keep(report, step)
        return report

    __call__ = apply

    def attach(
        self, optimizer: torch.optim.Optimizer, *, fold: bool = True, scaler: Any = None
    ) -> AttachHandle:
        """Apply this normalizer inside every ``optimizer.step()``.

        Before the update, on the gradients of the last backward pass; for an
        optimizer stepped with a closure (``LBFGS``), after every evaluation of
        the closure instead. See `gradclip.hooks`. The latest report is kept in
        `last_report`.

        ``optimizer`` may be a framework's wrapper (accelerate's
        ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``): the
        optimizer inside it is hooked. With ``nonfinite="skip"`` steps stay
        normalized and skipped when something replaces ``optimizer.step``
        afterwards (see `gradclip.step_guard`). A fused optimizer (``fused=True``)
        takes the multiply (``fold``), the unscale and the skip into its own step,
        and with ``scaler`` (its ``GradScaler``) the scaler's check for inf/NaN:
        see `gradclip.fused`, `gradclip.fused_scaler`. Returns a handle;
        ``handle.remove()`` detaches the normalizer.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` (or a wrapper
                of one), or ``scaler`` is not a ``torch.amp.GradScaler``.
            RuntimeError: this normalizer is already attached to ``optimizer``.
        """
        skip = self.nonfinite == "skip"
        hook = fused_hook(self, fold, scaler)
        return attach_once(self._attached, optimizer, self.apply, self.apply_skipping, skip, hook)

    def apply_skipping(self) -> bool:
        """`apply`, then whether the step must be skipped (``nonfinite="skip"``).

        True when a layer's norm was not finite; the gradients and the rules'
        state were then left untouched and the non-finite layers are in
        ``last_report.nonfinite_layers()``.
        """
        self.apply()
        return self._engine.skipped

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The adaptive rules' state: per rule, per layer name, as CPU tensors.

        Available at any time, from construction on; save it with the model and
        optimizer, and `load_state_dict` on a normalizer of the same model and
        configuration continues bit for bit. The format is versioned.
        """
        with self._lock:
            self._refresh()
            return {
                **save_state(self._engine, staged=self._pipeline is not None),
                "steps": self.steps,
            }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Restore `state_dict`; it takes effect at the next step.

        A saved state is restored into a rule here when that rule's
        state-relevant fields and the layers it covers match (see
        `gradclip.core.identity`): thresholds, caps and stateless rules may
        differ.

        Args:
            state_dict: what `state_dict` returned (this version or gradclip 0.2's).
            strict: refuse, changing nothing, unless every stateful rule here is
                restored and every saved state used (the default). With
                ``False``, what matches is restored, the rest starts afresh.

        Returns:
            What was left, as torch's ``Module.load_state_dict`` returns it:
            ``missing_keys`` (rows here that start afresh), ``unexpected_keys``
            (saved rows unused) and ``reasons``.

        Raises:
            ValueError: not a state dict of this format, or (``strict``) one of
                another configuration; nothing is changed.

        Examples:
            >>> net = torch.nn.Linear(4, 2)
            >>> saved = gradclip.GradientNormalizer(net, gradclip.ZClip(z_thresh=2.5)).state_dict()
            >>> later = gradclip.GradientNormalizer(net, gradclip.ZClip(z_thresh=3.0))
            >>> later.load_state_dict(saved)  # a threshold is not part of the state's identity
            LoadResult(missing_keys=[], unexpected_keys=[], reasons={})
        """
        with self._lock:
            self._refresh()
            return self._load_with_steps(state_dict, strict, staged=self._pipeline is not None)

    def reconfigure(
        self,
        mode: Mode | object = _KEEP,
        threshold: float | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Change the rules between steps, keeping the state that still applies.

        For threshold schedules (a warm-up of ``max_grad_norm``, a decaying
        ``z_thresh``): each stateful rule keeps its state when its
        state-relevant fields and the layers it covers are unchanged (see
        `gradclip.core.identity`); the others start afresh. Costs a new plan,
        as a changed model does: call it when the value changes, not every step.

        Args:
            mode: the new default rule (unchanged if not given).
            threshold: the new default threshold (unchanged if ``None``).
            overrides: the new overrides (unchanged if ``None``).

        Returns:
            The state rows that started afresh (empty when every state was kept).

        Raises:
            ValueError / TypeError / KeyError: as the constructor; nothing changes then.

        Examples:
            >>> net = torch.nn.Linear(4, 2)
            >>> normalizer = gradclip.GradientNormalizer(net, gradclip.ZClip(z_thresh=4.0))
            >>> normalizer.reconfigure(gradclip.ZClip(z_thresh=2.5))  # the EMA is kept
            []
        """
        with self._lock:
            saved = self._mode, self.threshold, self.default, self.overrides
            try:
                self._mode = self._mode if mode is _KEEP else mode  # type: ignore[assignment]
                self.threshold = check_threshold(threshold or self.threshold)
                self.overrides = dict(self.overrides if overrides is None else overrides)
                self.default = resolve_rule(self._mode, self.threshold)
                before = covers_of(self._engine.store)
                self._engine = self._build(self._engine.store)
            except Exception:
                self._mode, self.threshold, self.default, self.overrides = saved
                raise
            return fresh_rows(before, self._engine.store)

    # -- inspection ----------------------------------------------------------------------------
    @property
    def layers(self) -> list[Layer]:
        """The layers, in model order."""
        self._refresh()
        return list(self._engine.layers)

    @property
    def rules(self) -> dict[str, Rule]:
        """``{layer name: rule}`` after applying the overrides."""
        self._refresh()
        return {layer.name: r for layer, r in zip(self._engine.layers, self._engine.rules)}

    strategies = rules  # the 0.1 name

    def describe(self) -> str:
        """A table of the layers: name, parameters (with shapes), rule and its settings."""
        self._refresh()
        return layer_table(self._engine.layers, self._engine.rules)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return (
            f"GradientNormalizer(layers={len(self._engine.layers)}, default={self.default!r}, "
            f"overrides={len(self.overrides)})"
        )
