"""Deeplearning4j's six gradient normalization modes.

``g`` is a gradient tensor, ``t`` the threshold, ``‖·‖`` the L2 norm and
``‖layer‖ = sqrt(Σ_p ‖g_p‖²)`` the norm of all of a layer's gradients together.

================================  ==============================================
mode                              effect
================================  ==============================================
``None``                          nothing
``RenormalizeL2PerLayer``         ``g_p ← g_p / ‖layer‖`` (``t`` ignored)
``RenormalizeL2PerParamType``     ``g_p ← g_p / ‖g_p‖`` (``t`` ignored)
``ClipElementWiseAbsoluteValue``  ``x ← clamp(x, -t, t)`` for every element
``ClipL2PerLayer``                if ``‖layer‖ > t``: ``g_p ← g_p · t / ‖layer‖``
``ClipL2PerParamType``            if ``‖g_p‖ > t``: ``g_p ← g_p · t / ‖g_p‖``
================================  ==============================================

Where DL4J leaves a tensor alone, so does gradclip, bit for bit: the
coefficient it multiplies in is exactly ``1.0``. Where DL4J 1.0.0-beta would
divide zero by zero (renormalizing an all-zero layer), gradclip leaves the zeros
as they are instead of producing NaN. A norm that overflows float32 (a tensor
whose L2 norm exceeds about 3.4e38 while every element is finite) reads
``inf``; the coefficient is then ``t / inf = 0`` and the gradient becomes all
zeros — never NaN, the same outcome as ``torch.nn.utils.clip_grad_norm_``.

References:
    Deeplearning4j, ``org.deeplearning4j.nn.conf.GradientNormalization`` and
    ``TestGradientNormalization``.
    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013 (norm clipping).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from gradclip.core.kernels import clamp_abs_, plan_clamp
from gradclip.core.rule import GroupView, Strategy
from gradclip.core.validation import check_threshold

__all__ = [
    "ClipElementWiseAbsoluteValue",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
    "GradientNormalization",
    "NoNormalization",
    "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType",
    "resolve_strategy",
]


def _normalized_key(text: str) -> str:
    return text.replace("_", "").replace("-", "").replace(" ", "").lower()


class GradientNormalization(str, enum.Enum):
    """The six modes of DL4J's ``GradientNormalization`` enum.

    Members are named in Python style and valued with DL4J's spelling;
    ``GradientNormalization("ClipL2PerLayer")``, ``GradientNormalization("clip_l2_per_layer")``
    and ``GradientNormalization.CLIP_L2_PER_LAYER`` are the same member.

    Example:
        >>> GradientNormalization("ClipL2PerLayer") is GradientNormalization.CLIP_L2_PER_LAYER
        True
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
            raise ValueError(
                f"unknown gradient normalization mode {value!r}; valid modes (DL4J / Python "
                f"spelling) are: {names}, or a gradclip.Strategy object"
            ) from None

    @property
    def uses_threshold(self) -> bool:
        """Whether the mode reads its threshold (the two renormalizations and None do not)."""
        return self in (
            GradientNormalization.CLIP_ELEMENT_WISE_ABSOLUTE_VALUE,
            GradientNormalization.CLIP_L2_PER_LAYER,
            GradientNormalization.CLIP_L2_PER_PARAM_TYPE,
        )

    def strategy(self, threshold: float = 1.0) -> Strategy:
        """The strategy object that implements this mode."""
        return _MODE_CLASSES[self](threshold)

    def __str__(self) -> str:
        return self.value


class _DL4JStrategy(Strategy):
    """Shared plumbing of the DL4J modes: one validated threshold, batchable."""

    batchable = True
    mode: ClassVar[GradientNormalization]

    def __init__(self, threshold: float = 1.0) -> None:
        self.threshold = check_threshold(threshold)

    def config(self) -> Mapping[str, Any]:
        if not self.mode.uses_threshold:
            return {}
        return {"threshold": self.threshold}


def _renormalize(norms: torch.Tensor) -> torch.Tensor:
    # 1/norm, but an all-zero tensor keeps coefficient 1 (DL4J 1.0.0-beta would
    # produce 0/0 = NaN there). A NaN norm also gets 1, so NaN propagates as is.
    return torch.where(norms > 0, norms.reciprocal(), torch.ones_like(norms))


