"""DL4J-style configuration: a default mode for the network, overridable per layer.

``GradientNormalizer`` is the object users configure once; ``normalize_`` is
the one-call form in the style of ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradclip.core.engine import Engine
from gradclip.core.layers import Layer, Target, build_layers, match_overrides
from gradclip.core.nonfinite import SkipHandle, check_nonfinite
from gradclip.core.report import NormReport
from gradclip.core.rule import Strategy
from gradclip.rules.dl4j import GradientNormalization, resolve_strategy

__all__ = ["GradientNormalizer", "normalize_"]

Mode = GradientNormalization | str | Strategy | None

# Bumped whenever any module registers a parameter or a submodule, so that a
# normalizer notices `model.head = nn.Linear(...)` without walking the model on
# every step.
_structure_version = 0
_hooks_installed = False


def _bump(*_: Any) -> None:
    global _structure_version
    _structure_version += 1


def _watch_module_structure() -> None:
    global _hooks_installed
    if not _hooks_installed:
        nn.modules.module.register_module_parameter_registration_hook(_bump)
        nn.modules.module.register_module_module_registration_hook(_bump)
        _hooks_installed = True


def _resolve_override(value: Any, default_threshold: float, key: str) -> Strategy:
    """An override value: a mode, ``(mode, threshold)`` or ``{"mode": ..., "threshold": ...}``."""
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(
                f"override for {key!r} must be a mode or a (mode, threshold) pair, got {value!r}"
            )
        return resolve_strategy(value[0], value[1])
    if isinstance(value, Mapping):
        unknown = set(value) - {"mode", "threshold"}
        if unknown or "mode" not in value:
            raise ValueError(
                f"override for {key!r} must have the keys 'mode' and optionally 'threshold', "
                f"got {sorted(value)}"
            )
        return resolve_strategy(value["mode"], value.get("threshold", default_threshold))
    return resolve_strategy(value, default_threshold)


class GradientNormalizer:
    """Per-layer gradient normalization, configured once, applied every step.

    Every layer (by default, every module that directly owns parameters) is
    normalized with ``mode`` and ``threshold`` unless ``overrides`` names it,
    as DL4J's ``.gradientNormalization(...)`` on the network builder and on a
    layer builder do. See `gradclip.rules.dl4j` for the formulas.

    Args:
        model: an ``nn.Module`` or a custom grouping (see
            `gradclip.core.layers.build_layers`).
        mode: the default: a `GradientNormalization`, a DL4J name such as
            ``"ClipL2PerLayer"``, ``None``, or a `Strategy`.
        threshold: the default threshold, a finite number > 0 (DL4J's default 1.0).
        overrides: ``{key: mode}``, ``{key: (mode, threshold)}`` or
            ``{key: {"mode": ..., "threshold": ...}}``. A key is a layer name, the
            name of a module containing layers, or a glob pattern; the most
            specific key wins. A mode given without a threshold takes the default
            threshold, as in DL4J.
        measure_all: also measure norms of layers whose mode does not need them
            (``None``, element-wise clipping), at the cost of one read of those
            gradients.
        nonfinite: ``"propagate"`` (default), ``"zero"``, ``"error"`` or ``"skip"``:
            what a step does with layers whose norm is inf or NaN; see
            `gradclip.core.nonfinite` for the cost of each (``"error"`` and
            ``"skip"`` read one bool per layer to the host every step).

    Example:
        >>> normalizer = gradclip.GradientNormalizer(
        ...     model, mode="ClipL2PerLayer", threshold=1.0,
        ...     overrides={"rnn": ("ClipElementWiseAbsoluteValue", 0.5), "head": "None"})
        >>> handle = normalizer.attach(optimizer)   # before every optimizer.step()
        >>> print(normalizer)                       # the layer table

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
        self.default = resolve_strategy(mode, threshold)
        self.threshold = (
            float(threshold) if not isinstance(mode, Strategy) else self.default.threshold
        )
        self.overrides = dict(overrides or {})
        self.measure_all = measure_all
        # A module is held weakly: normalize_ caches normalizers in a
        # WeakKeyDictionary keyed by the module, which a strong reference from the
        # value would keep alive forever. Other targets are plain containers.
        self._model_ref = weakref.ref(model) if isinstance(model, nn.Module) else None
        self._target = None if isinstance(model, nn.Module) else model
        if self._model_ref is not None:
            _watch_module_structure()
        self._version = _structure_version
        self._engine = self._build()
        self.last_report: NormReport | None = None

    def _build(self) -> Engine:
        target = self._target if self._model_ref is None else self._model_ref()
        if target is None:
            raise RuntimeError("the model this GradientNormalizer was built for no longer exists")
        layers = build_layers(target)
        names = [layer.name for layer in layers]
        resolved = {
            key: _resolve_override(value, self.threshold, key)
            for key, value in self.overrides.items()
        }
        chosen = match_overrides(names, self.overrides)
        strategies = [resolved[chosen[n]] if n in chosen else self.default for n in names]
        return Engine(layers, strategies, measure_all=self.measure_all, nonfinite=self.nonfinite)

    def _refresh_if_changed(self, force: bool = False) -> bool:
        """Rebuild the layers if the model's structure changed; returns whether it did.

        Registration hooks catch ``model.head = nn.Linear(...)``; code that swaps
        parameters behind them (FSDP2's ``fully_shard`` writes ``_parameters``
        directly) is caught by ``force``, which walks the model.
        """
        rebuilt = False
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None and (force or self._version != _structure_version):
            layers = build_layers(model)
            old = self._engine.layers
            same = len(layers) == len(old) and all(
                a.name == b.name
                and a.param_names == b.param_names
                and all(p is q for p, q in zip(a.params, b.params))
                for a, b in zip(layers, old)
            )
            if not same:
                self._engine = self._build()
                rebuilt = True
            self._version = _structure_version
        return rebuilt

    @classmethod
    def from_config(cls, model: Target, config: Any) -> GradientNormalizer:
        """From a dict or a JSON/YAML/TOML file: `gradclip.config.normalizer_from_config`."""
        from gradclip.config import normalizer_from_config

        return normalizer_from_config(model, config)

    # -- applying ---------------------------------------------------------------
    def apply(self) -> NormReport:
        """Normalize the model's current gradients in place.

        Call between ``loss.backward()`` and ``optimizer.step()`` (or use
        `attach`). With AMP, unscale first (``scaler.unscale_(optimizer)``).

        Returns:
            The `NormReport` of norms measured before
            normalization; no value is read from the device.

        Raises:
            TypeError: a sparse or complex gradient (nothing is modified).
            RuntimeError: a layer's gradients on different devices (nothing is modified).
        """
        self._refresh_if_changed()
        report = self._engine.step()
        # No gradient at all on a module's parameters: perhaps they were swapped
        # behind our back (e.g. by fully_shard after this normalizer was built).
        if report.tensor_norms.numel() == 0 and self._refresh_if_changed(force=True):
            report = self._engine.step()
        self.last_report = report
        return report

    __call__ = apply

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Apply this normalizer before every ``optimizer.step()``.

        Uses ``Optimizer.register_step_pre_hook``; with ``torch.amp.GradScaler``,
        ``scaler.step(optimizer)`` unscales before it calls ``step``, so the
        normalizer sees unscaled gradients, and a step the scaler skips (inf or
        NaN gradients) does not run the normalizer at all. The latest report is
        kept in `last_report`.

        Returns:
            A handle; ``handle.remove()`` detaches the normalizer.

        Raises:
            TypeError: ``optimizer`` is not a ``torch.optim.Optimizer``.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "attach() takes a torch.optim.Optimizer (it registers a step pre-hook), got "
                f"{type(optimizer).__name__}; for other training loops call normalizer.apply() "
                "before the update"
            )
        if self.nonfinite == "skip":
            # wraps optimizer.step: a step with a non-finite layer is not taken
            return SkipHandle(optimizer, lambda: not self.apply_skipping())

        def hook(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            if getattr(opt, "grad_scale", None) is not None:
                # A fused optimizer stepped by GradScaler without unscale_: the
                # gradients are still scaled, and normalizing them would be wrong.
                raise RuntimeError(
                    "the optimizer's gradients are still scaled by GradScaler (fused "
                    "optimizer): call scaler.unscale_(optimizer) before scaler.step(optimizer) "
                    "so that gradclip normalizes the true gradients"
                )
            self.apply()

        return optimizer.register_step_pre_hook(hook)

    def apply_skipping(self) -> bool:
        """`apply`, then whether the step must be skipped (``nonfinite="skip"``).

        True when a layer's norm was not finite; the gradients and the rules'
        state were then left untouched and the non-finite layers are in
        ``last_report.nonfinite_layers()``.
        """
        self.apply()
        return bool(self._engine.last_nonfinite)

    # -- resume ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The adaptive rules' state (CPU tensors and ints) and what identifies the model.

        Save it with the model and optimizer; `load_state_dict` on a fresh
        normalizer of the same model and configuration continues bit for bit.
        """
        from gradclip.core.state import normalizer_state_dict

        self._refresh_if_changed()
        return normalizer_state_dict(self._engine)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore `state_dict`; it takes effect at the next step.

        Raises:
            ValueError: the state dict was saved for a different model (layers,
                parameter names or shapes) or different rules; nothing is changed.
        """
        from gradclip.core.state import load_normalizer_state

        self._refresh_if_changed()
        load_normalizer_state(self._engine, state_dict)

    # -- inspection ---------------------------------------------------------------
    @property
    def layers(self) -> list[Layer]:
        """The layers, in model order."""
        self._refresh_if_changed()
        return list(self._engine.layers)

    @property
    def strategies(self) -> dict[str, Strategy]:
        """``{layer name: strategy}`` after applying the overrides."""
        self._refresh_if_changed()
        return {layer.name: s for layer, s in zip(self._engine.layers, self._engine.strategies)}

    def describe(self) -> str:
        """A table of the layers: name, parameters (with shapes), mode and its settings."""
        self._refresh_if_changed()
        rows = [("layer", "parameters", "mode")]
        for layer, strategy in zip(self._engine.layers, self._engine.strategies):
            params = ", ".join(
                f"{name} {tuple(p.shape)}" for name, p in zip(layer.param_names, layer.params)
            )
            rows.append((layer.name or "(root)", params, strategy.describe()))
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


# normalize_ keeps a few normalizers per module so that calling it every step
# reuses the cached layout instead of walking the model again.
_CACHE_PER_MODULE = 8
_cache: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Any, GradientNormalizer]] = (
    weakref.WeakKeyDictionary()
)


