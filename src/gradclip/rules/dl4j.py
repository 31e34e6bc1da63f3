"""Deeplearning4j's six gradient normalization modes.

``g`` is a gradient tensor, ``t`` the threshold, ``‖·‖`` the L2 norm and
``‖layer‖ = sqrt(Σ_p ‖g_p‖²)`` the norm of all of a layer's gradients together.

| mode | effect |
|---|---|
| ``None`` | nothing |
| ``RenormalizeL2PerLayer`` | ``g_p ← g_p / ‖layer‖`` (``t`` ignored) |
| ``RenormalizeL2PerParamType`` | ``g_p ← g_p / ‖g_p‖`` (``t`` ignored) |
| ``ClipElementWiseAbsoluteValue`` | ``x ← clamp(x, -t, t)`` for every element |
| ``ClipL2PerLayer`` | if ``‖layer‖ > t``: ``g_p ← g_p · (t / ‖layer‖)`` |
| ``ClipL2PerParamType`` | if ``‖g_p‖ > t``: ``g_p ← g_p / (‖g_p‖ / t)`` |

Where DL4J leaves a tensor alone, so does gradclip, bit for bit: the
coefficient it multiplies in is exactly ``1.0``. DL4J's updater
(``BaseMultiLayerUpdater.preApply``) replaces a zero norm by ``1e-5`` before
renormalizing, so an all-zero layer stays all zero; gradclip leaves it as it
is. The scale factors are formed in float64 and applied as one multiply per
tensor, within one rounding of DL4J's division for ``ClipL2PerParamType``.
Norms are accumulated in float32 or wider; torch squares float32 elements in
float32, so a float32 tensor's norm reads ``inf`` from about 1.8e19; the
coefficient is then ``t / inf = 0`` and the gradient becomes zeros, never NaN
— the same outcome as ``torch.nn.utils.clip_grad_norm_``. At the other end
the squares underflow: a float32 tensor whose elements are all under about
1e-19 in magnitude has a norm that loses digits, and under about 4e-23 one
that reads ``0``, so the renormalizations leave it as they leave an all-zero
tensor (torch's norms read the same). Float64 gradients hold from about
1.5e-154 to 1.3e154 per element.

References:
    Deeplearning4j, ``org.deeplearning4j.nn.conf.GradientNormalization``,
    ``BaseMultiLayerUpdater.preApply`` and ``TestGradientNormalization``.
    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013 (norm clipping).
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from gradclip.core.kernels import ClampPlan, clamp_abs_, plan_clamp
from gradclip.core.layers import Layer, match_overrides
from gradclip.core.rule import (
    GroupLayout,
    InPlaceRule,
    Measured,
    Rule,
    ScalingRule,
    State,
    set_fields,
)
from gradclip.core.validation import check_threshold

__all__ = [
    "ClipElementWiseAbsoluteValue",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
    "GradientNormalization",
    "NoNormalization",
    "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType",
    "resolve_rule",
]


def _normalized_key(text: str) -> str:
    return text.replace("_", "").replace("-", "").replace(" ", "").lower()


class GradientNormalization(str, enum.Enum):
    """The six modes of DL4J's ``GradientNormalization`` enum.

    Members are named in Python style and valued with DL4J's spelling;
    ``GradientNormalization("ClipL2PerLayer")``, ``GradientNormalization("clip_l2_per_layer")``
    and ``GradientNormalization.CLIP_L2_PER_LAYER`` are the same member.

    Examples:
        >>> GradientNormalization("ClipL2PerLayer") is GradientNormalization.CLIP_L2_PER_LAYER
        True
        >>> GradientNormalization.CLIP_L2_PER_LAYER.rule(0.5)
        ClipL2PerLayer(threshold=0.5)
    """

    NONE = "None"
    RENORMALIZE_L2_PER_LAYER = "RenormalizeL2PerLayer"
    RENORMALIZE_L2_PER_PARAM_TYPE = "RenormalizeL2PerParamType"
    CLIP_ELEMENT_WISE_ABSOLUTE_VALUE = "ClipElementWiseAbsoluteValue"
    CLIP_L2_PER_LAYER = "ClipL2PerLayer"
    CLIP_L2_PER_PARAM_TYPE = "ClipL2PerParamType"

    @classmethod
    def _missing_(cls, value: object) -> GradientNormalization | None:
        if value is None:
            return cls.NONE
        if isinstance(value, str):
            key = _normalized_key(value)
            for member in cls:
                if key in (_normalized_key(member.value), _normalized_key(member.name)):
                    return member
        return None

    @classmethod
    def parse(cls, value: object) -> GradientNormalization:
        """Like ``GradientNormalization(value)`` but with an error that lists the valid names."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(f"{m.value!r} / {m.name!r}" for m in cls)
            hint = ""
            if isinstance(value, str):
                # compared without case, '_' or '-', as the names are accepted
                spellings = {_normalized_key(s): m.value for m in cls for s in (m.value, m.name)}
                close = difflib.get_close_matches(_normalized_key(value), spellings, n=1)
                hint = f" (did you mean {spellings[close[0]]!r}?)" if close else ""
            raise ValueError(
                f"unknown gradient normalization mode {value!r}{hint}; valid modes (DL4J / "
                f"Python spelling) are: {names}, or a gradclip rule object such as "
                "gradclip.ZClip()"
            ) from None

    @property
    def uses_threshold(self) -> bool:
        """Whether the mode reads its threshold (the two renormalizations and None do not)."""
        return self in (
            GradientNormalization.CLIP_ELEMENT_WISE_ABSOLUTE_VALUE,
            GradientNormalization.CLIP_L2_PER_LAYER,
            GradientNormalization.CLIP_L2_PER_PARAM_TYPE,
        )

    def rule(self, threshold: float = 1.0) -> Rule:
        """The rule that implements this mode (``threshold`` is ignored where DL4J ignores it)."""
        cls = _MODE_RULES[self]
        return cls(threshold) if self.uses_threshold else cls()  # type: ignore[call-arg]

    strategy = rule  # the 0.1 name

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class NoNormalization(InPlaceRule):
    """DL4J ``None``: the gradients are left as they are (and not even read)."""

    norm_type: ClassVar[float | None] = None
    reads_gradient: ClassVar[bool] = False
    squares: ClassVar[bool] = False
    layer_local: ClassVar[bool] = True

    def describe(self) -> str:
        return "None()"  # DL4J's name of the mode

    def transform_(self, m: Measured, state: State) -> tuple[torch.Tensor | None, State]:
        return torch.zeros(
            len(m.layout.layer_names), dtype=torch.bool, device=m.layout.device
        ), state


