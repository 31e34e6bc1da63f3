"""Warnings for calls that run without error but are most likely not what was meant.

Each warning's text is fixed, so that Python's default filter shows it once
per place in the user's code that triggers it, however many steps repeat it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gradclip.core.layers import Layer
from gradclip.core.report import NormReport
from gradclip.core.rule import Rule
from gradclip.rules.adaptive import AutoClip, ZClip
from gradclip.rules.chain import Chain
from gradclip.rules.dl4j import (
    ClipL2PerLayer,
    ClipL2PerParamType,
    RenormalizeL2PerLayer,
    RenormalizeL2PerParamType,
)

__all__ = [
    "NO_GRADIENTS",
    "ONE_FLAT_LAYER",
    "reads_layers",
    "warn_if_no_gradients",
    "warn_if_one_flat_layer",
]

NO_GRADIENTS = (
    "apply() found no gradient on any of the normalizer's parameters, so nothing was "
    "normalized: call it after loss.backward() and before optimizer.zero_grad()"
)
ONE_FLAT_LAYER = (
    "a per-layer rule was given a flat list of parameters (such as model.parameters()), "
    "which is one layer: every parameter is normalized by one norm, as clip_grad_norm_ "
    "does. Pass the model itself for one norm per layer (DL4J's behaviour), or a dict "
    "{name: parameters} / a list of parameter lists to choose the layers"
)

_PER_LAYER = (ClipL2PerLayer, ClipL2PerParamType, RenormalizeL2PerLayer, RenormalizeL2PerParamType)


def reads_layers(rule: Rule) -> bool:
    """Whether ``rule`` gives each layer (or parameter type) its own norm or state.

    Examples:
        >>> reads_layers(gradclip.ClipL2PerLayer(1.0)), reads_layers(gradclip.ClipGlobalNorm(1.0))
        (True, False)
        >>> reads_layers(gradclip.chain(gradclip.ZClip(), gradclip.AutoClip(scope="layer")))
        True
    """
    if isinstance(rule, Chain):
        return any(reads_layers(member) for member in rule.rules)
    if isinstance(rule, AutoClip | ZClip):
        return rule.scope == "layer"
    return isinstance(rule, _PER_LAYER)


def warn_if_one_flat_layer(target: object, layers: Sequence[Layer], rules: Sequence[Rule]) -> None:
    """Warn when a flat parameter list (one layer of several tensors) meets a per-layer rule."""
    flat = not isinstance(target, nn.Module | Mapping | torch.Tensor)
    one = [layer.name for layer in layers] == [""] and len(layers[0].params) > 1
    if flat and one and any(map(reads_layers, rules)):
        warnings.warn(ONE_FLAT_LAYER, UserWarning, stacklevel=4)


def warn_if_no_gradients(normalizer: Any, report: NormReport) -> None:
    """Warn, once per normalizer, when a step found no gradient on any of its parameters."""
    if report.tensor_norms.numel() or not normalizer._engine.params:
        return
    if not getattr(normalizer, "_warned_no_gradients", False):
        normalizer._warned_no_gradients = True
        if not torch.compiler.is_compiling():
            warnings.warn(NO_GRADIENTS, UserWarning, stacklevel=4)
