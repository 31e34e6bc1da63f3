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

from gradclip.core.layers import Layer, build_layers
from gradclip.core.report import NormReport
from gradclip.core.rule import GroupView, Strategy
from gradclip.normalizer import GradientNormalizer, normalize_
from gradclip.rules.adaptive import AutoClip, StatefulStrategy, ZClip
from gradclip.rules.agc import AdaptiveGradClip
from gradclip.rules.chain import STRATEGY_FACTORIES, Chain, chain, strategy_from_name
from gradclip.rules.dl4j import (
    ClipElementWiseAbsoluteValue,
    ClipL2PerLayer,
    ClipL2PerParamType,
    GradientNormalization,
    NoNormalization,
    RenormalizeL2PerLayer,
    RenormalizeL2PerParamType,
)
from gradclip.rules.global_norm import ClipGlobalNorm

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
