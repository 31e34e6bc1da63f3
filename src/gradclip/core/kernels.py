"""Grouped tensor kernels: the few launches a step is made of.

Every function here takes whole lists of tensors and issues a number of kernel
launches that does not depend on how many tensors there are (a ``_foreach``
launch covers a whole (device, dtype) group), with one deliberate exception
explained in `clamp_abs_`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)

__all__ = [
    "ClampPlan",
    "accumulation_dtype",
    "clamp_abs_",
    "foreach_l2_norms",
    "group_indices",
    "large_tensor_elements",
    "plan_clamp",
]

# A tensor this large is clamped on its own with one `clamp_` (one pass over its
# memory) rather than with the two `_foreach_clamp_{min,max}_` launches (two
# passes): at this size a second pass costs more than one extra launch. On a GPU
# (~3 TB/s, ~5 us per launch) that break-even is around 2M elements; on a CPU
# (~10 GB/s, ~1.5 us per op) around 16K. The number of such tensors is bounded by
# memory / size, not by the number of layers.
_LARGE_TENSOR_ELEMENTS = {"cpu": 1 << 14}
_LARGE_TENSOR_ELEMENTS_DEFAULT = 1 << 21


def large_tensor_elements(device: torch.device) -> int:
    """Element count from which `clamp_abs_` clamps a tensor on its own."""
    return _LARGE_TENSOR_ELEMENTS.get(device.type, _LARGE_TENSOR_ELEMENTS_DEFAULT)


def group_indices(keys: Sequence[K]) -> dict[K, list[int]]:
    """Positions of equal keys, in first-seen order: ``["a", "b", "a"] -> {a: [0, 2], b: [1]}``."""
    groups: dict[K, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for every other floating dtype.

    The dtype in which a tensor's norm is accumulated (half types are read as
    they are and summed in float32, without a widened copy) and in which its
    scale factors are kept: a multiply whose factor shares the gradient's dtype
    skips a cast and runs ~1.5x faster on the CPU, and a float32 0-d factor is
    applied to half-precision gradients in float32.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def foreach_l2_norms(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``(T,)`` L2 norm of each tensor of one (device, dtype) group, accumulated in ``dtype``.

    One ``_foreach_norm`` launch; half-precision inputs are read as they are and
    accumulated in float32 without a widened copy.
    """
    norms = torch._foreach_norm(tensors, 2, dtype=accumulation_dtype(tensors[0].dtype))
    return torch.stack(norms).to(dtype)


@dataclass(frozen=True)
class ClampPlan:
    """How `clamp_abs_` splits a list of tensors; depends only on the layout.

    Attributes:
        groups: for each (device, dtype, threshold): the threshold, the positions
            of its small tensors (clamped with two ``_foreach`` launches) and of its
            large ones (clamped one by one with a single pass each).
    """

    groups: tuple[tuple[float, tuple[int, ...], tuple[int, ...]], ...]


def plan_clamp(tensors: Sequence[torch.Tensor], thresholds: Sequence[float]) -> ClampPlan:
    """Split ``tensors`` for `clamp_abs_` (call once per layout, not per step)."""
    keys = [(t.device, t.dtype, float(thr)) for t, thr in zip(tensors, thresholds, strict=True)]
    groups = []
    for (device, _, thr), positions in group_indices(keys).items():
        limit = large_tensor_elements(device)
        small = tuple(i for i in positions if tensors[i].numel() < limit)
        large = tuple(i for i in positions if tensors[i].numel() >= limit)
        groups.append((thr, small, large))
    return ClampPlan(tuple(groups))


def clamp_abs_(
    tensors: list[torch.Tensor], thresholds: Sequence[float], plan: ClampPlan | None = None
) -> None:
    """Clamp every element of ``tensors[i]`` to ``[-thresholds[i], thresholds[i]]`` in place.

    Tensors are grouped by (device, dtype, threshold). In each group, the small
    tensors are clamped with ``_foreach_clamp_min_`` then ``_foreach_clamp_max_``
    (two launches for the whole group), and each large one with a single
    ``clamp_`` (one pass over its memory instead of two; see
    `large_tensor_elements`).

    Args:
        tensors: gradients to clamp, in place.
        thresholds: one positive float per tensor.
        plan: the result of `plan_clamp` for this layout, to skip the
            grouping work on every step.
    """
    if plan is None:
        plan = plan_clamp(tensors, thresholds)
    for thr, small, large in plan.groups:
        for i in large:
            tensors[i].clamp_(-thr, thr)
        if len(small) == len(tensors):
            selected = tensors
        elif len(small) == 1:
            selected = [tensors[small[0]]]
        else:
            selected = list(itemgetter(*small)(tensors)) if small else []
        if selected:
            torch._foreach_clamp_min_(selected, -thr)
            torch._foreach_clamp_max_(selected, thr)
