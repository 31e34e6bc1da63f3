"""Several rules applied one after the other to the same layers (optax's ``chain``).

``chain(a, b, c)`` applies ``a``, then ``b`` to the gradients ``a`` left, then
``c``. The engine runs the ``k``-th member of every chain in its ``k``-th
round, with the same grouped launches as any other rule, and measures the norms
again before a member that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradclip.core.rule import Composite, Rule
from gradclip.rules.dl4j import resolve_rule

__all__ = ["Chain", "chain"]


@dataclass(frozen=True)
class Chain(Composite):
    """Rules applied in order to the same layers; build it with `chain`.

    Attributes:
        rules: the members, in order.
    """

    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("chain() needs at least one rule")
        for i, member in enumerate(self.rules):
            if not isinstance(member, Rule):
                raise TypeError(f"chain member {i} is not a rule: {member!r}")

    def describe(self) -> str:
        return f"chain({', '.join(rule.describe() for rule in self.rules)})"


def _as_rule(item: Any, index: int) -> Rule:
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(
                f"chain item {index} must be a rule, a mode name or a (mode, threshold) pair, "
                f"got {item!r}"
            )
        return resolve_rule(item[0], item[1])
    return resolve_rule(item)


def chain(*rules: Any) -> Chain:
    """Apply several rules in order to the same layers (optax's ``chain``).

    Each rule sees the gradients as the previous one left them; norms are
    measured again before every later rule that reads them. The report keeps
    the norms measured before the first rule. Stateful members keep their own
    state, saved with the normalizer's.

    Args:
        *rules: rule objects, DL4J mode names (with the default threshold 1.0)
            or ``(mode, threshold)`` pairs.

    Returns:
        A rule usable wherever a mode is (``normalize_``, the default of a
        ``GradientNormalizer``, an override).

    Raises:
        ValueError: no rule given.

    Examples:
        >>> clip = gradclip.chain(("ClipElementWiseAbsoluteValue", 0.5), "ClipL2PerLayer")
        >>> print(clip.describe())
        chain(ClipElementWiseAbsoluteValue(threshold=0.5), ClipL2PerLayer(threshold=1.0))
    """
    if not rules:
        raise ValueError("chain() needs at least one rule")
    return Chain(tuple(_as_rule(rule, i) for i, rule in enumerate(rules)))