def _clip(norms: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    # Strictly greater, as DL4J: a norm at or under t gets exactly 1.0.
    return torch.where(norms > thresholds, thresholds / norms, torch.ones_like(norms))


class NoNormalization(_DL4JStrategy):
    """DL4J ``None``: the gradients are left as they are (and not even read)."""

    mode = GradientNormalization.NONE
    name = "None"
    measures_norms = False
    scales = False

    def transform_(self, view: GroupView) -> None:
        return None

    def layer_changed(self, view: GroupView) -> torch.Tensor | None:
        return torch.zeros(len(view.layer_names), dtype=torch.bool, device=view.device)


class RenormalizeL2PerLayer(_DL4JStrategy):
    """DL4J ``RenormalizeL2PerLayer``: ``g_p ← g_p / ‖layer‖``; the threshold is ignored.

    An all-zero layer stays all zero.

    Example:
        >>> layer = torch.nn.Linear(3, 2)
        >>> layer(torch.randn(4, 3)).sum().backward()
        >>> report = gradclip.normalize_(layer, RenormalizeL2PerLayer())
        >>> grads = torch.cat([p.grad.flatten() for p in layer.parameters()])
        >>> round(float(grads.norm()), 6)
        1.0
    """

    mode = GradientNormalization.RENORMALIZE_L2_PER_LAYER
    name = "RenormalizeL2PerLayer"

    def scale(self, view: GroupView) -> torch.Tensor:
        return _renormalize(view.layer_norm_per_tensor)


class RenormalizeL2PerParamType(_DL4JStrategy):
    """DL4J ``RenormalizeL2PerParamType``: ``g_p ← g_p / ‖g_p‖``; the threshold is ignored.

    An all-zero tensor stays all zero.
    """

    mode = GradientNormalization.RENORMALIZE_L2_PER_PARAM_TYPE
    name = "RenormalizeL2PerParamType"

    def scale(self, view: GroupView) -> torch.Tensor:
        return _renormalize(view.norms())


class ClipL2PerLayer(_DL4JStrategy):
    """DL4J ``ClipL2PerLayer``: if ``‖layer‖ > t``, ``g_p ← g_p · t / ‖layer‖``.

    A layer whose norm is at or under ``t`` is left bit-for-bit unchanged. On a
    model of a single layer this is ``torch.nn.utils.clip_grad_norm_(max_norm=t)``
    without its ``1e-6`` epsilon.
    """

    mode = GradientNormalization.CLIP_L2_PER_LAYER
    name = "ClipL2PerLayer"

    def scale(self, view: GroupView) -> torch.Tensor:
        return _clip(view.layer_norm_per_tensor, view.tensor_thresholds)


class ClipL2PerParamType(_DL4JStrategy):
    """DL4J ``ClipL2PerParamType``: per tensor, if ``‖g_p‖ > t``, ``g_p ← g_p · t / ‖g_p‖``."""

    mode = GradientNormalization.CLIP_L2_PER_PARAM_TYPE
    name = "ClipL2PerParamType"

    def scale(self, view: GroupView) -> torch.Tensor:
        return _clip(view.norms(), view.tensor_thresholds)


class ClipElementWiseAbsoluteValue(_DL4JStrategy):
    """DL4J ``ClipElementWiseAbsoluteValue``: every element ``x ← clamp(x, -t, t)``.

    One pass over memory: tensors large enough that a second pass would cost
    more than a kernel launch are clamped one by one with ``clamp_``; the many
    small ones are clamped with a constant number of ``_foreach`` launches.
    Norms are not measured (that would be an extra read of every gradient), so
    the report lists these layers as not measured unless the normalizer was
    built with ``measure_all=True``.
    """

    mode = GradientNormalization.CLIP_ELEMENT_WISE_ABSOLUTE_VALUE
    name = "ClipElementWiseAbsoluteValue"
    measures_norms = False
    scales = False
    reports_changes = False

    def transform_(self, view: GroupView) -> None:
        plan = view.cache.get("clamp")
        if plan is None:
            plan = view.cache["clamp"] = plan_clamp(view.grads, view.host_thresholds)
        clamp_abs_(view.grads, view.host_thresholds, plan)


_MODE_CLASSES: dict[GradientNormalization, type[_DL4JStrategy]] = {
    cls.mode: cls
    for cls in (
        NoNormalization,
        RenormalizeL2PerLayer,
        RenormalizeL2PerParamType,
        ClipElementWiseAbsoluteValue,
        ClipL2PerLayer,
        ClipL2PerParamType,
    )
}


def resolve_strategy(mode: object, threshold: Any = 1.0) -> Strategy:
    """Turn what a user wrote for a mode into a `Strategy`.

    Args:
        mode: a `GradientNormalization` member, its DL4J or Python name
            (``"ClipL2PerLayer"``, ``"clip_l2_per_layer"``), ``None`` for no
            normalization, or a `Strategy` object (used as is; its own
            hyper-parameters win over ``threshold``).
        threshold: the threshold for a DL4J mode; must be a finite number > 0.

    Returns:
        The strategy.

    Raises:
        ValueError: unknown mode name, or invalid threshold.
        TypeError: ``mode`` or ``threshold`` of the wrong type.
    """
    if isinstance(mode, Strategy):
        return mode
    if isinstance(mode, type) and issubclass(mode, Strategy):
        raise TypeError(
            f"mode must be a strategy object, got the class {mode.__name__}; "
            f"write {mode.__name__}(...) with its arguments"
        )
    if mode is not None and not isinstance(mode, str | GradientNormalization):
        raise TypeError(
            "mode must be a GradientNormalization member, a mode name such as "
            f"'ClipL2PerLayer', or a gradclip.Strategy object; got {type(mode).__name__}"
        )
    member = GradientNormalization.parse(mode)
    return member.strategy(check_threshold(threshold))
