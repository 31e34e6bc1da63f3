"""Argument checks shared by every entry point.

Everything here runs before a gradient is touched, so that a call that raises
leaves every gradient exactly as it was.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["check_gradient", "check_threshold"]


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
