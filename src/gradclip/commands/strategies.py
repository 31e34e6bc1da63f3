"""The rule names the command line accepts (`demo --strategy`, `bench`).

A name is a DL4J mode (`ClipL2PerLayer`, in any of its spellings) or one of the
short names of `STRATEGY_FACTORIES` for the rules beyond DL4J.

Examples:
    >>> strategy_from_name("ClipL2PerParamType", threshold=0.5)
    ClipL2PerParamType(threshold=0.5)
    >>> strategy_from_name("global", threshold=2.0)
    ClipGlobalNorm(max_norm=2.0, norm_type=2.0)
    >>> strategy_from_name("AGC")
    AdaptiveGradClip(clipping=0.01, eps=0.001)
"""

from __future__ import annotations

from collections.abc import Callable

from gradclip.core.rule import Rule
from gradclip.rules.adaptive import AutoClip, ZClip
from gradclip.rules.agc import AdaptiveGradClip
from gradclip.rules.dl4j import GradientNormalization
from gradclip.rules.global_norm import ClipGlobalNorm

__all__ = ["STRATEGY_FACTORIES", "strategy_from_name", "strategy_names"]

#: Short name -> factory taking the command's threshold. `global` is torch's
#: global-norm clip with that threshold; the adaptive rules set their own scale
#: and keep their defaults (AGC's `clipping=0.01` is a ratio, not a norm).
STRATEGY_FACTORIES: dict[str, Callable[[float], Rule]] = {
    "global": lambda threshold: ClipGlobalNorm(threshold),
    "agc": lambda _threshold: AdaptiveGradClip(),
    "autoclip": lambda _threshold: AutoClip(),
    "zclip": lambda _threshold: ZClip(),
}


def strategy_names() -> list[str]:
    """Every accepted name: the six DL4J modes, then the short names.

    Examples:
        >>> strategy_names()[-4:]
        ['global', 'agc', 'autoclip', 'zclip']
    """
    return [mode.value for mode in GradientNormalization] + list(STRATEGY_FACTORIES)


def strategy_from_name(name: str, threshold: float = 1.0) -> Rule:
    """The rule a command-line name stands for.

    Args:
        name: a DL4J mode name (any spelling, see `GradientNormalization`) or a
            short name of `STRATEGY_FACTORIES` (any case).
        threshold: the threshold of a DL4J mode, and `global`'s `max_norm`.

    Returns:
        A new rule object.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    key = name.strip().lower()
    if key in STRATEGY_FACTORIES:
        return STRATEGY_FACTORIES[key](threshold)
    try:
        mode = GradientNormalization(name.strip())
    except ValueError:
        raise ValueError(
            f"unknown strategy {name!r}; choose one of: {', '.join(strategy_names())}"
        ) from None
    return mode.rule(threshold)
