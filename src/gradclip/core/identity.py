"""State identity: when a saved state belongs to a rule here.

The one definition, used by threshold schedules
(`gradclip.GradientNormalizer.reconfigure`, `gradclip.normalize_`), by
`gradclip.GradientNormalizer.load_state_dict` (strict or not) and by the
trainer callbacks' resumes:

* a stateful rule's state lives in a *slot* named by the rule's type and its
  *state-relevant fields*: every field except the per-layer ones (the DL4J
  thresholds, `Rule.per_layer_fields`) and the schedulable ones (a threshold
  or a cap that does not change what the statistics mean,
  `Rule.schedulable_fields`); a chain's member is also named by its position;
* each *row* of a slot covers layers: a per-layer row its layer, a group row
  the layers of its group (the layers no override key names, or those one
  key names);
* a saved row is restored into a row here when the slot names are equal and
  the row covers the same layers (names, parameter names and shapes).
  Anything else starts afresh. Stateless rules and their thresholds have no
  slot, so they never block a resume.

Examples:
    >>> from gradclip import ZClip
    >>> slot_name(ZClip(z_thresh=2.0)) == slot_name(ZClip(z_thresh=3.0, max_grad_norm=1.0))
    True
    >>> slot_name(ZClip(alpha=0.9)) == slot_name(ZClip(alpha=0.99))
    False
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.nn.parameter import is_lazy

from gradclip.core.layers import Layer
from gradclip.core.rule import Rule, stages_of

__all__ = [
    "GROUP_ROW",
    "LoadResult",
    "StateNotRestoredWarning",
    "group_row",
    "layer_signature",
    "legacy_slot_name",
    "match_rows",
    "row_key",
    "same_cover",
    "shape_of",
    "slot_name",
    "state_fields",
    "state_key",
]

GROUP_ROW = "*"  # the group row of the default rule's layers


def state_fields(rule: Rule) -> tuple[tuple[str, Any], ...]:
    """``(name, value)`` of the fields that define what ``rule``'s state means."""
    if not dataclasses.is_dataclass(rule):
        return ()
    skip = set(rule.per_layer_fields) | set(rule.schedulable_fields)
    return tuple(
        (f.name, getattr(rule, f.name)) for f in dataclasses.fields(rule) if f.name not in skip
    )


def slot_name(stage: Rule, position: int | None = None) -> str:
    """The name of a stateful rule's slot (``position``: its place in a chain)."""
    args = ", ".join(f"{name}={value!r}" for name, value in state_fields(stage))
    base = f"{type(stage).__name__}({args})"
    return base if position is None else f"chain[{position}].{base}"


def state_key(rule: Rule) -> Hashable:
    """Equal for two rules whose states are interchangeable (also stateless ones).

    Two rules with the same key differ at most in per-layer or schedulable
    fields: one may replace the other between steps without losing state.
    """
    stages = stages_of(rule)
    keys: list[Hashable] = []
    for stage in stages:
        if not dataclasses.is_dataclass(stage):
            keys.append((type(stage), id(stage)))
        else:
            keys.append((type(stage), state_fields(stage)))
    return (len(stages) > 1, tuple(keys))


def group_row(tag: str | None) -> str:
    """The group row of the layers an override key names (``tag``), or of the default's."""
    return GROUP_ROW if tag is None else f"{GROUP_ROW}[{tag}]"


def shape_of(param: torch.Tensor) -> str:
    """``"(8, 4)"``; ``"(?)"`` for a lazy module's parameter before its first forward."""
    return "(?)" if is_lazy(param) else str(tuple(param.shape))


def same_cover(a: Sequence[str], b: Sequence[str]) -> bool:
    """Equal layer signatures, where a shape ``(?)`` (not known yet) matches any shape."""
    if list(a) == list(b):
        return True
    wild = r"\([^()]*\)"
    return len(a) == len(b) and all(
        re.fullmatch(re.escape(x).replace(re.escape("(?)"), wild), y) is not None
        or re.fullmatch(re.escape(y).replace(re.escape("(?)"), wild), x) is not None
        for x, y in zip(a, b)
    )


