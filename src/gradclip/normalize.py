"""``normalize_``: one call, in place, between ``loss.backward()`` and ``optimizer.step()``."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradclip.core.identity import state_key
from gradclip.core.layers import Target, reusable
from gradclip.core.nonfinite import check_nonfinite
from gradclip.core.report import NormReport
from gradclip.core.state import StateStore
from gradclip.normalizer import GradientNormalizer, Mode
from gradclip.rules.dl4j import resolve_rule

__all__ = ["normalize_"]

# normalize_ keeps a few normalizers per module so that calling it every step
# reuses the cached layout, and the state of adaptive rules, across calls.
_CACHE_PER_TARGET = 8
_cache: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Any, GradientNormalizer]] = (
    weakref.WeakKeyDictionary()
)
# Other targets (model.parameters(), a list, a {name: module} dict) are keyed by the
# modules and tensors they name, held weakly: a normalizer would hold its tensors
# strongly, so only the rules' state is kept, and the entry goes with any of them.
_by_holders: dict[tuple[Any, ...], _Entry] = {}


class _Entry:
    """The rules' states of one non-module target, per (state identity, ``nonfinite``)."""

    def __init__(self, key: tuple[Any, ...], holders: list[Any]) -> None:
        def forget(_: Any, key: tuple[Any, ...] = key) -> None:
            _by_holders.pop(key, None)

        self.refs = [weakref.ref(h, forget) for h in holders]
        self.stores: OrderedDict[Any, StateStore] = OrderedDict()


def _holders(target: Target) -> tuple[tuple[Any, ...], list[Any]]:
    """A key naming ``target``'s modules and tensors by identity, and those objects.

    A module in a grouping stands for whatever parameters it holds now (a
    replaced parameter keeps its state, as with a module target); a tensor for
    itself.
    """
    holders: list[Any] = []

    def key_of(value: Any) -> Any:
        if isinstance(value, nn.Module | torch.Tensor):
            holders.append(value)
            return id(value)
        if isinstance(value, Mapping):
            return ("map", tuple((name, key_of(v)) for name, v in value.items()))
        if isinstance(value, list | tuple):
            return ("seq", tuple(key_of(v) for v in value))
        raise TypeError(type(value).__name__)

    return (key_of(target),), holders


def _rule_key(rule: Any, nonfinite: str) -> Any:
    """The cache key of a rule: its state identity (rules differing only in thresholds or
    caps share one normalizer, reconfigured), or the object for an unhashable rule."""
    try:
        key: Any = (state_key(rule), nonfinite)
        hash(key)
    except TypeError:  # a rule that is not a frozen dataclass: one state per object
        key = (id(rule), nonfinite)
    return key


def normalize_(
    target: Target, mode: Mode, threshold: float = 1.0, *, nonfinite: str = "propagate"
) -> NormReport:
    """Normalize the gradients of ``target`` in place with one DL4J mode (or rule).

    The one-call form of `GradientNormalizer`, in the style of
    ``torch.nn.utils.clip_grad_norm_``: call it between ``loss.backward()`` and
    ``optimizer.step()``. The state of adaptive rules is kept across calls,
    per target and rule, whatever the target's form: the inline
    ``normalize_(model, gradclip.ZClip())``, ``normalize_(model.parameters(),
    gradclip.ZClip())`` or ``normalize_({"enc": enc, "head": head}, ...)``
    keeps learning from step to step. The same parameters (or modules) get the
    same state, different ones never share it, and nothing here keeps them
    alive. A rule that differs from the last call's only in a threshold or a
    cap (a schedule: ``ZClip(max_grad_norm=schedule[step])``) keeps the state
    (see `gradclip.core.identity`). For a module, the layout is kept too.

    Args:
        target: an ``nn.Module`` (one layer per module owning parameters), a
            mapping ``{layer_name: params}``, a list of parameter lists, or a flat
            iterable of parameters (one layer).
        mode: a `GradientNormalization`, a DL4J name such as ``"ClipL2PerLayer"``,
            ``None``, or a rule object.
        threshold: a finite number > 0; ignored by the renormalize modes.
        nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``, see
            `gradclip.core.nonfinite` (``"skip"`` needs an optimizer: use
            ``GradientNormalizer(..., nonfinite="skip").attach(optimizer)``).

    Returns:
        The `NormReport` of norms measured before normalization.

    Examples:
        >>> net = torch.nn.Linear(4, 2)
        >>> net.weight.grad, net.bias.grad = torch.full((2, 4), 3.0), torch.full((2,), 4.0)
        >>> report = gradclip.normalize_(net, "ClipL2PerLayer", threshold=1.0)
        >>> round(float(report.layer_norms[""]), 3), report.changed_layers()
        (10.198, [''])
        >>> round(float(torch.cat([net.weight.grad.flatten(), net.bias.grad]).norm()), 6)
        1.0

    References:
        Deeplearning4j, ``GradientNormalization``; Pascanu et al., ICML 2013.
    """
    if check_nonfinite(nonfinite) == "skip":
        raise ValueError(
            "nonfinite='skip' skips an optimizer step, so it needs an optimizer: use "
            "GradientNormalizer(model, mode, nonfinite='skip').attach(optimizer)"
        )
    rule = resolve_rule(mode, threshold)
    key = _rule_key(rule, nonfinite)
    if not isinstance(target, nn.Module):
        return _apply_grouping(target, rule, key, nonfinite)
    per_module = _cache.setdefault(target, OrderedDict())
    normalizer = per_module.get(key)
    if normalizer is None:
        normalizer = GradientNormalizer(target, rule, nonfinite=nonfinite)
        normalizer._hold_weakly()
        per_module[key] = normalizer
        if len(per_module) > _CACHE_PER_TARGET:
            per_module.popitem(last=False)
    else:
        per_module.move_to_end(key)
        if normalizer.default != rule:  # a scheduled threshold or cap: the state is kept
            normalizer.reconfigure(rule)
    return normalizer.apply()


def _apply_grouping(target: Target, rule: Any, key: Any, nonfinite: str) -> NormReport:
    target = reusable(target)  # an iterator is walked once
    try:
        holders_key, holders = _holders(target)
    except TypeError:  # not a grouping: GradientNormalizer says what is wrong
        return GradientNormalizer(target, rule, nonfinite=nonfinite).apply()
    entry = _by_holders.get(holders_key)
    if entry is None or any(ref() is not h for ref, h in zip(entry.refs, holders)):
        entry = _by_holders[holders_key] = _Entry(holders_key, holders)
    store = entry.stores.get(key)
    normalizer = GradientNormalizer._sharing(target, rule, nonfinite, store)
    entry.stores[key] = normalizer._engine.store
    entry.stores.move_to_end(key)
    if len(entry.stores) > _CACHE_PER_TARGET:
        entry.stores.popitem(last=False)
    return normalizer.apply()
