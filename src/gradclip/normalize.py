"""``normalize_``: one call, in place, between ``loss.backward()`` and ``optimizer.step()``."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

from torch import nn

from gradclip.core.layers import Target
from gradclip.core.nonfinite import check_nonfinite
from gradclip.core.report import NormReport
from gradclip.normalizer import GradientNormalizer, Mode
from gradclip.rules.dl4j import resolve_rule

__all__ = ["normalize_"]

# normalize_ keeps a few normalizers per module so that calling it every step
# reuses the cached layout, and the state of adaptive rules, across calls.
_CACHE_PER_MODULE = 8
_cache: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Any, GradientNormalizer]] = (
    weakref.WeakKeyDictionary()
)


def normalize_(
    target: Target, mode: Mode, threshold: float = 1.0, *, nonfinite: str = "propagate"
) -> NormReport:
    """Normalize the gradients of ``target`` in place with one DL4J mode (or rule).

    The one-call form of `GradientNormalizer`, in the style of
    ``torch.nn.utils.clip_grad_norm_``: call it between ``loss.backward()`` and
    ``optimizer.step()``. For a module, the layout and the state of adaptive
    rules are kept across calls, per (module, rule, ``nonfinite``): the inline
    ``normalize_(model, gradclip.ZClip())`` keeps learning from step to step.

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
    if not isinstance(target, nn.Module):
        return GradientNormalizer(target, rule, nonfinite=nonfinite).apply()
    try:
        key: Any = (rule, nonfinite)
        hash(key)
    except TypeError:  # a rule that is not a frozen dataclass: one state per object
        key = (id(rule), nonfinite)
    per_module = _cache.setdefault(target, OrderedDict())
    normalizer = per_module.get(key)
    if normalizer is None:
        normalizer = GradientNormalizer(target, rule, nonfinite=nonfinite)
        normalizer._hold_weakly()
        per_module[key] = normalizer
        if len(per_module) > _CACHE_PER_MODULE:
            per_module.popitem(last=False)
    else:
        per_module.move_to_end(key)
    return normalizer.apply()
