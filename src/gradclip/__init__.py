"""gradclip: Deeplearning4j's per-layer gradient normalization for PyTorch.

Six DL4J modes and further rules (global p-norm, AGC, AutoClip, ZClip,
chains), a default for the network and overrides per layer, applied in place
with a constant number of kernel launches and no host-device synchronization.

Examples:
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> net(torch.ones(3, 4)).sum().backward()
    >>> report = gradclip.normalize_(net, "ClipL2PerLayer", threshold=1.0)
    >>> sorted(report.layer_norms)
    ['0', '2']
"""

from gradclip.config import ConfigError
from gradclip.core.collective import RankMismatchError
from gradclip.core.identity import LoadResult, StateNotRestoredWarning
from gradclip.core.layers import Layer, build_layers
from gradclip.core.nonfinite import NonFiniteGradientError
from gradclip.core.report import NormReport
from gradclip.core.rule import (
    GroupLayout,
    InPlaceRule,
    Measured,
    Rule,
    ScalingRule,
    State,
)
from gradclip.normalize import normalize_
from gradclip.normalizer import GradientNormalizer
from gradclip.rules.adaptive import AutoClip, ZClip
from gradclip.rules.agc import AdaptiveGradClip
from gradclip.rules.chain import Chain, chain
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

__version__ = "0.5.0"

__all__ = [
    "AdaptiveGradClip",
    "AutoClip",
    "Chain",
    "ClipElementWiseAbsoluteValue",
    "ClipGlobalNorm",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
    "ConfigError",
    "GradientNormalization",
    "GradientNormalizer",
    "GroupLayout",
    "InPlaceRule",
    "Layer",
    "LoadResult",
    "Measured",
    "NoNormalization",
    "NonFiniteGradientError",
    "NormReport",
    "RankMismatchError",
    "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType",
    "Rule",
    "ScalingRule",
    "State",
    "StateNotRestoredWarning",
    "ZClip",
    "build_layers",
    "chain",
    "normalize_",
]
