"""Short names of the rules beyond DL4J, for ``--strategy`` on the command line."""

from __future__ import annotations

from collections.abc import Callable

from gradclip.core.rule import Rule
from gradclip.rules.adaptive import AutoClip, ZClip
from gradclip.rules.agc import AdaptiveGradClip
from gradclip.rules.global_norm import ClipGlobalNorm

__all__ = ["RULE_FACTORIES", "rule_from_name"]

#: Default-constructed rules by short name.
RULE_FACTORIES: dict[str, Callable[[], Rule]] = {
    "global": lambda: ClipGlobalNorm(1.0),
    "agc": AdaptiveGradClip,
    "autoclip": AutoClip,
    "zclip": ZClip,
}


def rule_from_name(name: str) -> Rule:
    """A default-constructed rule from a short name of `RULE_FACTORIES`.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    key = name.strip().lower()
    if key not in RULE_FACTORIES:
        raise ValueError(f"unknown rule {name!r}; known: {', '.join(sorted(RULE_FACTORIES))}")
    return RULE_FACTORIES[key]()