def _renormalize(norms: torch.Tensor) -> torch.Tensor:
    # 1/norm, but an all-zero tensor keeps coefficient 1: DL4J divides by 1e-5
    # there, and 0 / 1e-5 is 0 again. A NaN norm also gets 1, so NaN flows through.
    return torch.where(norms > 0, norms.reciprocal(), 1.0)


def _clip(norms: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    # Strictly greater, as DL4J: a norm at or under t gets exactly 1.0.
    return torch.where(norms > thresholds, thresholds / norms, 1.0)


@dataclass(frozen=True)
class RenormalizeL2PerLayer(ScalingRule):
    """DL4J ``RenormalizeL2PerLayer``: ``g_p ← g_p / ‖layer‖``; an all-zero layer stays zero.

    Examples:
        >>> layer = torch.nn.Linear(3, 2)
        >>> layer(torch.randn(4, 3)).sum().backward()
        >>> report = gradclip.normalize_(layer, gradclip.RenormalizeL2PerLayer())
        >>> grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
        >>> round(float(grads.norm()), 6)
        1.0
    """

    layer_local: ClassVar[bool] = True

    def uniform(self, layout: GroupLayout) -> bool:
        return len(layout.layer_names) == 1

    def scale(self, m: Measured, state: State) -> tuple[torch.Tensor, State]:
        assert m.layer_norms is not None
        return _renormalize(m.per_tensor(m.layer_norms)), state


@dataclass(frozen=True)
class RenormalizeL2PerParamType(ScalingRule):
    """DL4J ``RenormalizeL2PerParamType``: ``g_p ← g_p / ‖g_p‖``; an all-zero tensor stays zero."""

    layer_local: ClassVar[bool] = True

    def scale(self, m: Measured, state: State) -> tuple[torch.Tensor, State]:
        assert m.norms is not None
        return _renormalize(m.norms), state


@dataclass(frozen=True)
class _Thresholded(Rule):
    """A DL4J mode with a threshold; layers with different thresholds share one call."""

    threshold: float = 1.0
    per_layer_fields: ClassVar[tuple[str, ...]] = ("threshold",)
    layer_local: ClassVar[bool] = True

    def __post_init__(self) -> None:
        set_fields(self, threshold=check_threshold(self.threshold))


@dataclass(frozen=True)
class ClipL2PerLayer(_Thresholded, ScalingRule):
    """DL4J ``ClipL2PerLayer``: if ``‖layer‖ > t``, ``g_p ← g_p · (t / ‖layer‖)``.

    A layer at or under ``t`` is left bit-for-bit unchanged. On a model of a
    single layer this is ``torch.nn.utils.clip_grad_norm_(max_norm=t)`` without
    its ``1e-6``.

    Examples:
        >>> layer = torch.nn.Linear(3, 2)
        >>> layer.weight.grad = torch.full((2, 3), 4.0)
        >>> layer.bias.grad = torch.full((2,), 4.0)
        >>> report = gradclip.normalize_(layer, gradclip.ClipL2PerLayer(2.0))
        >>> round(float(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm()), 6)
        2.0
    """

    def uniform(self, layout: GroupLayout) -> bool:
        return len(layout.layer_names) == 1

    def scale(self, m: Measured, state: State) -> tuple[torch.Tensor, State]:
        assert m.layer_norms is not None
        return _clip(m.per_tensor(m.layer_norms), m.layout.tensor_values("threshold")), state


@dataclass(frozen=True)
class ClipL2PerParamType(_Thresholded, ScalingRule):
    """DL4J ``ClipL2PerParamType``: per tensor, if ``‖g_p‖ > t``, ``g_p ← g_p / (‖g_p‖ / t)``."""

    def scale(self, m: Measured, state: State) -> tuple[torch.Tensor, State]:
        assert m.norms is not None
        return _clip(m.norms, m.layout.tensor_values("threshold")), state


@dataclass(frozen=True)
class ClipElementWiseAbsoluteValue(_Thresholded, InPlaceRule):
    """DL4J ``ClipElementWiseAbsoluteValue``: every element ``x ← clamp(x, -t, t)``.

    One pass over memory: large tensors are clamped one by one with ``clamp_``;
    the many small ones with a constant number of ``_foreach`` launches. A
    threshold above a dtype's largest finite value leaves that dtype's tensors as
    they are. Norms are not measured (that would be an extra read of every
    gradient), and whether a layer changed is not known without one: the report
    reads ``None`` for it (``measure_all=True`` measures its norms, not the
    change), or ``True`` where another member of a `chain` changed the layer.
    """

    norm_type: ClassVar[float | None] = None
    squares: ClassVar[bool] = False

    def prepare(self, layout: GroupLayout) -> ClampPlan:
        thresholds = [float(rule.threshold) for rule in layout.rules]  # type: ignore[attr-defined]
        return plan_clamp(
            layout.devices,
            layout.dtypes,
            [shape.numel() for shape in layout.shapes],
            [thresholds[i] for i in layout.layer_of_tensor],
        )

    def transform_(self, m: Measured, state: State) -> tuple[torch.Tensor | None, State]:
        clamp_abs_(m.grads, m.prepared)
        return None, state


_MODE_RULES: dict[GradientNormalization, type[Rule]] = {
    GradientNormalization.NONE: NoNormalization,
    GradientNormalization.RENORMALIZE_L2_PER_LAYER: RenormalizeL2PerLayer,
    GradientNormalization.RENORMALIZE_L2_PER_PARAM_TYPE: RenormalizeL2PerParamType,
    GradientNormalization.CLIP_ELEMENT_WISE_ABSOLUTE_VALUE: ClipElementWiseAbsoluteValue,
    GradientNormalization.CLIP_L2_PER_LAYER: ClipL2PerLayer,
    GradientNormalization.CLIP_L2_PER_PARAM_TYPE: ClipL2PerParamType,
}


def resolve_rule(mode: object, threshold: Any = 1.0) -> Rule:
    """Turn what a user wrote for a mode into a rule.

    Args:
        mode: a `GradientNormalization` member, its DL4J or Python name
            (``"ClipL2PerLayer"``, ``"clip_l2_per_layer"``), ``None`` for no
            normalization, or a rule object (used as is: its own settings win
            over ``threshold``).
        threshold: the threshold of a DL4J mode; a finite number > 0.

    Returns:
        The rule.

    Raises:
        ValueError: unknown mode name, or invalid threshold.
        TypeError: ``mode`` or ``threshold`` of the wrong type.
    """
    if isinstance(mode, Rule):
        return mode
    if isinstance(mode, type) and issubclass(mode, Rule):
        raise TypeError(
            f"mode must be a strategy object (a rule value), got the class {mode.__name__}; "
            f"write {mode.__name__}(...) with its arguments"
        )
    if mode is not None and not isinstance(mode, str | GradientNormalization):
        raise TypeError(
            "mode must be a GradientNormalization member, a mode name such as "
            f"'ClipL2PerLayer', or a gradclip rule object; got {type(mode).__name__}"
        )
    return GradientNormalization.parse(mode).rule(check_threshold(threshold))


def resolve_override(value: Any, default_threshold: float, key: str) -> Rule:
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


def assign_rules(
    layers: Sequence[Layer], default: Rule, threshold: float, overrides: Mapping[str, Any]
) -> tuple[list[Rule], list[str | None]]:
    """Each layer's rule after the overrides, and the key that chose it (``None``: the
    default); see `gradclip.core.layers.match_overrides` for which key wins."""
    names = [layer.name for layer in layers]
    resolved = {key: resolve_override(value, threshold, key) for key, value in overrides.items()}
    chosen = match_overrides(names, overrides)
    rules = [resolved[chosen[n]] if n in chosen else default for n in names]
    return rules, [chosen.get(n) for n in names]


def layer_table(layers: Sequence[Layer], rules: Sequence[Rule]) -> str:
    """A table of the layers: name, parameters (with shapes), rule and its settings."""
    rows = [("layer", "parameters", "mode")]
    for layer, rule in zip(layers, rules):
        params = ", ".join(
            f"{name} {tuple(p.shape)}" for name, p in zip(layer.param_names, layer.params)
        )
        rows.append((layer.name or "(root)", params, rule.describe()))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)
