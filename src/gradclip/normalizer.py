"""DL4J-style configuration: a default rule for the network, overridable per layer.

``GradientNormalizer`` is the object users configure once; `gradclip.normalize_`
is the one-call form in the style of ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import operator
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from gradclip.advice import NO_GRADIENTS, warn_if_one_flat_layer
from gradclip.config import parse_config
from gradclip.core.engine import Engine
from gradclip.core.layers import (
    Layer,
    Target,
    build_layers,
    match_overrides,
    resolve_override_keys,
    structure_version,
    watch_module_structure,
)
from gradclip.core.nonfinite import check_nonfinite
from gradclip.core.report import NormReport
from gradclip.core.rule import Rule
from gradclip.core.state import READABLE_VERSIONS, check_identity, identity
from gradclip.core.validation import check_threshold
from gradclip.hooks import AttachHandle, attach_pre_hook, attach_skipping
from gradclip.rules.dl4j import GradientNormalization, resolve_rule

__all__ = ["GradientNormalizer", "Mode"]

Mode = GradientNormalization | str | Rule | None


def _resolve_override(value: Any, default_threshold: float, key: str) -> Rule:
    """An override value: a mode, ``(mode, threshold)`` or ``{"mode": ..., "threshold": ...}``."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(
                f"override for {key!r} must be a mode or a (mode, threshold) pair, got {value!r}"
            )
        return resolve_rule(value[0], value[1])
    if isinstance(value, Mapping):
        unknown = set(value) - {"mode", "threshold"}
        if unknown or "mode" not in value:
            raise ValueError(
                f"override for {key!r} must have the keys 'mode' and optionally 'threshold', "
                f"got {sorted(value)}"
            )
        return resolve_rule(value["mode"], value.get("threshold", default_threshold))
    return resolve_rule(value, default_threshold)