def normalize_(
    target: Target, mode: Mode, threshold: float = 1.0, *, nonfinite: str = "propagate"
) -> NormReport:
    """Normalize the gradients of ``target`` in place with one DL4J mode (or strategy).

    The one-call form of `GradientNormalizer`, in the style of
    ``torch.nn.utils.clip_grad_norm_``: call it between ``loss.backward()`` and
    ``optimizer.step()``. For a module, the layout is cached across calls.

    Args:
        target: an ``nn.Module`` (one layer per module owning parameters), a
            mapping ``{layer_name: params}``, a list of parameter lists, or a flat
            iterable of parameters (one layer).
        mode: a `GradientNormalization`, a DL4J name such as
            ``"ClipL2PerLayer"``, ``None``, or a `Strategy`.
        threshold: a finite number > 0; ignored by the renormalize modes.
        nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``, see
            `gradclip.core.nonfinite` (``"skip"`` needs an optimizer: use
            ``GradientNormalizer(..., nonfinite="skip").attach(optimizer)``).

    Returns:
        The `NormReport` of norms measured before normalization.

    Example:
        >>> loss.backward()
        >>> report = gradclip.normalize_(model, "ClipL2PerLayer", threshold=1.0)
        >>> optimizer.step()

    References:
        Deeplearning4j, ``GradientNormalization``; Pascanu et al., ICML 2013.
    """
    if check_nonfinite(nonfinite) == "skip":
        raise ValueError(
            "nonfinite='skip' skips an optimizer step, so it needs an optimizer: use "
            "GradientNormalizer(model, mode, nonfinite='skip').attach(optimizer)"
        )
    strategy = resolve_strategy(mode, threshold)
    if not isinstance(target, nn.Module):
        return GradientNormalizer(target, strategy, nonfinite=nonfinite).apply()
    key: Any = (strategy if strategy.batchable else id(strategy), nonfinite)
    per_module = _cache.setdefault(target, OrderedDict())
    normalizer = per_module.get(key)
    if normalizer is None:
        normalizer = GradientNormalizer(target, strategy, nonfinite=nonfinite)
        per_module[key] = normalizer
        if len(per_module) > _CACHE_PER_MODULE:
            per_module.popitem(last=False)
    else:
        per_module.move_to_end(key)
    return normalizer.apply()
