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