def layer_signature(layer: Layer) -> str:
    """A layer as a row's cover records it: ``"name: weight(8, 4), bias(8,)"``."""
    params = ", ".join(f"{n}{shape_of(p)}" for n, p in zip(layer.param_names, layer.params))
    return f"{layer.name}: {params}"


def row_key(slot: str, row: str) -> str:
    """How a row is named in `LoadResult` and in warnings."""
    return f"{slot}[{row!r}]"


class StateNotRestoredWarning(UserWarning):
    """A resume left some of the rules' saved state: those rules start afresh.

    The trainer callbacks warn with it and keep training. To make such a
    mismatch an error instead::

        warnings.simplefilter("error", gradclip.StateNotRestoredWarning)
    """


class LoadResult(NamedTuple):
    """What `gradclip.GradientNormalizer.load_state_dict` left, as torch's ``Module`` does.

    Attributes:
        missing_keys: state rows of this normalizer that start afresh.
        unexpected_keys: saved rows that no rule here takes.
        reasons: for each of those keys, why.
    """

    missing_keys: list[str]
    unexpected_keys: list[str]
    reasons: dict[str, str]

    def describe(self) -> str:
        """One line per row left, with the reason (empty if nothing was left)."""
        keys = dict.fromkeys([*self.missing_keys, *self.unexpected_keys])
        return "; ".join(f"{key}: {self.reasons[key]}" for key in keys)


def match_rows(
    saved: Mapping[str, Any], current: Mapping[str, Mapping[str, Sequence[str]]]
) -> tuple[dict[str, list[str]], LoadResult]:
    """Which saved rows restore which rows here, by the definition of the module docstring.

    Args:
        saved: the ``"rules"`` of a state dict: ``{slot: {"rows": ..., "covers": ...}}``.
        current: ``{slot: {row: covered layer signatures}}`` of this normalizer.

    Returns:
        ``{slot: [rows to restore]}`` and what is left.

    Raises:
        ValueError: ``saved`` is malformed.
    """
    matched: dict[str, list[str]] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    reasons: dict[str, str] = {}
    for name, entry in saved.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("rows"), Mapping):
            raise ValueError(f"state of {name}: expected a mapping with 'steps' and 'rows'")
        covers = entry.get("covers")
        if not isinstance(covers, Mapping) or set(covers) != set(entry["rows"]):
            raise ValueError(f"state of {name}: expected 'covers', the layers of each row")
        mine = current.get(name)
        for row in entry["rows"]:
            key = row_key(name, row)
            if mine is None:
                unexpected.append(key)
                reasons[key] = "no rule here keeps this state (another rule or setting)"
            elif row not in mine:
                unexpected.append(key)
                reasons[key] = "no group here has this row (another grouping or model)"
            elif not same_cover(covers[row], mine[row]):
                unexpected.append(key)
                reasons[key] = (
                    f"it covers {list(covers[row])}, here the row covers {list(mine[row])}"
                )
            else:
                matched.setdefault(name, []).append(row)
    for name, rows in current.items():
        for row in rows:
            if row not in matched.get(name, ()):
                key = row_key(name, row)
                missing.append(key)
                reasons.setdefault(
                    key,
                    "the saved state has no row of this rule for these layers"
                    if name in saved
                    else f"no saved state of this rule (the saved ones: {sorted(saved)})",
                )
    return matched, LoadResult(missing, unexpected, reasons)


def legacy_slot_name(group_rule: Rule, position: int, stage: Rule, many: bool) -> str:
    """The slot name format version 2 (gradclip 0.2) gave this stage: every field but the
    per-layer ones, and for a chain member the whole chain and the position."""
    if many:
        return f"{group_rule.describe()}[{position}]"
    if not dataclasses.is_dataclass(stage):
        return type(stage).__name__
    args = ", ".join(
        f"{f.name}={getattr(stage, f.name)!r}"
        for f in dataclasses.fields(stage)
        if f.name not in stage.per_layer_fields
    )
    return f"{type(stage).__name__}({args})"
