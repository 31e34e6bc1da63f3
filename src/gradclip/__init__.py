"""gradclip: Deeplearning4j's per-layer gradient normalization for PyTorch.

Six DL4J modes (and further strategies), a default for the network and
overrides per layer, applied in place with a constant number of kernel
launches and no host-device synchronization.

Example:
    >>> import gradclip
    >>> loss.backward()
    >>> report = gradclip.normalize_(model, "ClipL2PerLayer", threshold=1.0)
    >>> optimizer.step()
"""

from gradclip.adaptive import AutoClip, StatefulStrategy, ZClip
from gradclip.agc import AdaptiveGradClip
from gradclip.compose import STRATEGY_FACTORIES, Chain, chain, strategy_from_name
from gradclip.global_norm import ClipGlobalNorm
from gradclip.layers import Layer, build_layers
from gradclip.modes import (
    ClipElementWiseAbsoluteValue,
    ClipL2PerLayer,
    ClipL2PerParamType,
    GradientNormalization,
    NoNormalization,
    RenormalizeL2PerLayer,
    RenormalizeL2PerParamType,
)
from gradclip.normalizer import GradientNormalizer, normalize_
from gradclip.report import NormReport
from gradclip.strategy import GroupView, Strategy

__version__ = "0.1.0"

__all__ = [
    "STRATEGY_FACTORIES",
    "AdaptiveGradClip",
    "AutoClip",
    "Chain",
    "ClipElementWiseAbsoluteValue",
    "ClipGlobalNorm",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
    "GradientNormalization",
    "GradientNormalizer",
    "GroupView",
    "Layer",
    "NoNormalization",
    "NormReport",
    "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType",
    "StatefulStrategy",
    "Strategy",
    "ZClip",
    "build_layers",
    "chain",
    "normalize_",
    "strategy_from_name",
]
