"""Argument checks shared by every entry point.

Everything here runs before a gradient is touched, so that a call that raises
leaves every gradient exactly as it was.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["check_gradient", "check_threshold", "check_writable"]


def check_threshold(threshold: Any, *, what: str = "threshold") -> float:
    """Return ``threshold`` as a float, or raise if it is not a finite number > 0.

    Args:
        threshold: the value to check. Python and NumPy numbers and 0-d CPU
            tensors are accepted; bools, strings and ``None`` are not.
        what: how to name the value in the error message.

    Returns:
        The threshold as a Python float.

    Raises:
        TypeError: the value is not a real number.
        ValueError: the value is NaN, infinite, zero or negative.
    """
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1 or threshold.is_complex() or threshold.device.type != "cpu":
            raise TypeError(
                f"{what} must be a real number (a Python float or a 0-d CPU tensor), "
                f"got a tensor of shape {tuple(threshold.shape)} on {threshold.device}"
            )
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(
            f"{what} must be a real number such as 1.0, got {type(threshold).__name__} "
            f"{threshold!r}"
        )
    value = float(threshold)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return value


def check_gradient(name: str, grad: torch.Tensor) -> None:
    """Raise if ``grad`` is a gradient gradclip cannot normalize.

    Sparse and complex gradients are refused: DL4J's norms are defined for dense
    real arrays, and silently densifying a sparse embedding gradient would cost
    memory the caller did not plan for.
    """
    if grad.layout is not torch.strided:
        raise TypeError(
            f"gradient of {name!r} has layout {grad.layout}; gradclip normalizes dense "
            "gradients only. Use a dense embedding (sparse=False) or exclude this parameter "
            "with a custom grouping."
        )
    if grad.is_complex():
        raise TypeError(
            f"gradient of {name!r} is complex ({grad.dtype}); gradclip normalizes real "
            "gradients only. Exclude this parameter with a custom grouping, or view it as "
            "real with torch.view_as_real before normalizing."
        )


#: ``torch._debug_has_internal_overlap``'s answer for a tensor some of whose
#: elements share one memory location
_OVERLAPS = 1


def check_writable(name: str, grad: torch.Tensor) -> None:
    """Raise if ``grad`` cannot be normalized in place: some of its elements share memory.

    An expanded view (``torch.ones(1).expand(8)``) or another overlapping view,
    assigned to ``.grad`` by hand (autograd never makes one), would be written
    more than once; PyTorch refuses such writes, and an engine that met one in
    the middle of its multiply would leave the gradients before it scaled and
    the rest not. Checked with the other gradients, before any is modified.

    Raises:
        RuntimeError: ``grad`` has internal overlap.

    Examples:
        >>> check_writable("ok", torch.zeros(3))
        >>> check_writable("b", torch.zeros(1).expand(3))
        Traceback (most recent call last):
        ...
        RuntimeError: gradient of 'b' has elements that share memory (an expanded or overlapping view): normalizing it in place would write them more than once. Assign a gradient of its own memory instead, e.g. p.grad = grad.clone().
    """  # noqa: E501
    # plain tensors only: a tensor subclass (DTensor) is checked by its own in-place ops
    if type(grad) is torch.Tensor and torch._debug_has_internal_overlap(grad) == _OVERLAPS:
        raise RuntimeError(
            f"gradient of {name!r} has elements that share memory (an expanded or "
            "overlapping view): normalizing it in place would write them more than once. "
            "Assign a gradient of its own memory instead, e.g. p.grad = grad.clone()."
        )


def check_coefficients(rule: Any, returned: object, tensors: int) -> torch.Tensor:
    """The coefficients of a `ScalingRule.scale` result, or an error that says what to return.

    ``returned`` must be a ``(coefficients, state)`` pair with one coefficient
    per gradient tensor of the rule's layers: shape ``(tensors,)``. Only the
    shape is read (no value), before any gradient or state is written.

    Args:
        rule: the rule (its ``describe()`` names it in an error).
        returned: what its ``scale`` returned.
        tensors: the number of gradient tensors of its layers.

    Raises:
        TypeError: not a pair, or the coefficients are not a tensor.
        ValueError: the coefficients have another shape.

    Examples:
        >>> rule = gradclip.ClipL2PerLayer(1.0)
        >>> check_coefficients(rule, (torch.ones(3), {}), 3).shape
        torch.Size([3])
        >>> check_coefficients(rule, (torch.tensor(0.5), {}), 3)
        Traceback (most recent call last):
        ...
        ValueError: ClipL2PerLayer(threshold=1.0).scale returned coefficients of shape (), expected (3,): one per gradient tensor of its layers. For one coefficient for all write coef.expand(len(m.grads)); for one per layer, m.per_tensor(coef).
    """  # noqa: E501
    if not isinstance(returned, tuple) or len(returned) != 2:
        raise TypeError(
            f"{rule.describe()}.scale must return a (coefficients, state) pair, got "
            f"{type(returned).__name__}; return the state it was given if it keeps none"
        )
    coef = returned[0]
    if not isinstance(coef, torch.Tensor):
        raise TypeError(
            f"{rule.describe()}.scale returned coefficients of type {type(coef).__name__}; "
            "return a "
            "tensor on the gradients' device, e.g. torch.full((len(m.grads),), c)"
        )
    if tuple(coef.shape) != (tensors,):
        raise ValueError(
            f"{rule.describe()}.scale returned coefficients of shape {tuple(coef.shape)}, expected "
            f"({tensors},): one per gradient tensor of its layers. For one coefficient for "
            "all write coef.expand(len(m.grads)); for one per layer, m.per_tensor(coef)."
        )
    return coef