class GradientNormalizer:
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
            name of a module containing layers, or a glob pattern; the most
            specific key wins. A mode given without a threshold takes the default
            threshold, as in DL4J.
        measure_all: also measure norms of layers whose mode does not need them
            (``None``, element-wise clipping), at the cost of one read of those
            gradients; the report then has every layer's norm.
        nonfinite: ``"propagate"`` (default), ``"zero"``, ``"error"`` or ``"skip"``:
            what a step does with layers whose norm is inf or NaN; see
            `gradclip.core.nonfinite` for the cost of each.

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
    ) -> None:
        self.nonfinite = check_nonfinite(nonfinite)
        self.threshold = check_threshold(threshold)
        self.default = resolve_rule(mode, self.threshold)
        self.overrides = dict(overrides or {})
        self.measure_all = bool(measure_all)
        self._model: nn.Module | None = model if isinstance(model, nn.Module) else None
        self._model_ref: weakref.ref[nn.Module] | None = None
        self._target = None if isinstance(model, nn.Module) else model
        if self._model is not None:
            watch_module_structure()
        self._version = structure_version()
        self._lock = threading.Lock()
        self._attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, AttachHandle] = (
            weakref.WeakKeyDictionary()
        )
        self._warned_no_gradients = False
        self._engine = self._build(None)
        self.last_report: NormReport | None = None

    # -- the model -------------------------------------------------------------------------
    def _hold_weakly(self) -> None:
        # normalize_ caches normalizers in a WeakKeyDictionary keyed by the module,
        # which a strong reference from the value would keep alive forever.
        if self._model is not None:
            self._model_ref = weakref.ref(self._model)
            self._model = None

    def _module(self) -> nn.Module | None:
        if self._model_ref is not None:
            return self._model_ref()
        return self._model

    def _build(self, previous: Engine | None) -> Engine:
        target = self._target if self._target is not None else self._module()
        if target is None:
            raise RuntimeError("the model this GradientNormalizer was built for no longer exists")
        layers = build_layers(target)
        names = [layer.name for layer in layers]
        overrides = self.overrides
        if isinstance(target, nn.Module):  # a tied module's name names its layer
            overrides = resolve_override_keys(target, overrides)
        resolved = {
            key: _resolve_override(value, self.threshold, key) for key, value in overrides.items()
        }
        chosen = match_overrides(names, overrides)
        rules = [resolved[chosen[n]] if n in chosen else self.default for n in names]
        flat = not isinstance(target, nn.Module | Mapping | torch.Tensor) and names == [""]
        warn_if_one_flat_layer(layers, rules, flat)
        return Engine(
            layers,
            rules,
            measure_all=self.measure_all,
            nonfinite=self.nonfinite,
            store=None if previous is None else previous.store,
        )

    def _refresh(self, force: bool = False) -> bool:
        """Rebuild the layers if the model's structure changed; returns whether it did.

        Registration hooks catch ``model.head = nn.Linear(...)``; a parameter
        replaced behind them (``module._parameters[k] = ...``, FSDP2's
        ``fully_shard``) is caught by comparing the modules' entries with the
        parameters in use, or by ``force``, which walks the model.
        """
        model = self._module()
        if model is None:
            return False
        stale = force or self._version != structure_version() or self._engine.swapped()
        if not stale:
            return False
        self._version = structure_version()
        layers = build_layers(model)
        old = self._engine.layers
        same = len(layers) == len(old) and all(
            a.name == b.name
            and a.param_names == b.param_names
            and all(map(operator.is_, a.params, b.params))
            for a, b in zip(layers, old)
        )
        if not same:
            self._engine = self._build(self._engine)
        return not same

    @classmethod
    def from_config(cls, model: Target, config: Any) -> GradientNormalizer:
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
            RuntimeError: a layer's gradients on different devices (nothing is modified).
        """
        if torch.compiler.is_compiling():
            return self._apply()
        with self._lock:
            return self._apply()

    def _apply(self) -> NormReport:
        self._refresh()
        report = self._engine.step()
        # No gradient at all on a module's parameters: perhaps they were swapped
        # behind our back (e.g. by fully_shard after this normalizer was built).
        if report.tensor_norms.numel() == 0 and self._refresh(force=True):
            report = self._engine.step()
        if (
            report.tensor_norms.numel() == 0
            and self._engine.params
            and not self._warned_no_gradients
        ):
            self._warned_no_gradients = True  # once per normalizer, and once per call site
            if not torch.compiler.is_compiling():
                warnings.warn(NO_GRADIENTS, UserWarning, stacklevel=3)
        self.last_report = report
        return report

    __call__ = apply

    def attach(self, optimizer: torch.optim.Optimizer) -> AttachHandle:
        """Apply this normalizer inside every ``optimizer.step()``.

        Before the update, on the gradients of the last backward pass; for an
        optimizer stepped with a closure (``LBFGS``), after every evaluation of
        the closure instead. See `gradclip.hooks`. The latest report is kept in
        `last_report`.

        Returns:
            A handle; ``handle.remove()`` detaches the normalizer.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
            RuntimeError: this normalizer is already attached to ``optimizer``.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "attach() takes a torch.optim.Optimizer (it registers a step pre-hook), got "
                f"{type(optimizer).__name__}; for other training loops call normalizer.apply() "
                "before the update"
            )
        if optimizer in self._attached:
            raise RuntimeError(
                "this GradientNormalizer is already attached to this optimizer: a second "
                "attach would normalize twice per step. Keep the first handle (or call its "
                "remove() before attaching again)"
            )
        attached = self._attached
        ref = weakref.ref(optimizer)

        def forget() -> None:
            opt = ref()
            if opt is not None:
                attached.pop(opt, None)

        if self.nonfinite == "skip":
            handle = attach_skipping(optimizer, lambda: not self.apply_skipping(), forget)
        else:
            handle = attach_pre_hook(optimizer, self.apply, forget)
        attached[optimizer] = handle
        return handle

    def apply_skipping(self) -> bool:
        """`apply`, then whether the step must be skipped (``nonfinite="skip"``).

        True when a layer's norm was not finite; the gradients and the rules'
        state were then left untouched and the non-finite layers are in
        ``last_report.nonfinite_layers()``.
        """
        self.apply()
        return bool(self._engine.last_nonfinite)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The adaptive rules' state: per rule, per layer name, as CPU tensors.

        Available at any time, from construction on; save it with the model and
        optimizer, and `load_state_dict` on a normalizer of the same model and
        configuration continues bit for bit. The format is versioned. For a
        model built on the meta device it holds the fresh state until
        ``to_empty``; a lazy module's parameter is recorded with shape ``(?)``
        until its first forward, which matches any shape when loading.
        """
        with self._lock:
            self._refresh()
            return {**self._engine.store.state_dict(), **self._identity()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore `state_dict`; it takes effect at the next step.

        Raises:
            ValueError: the state dict belongs to another configuration (rules,
                layers, tensor shapes) or another version; nothing is changed.
        """
        with self._lock:
            self._refresh()
            if isinstance(state_dict, Mapping) and state_dict.get("version") in READABLE_VERSIONS:
                check_identity(state_dict, self._identity())
            # values are copied into the existing tensors: the cached plans stay valid
            self._engine.store.load_state_dict(state_dict)

    def _identity(self) -> dict[str, list[str]]:
        engine = self._engine
        return identity(
            [layer.name for layer in engine.layers],
            [
                # a lazy module's parameter has no shape before the first forward
                f"{layer.qualified(k)}{'(?)' if is_lazy(p) else tuple(p.shape)}"
                for layer in engine.layers
                for k, p in enumerate(layer.params)
            ],
            [rule.describe() for rule in engine.rules],
        )

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
        rows = [("layer", "parameters", "mode")]
        for layer, rule in zip(self._engine.layers, self._engine.rules):
            params = ", ".join(
                f"{name} {tuple(p.shape)}" for name, p in zip(layer.param_names, layer.params)
            )
            rows.append((layer.name or "(root)", params, rule.describe()))
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()

    def __repr__(self) -> str:
        return (
            f"GradientNormalizer(layers={len(self._engine.layers)}, default={self.default!r}, "
            f"overrides={len(self.overrides)})"
        )

    # -- copies and pickling -------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_model"] = self._module()  # a copy holds its model strongly
        state["_model_ref"] = None
        del state["_lock"]
        state["_attached"] = None  # attachments belong to the original's optimizers
        state["last_report"] = None  # it refers to the original's plan
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_warned_no_gradients", False)  # pickled by gradclip 0.2
        self._lock = threading.Lock()
        self._attached = weakref.WeakKeyDictionary()
