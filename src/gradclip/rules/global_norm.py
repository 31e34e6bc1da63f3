"""Global p-norm clipping, as ``torch.nn.utils.clip_grad_norm_``.

``‖g‖_p = (Σ_i ‖g_i‖_p^p)^(1/p)`` over every gradient ``g_i`` of the layers
the strategy is given (``max_i ‖g_i‖_∞`` for ``p = ∞``), then

    ``g_i ← g_i · min(1, max_norm / (‖g‖_p + 1e-6))``

The ``1e-6`` and the clamp are PyTorch's (``clip_grad_norm_``), so a model
whose total norm is at or under ``max_norm`` is multiplied by exactly ``1.0``
and left bit-for-bit unchanged.

References:
    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013.
    PyTorch, ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from gradclip.core.kernels import accumulation_dtype
from gradclip.core.rule import GroupView, Strategy
from gradclip.core.sharding import CrossRank
from gradclip.core.validation import check_threshold

__all__ = ["ClipGlobalNorm", "device_dtype_runs", "global_norm"]

# torch.nn.utils.clip_grad_norm_'s epsilon: max_norm / (total + 1e-6).
TORCH_CLIP_EPS = 1e-6


def device_dtype_runs(view: GroupView) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: maximal runs of ``view.grads`` sharing (device, dtype).

    The engine orders a step's tensors by device and dtype, so the runs are few.
    They depend on the layout only, so they are kept in ``view.cache`` (which
    lives as long as the engine's plan).
    """
    cached = view.cache.get("runs")
    if cached is not None:
        runs: list[tuple[int, int]] = cached
        return runs
    runs = []
    start = 0
    grads = view.grads
    while start < len(grads):
        key = (grads[start].device, grads[start].dtype)
        stop = start + 1
        while stop < len(grads) and (grads[stop].device, grads[stop].dtype) == key:
            stop += 1
        runs.append((start, stop))
        start = stop
    view.cache["runs"] = runs
    return runs


def per_tensor_norms(view: GroupView, norm_type: float) -> torch.Tensor:
    """``(T,)`` p-norm of each gradient of ``view``, in ``view.dtype``: one launch per run.

    Half-precision gradients are accumulated in float32 (``_foreach_norm``'s
    ``dtype=``), never in their own dtype.
    """
    parts = []
    for start, stop in device_dtype_runs(view):
        chunk = view.grads[start:stop]
        norms = torch._foreach_norm(chunk, norm_type, dtype=accumulation_dtype(chunk[0].dtype))
        parts.append(torch.stack(norms).to(view.device, view.dtype, non_blocking=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def global_norm(view: GroupView, norm_type: float = 2.0) -> torch.Tensor:
    """0-d p-norm of all of ``view``'s gradients together, on ``view.device``.

    For ``p = 2`` it is formed from the norms the engine already measured (no
    extra read of the gradients); other ``p`` cost one ``_foreach_norm`` per
    (device, dtype).
    """
    total: torch.Tensor
    if norm_type == 2.0 and view.tensor_norms is not None:
        total = torch.linalg.vector_norm(view.tensor_norms)
    else:
        total = torch.linalg.vector_norm(per_tensor_norms(view, norm_type), ord=norm_type)
    return total


def clip_coefficient(total: torch.Tensor, max_norm: torch.Tensor | float) -> torch.Tensor:
    """``min(1, max_norm / (total + 1e-6))``, PyTorch's ``clip_grad_norm_`` coefficient."""
    return (max_norm / (total + TORCH_CLIP_EPS)).clamp(max=1.0)


def _local_max_norms(view: GroupView) -> torch.Tensor:
    # max|g| of each local piece; an empty piece (a rank without rows of a
    # tensor) counts 0, where _foreach_norm has no identity for inf.
    empty = view.cache.get("empty_pieces")
    if empty is None:
        empty = view.cache["empty_pieces"] = [i for i, g in enumerate(view.grads) if not g.numel()]
    if not empty:
        return per_tensor_norms(view, math.inf)
    grads = list(view.grads)
    for i in empty:
        grads[i] = grads[i].new_zeros(1)
    return per_tensor_norms(replace(view, grads=grads), math.inf)


def _sharded_total(view: GroupView, reduced: CrossRank, norm_type: float) -> torch.Tensor:
    # per tensor: max|g| over ranks (p = inf) or Σ_ranks Σ|g|^p
    per_tensor = reduced.maxima if math.isinf(norm_type) else reduced.sums
    assert per_tensor is not None
    if view.zeroed is not None:  # reduced before nonfinite="zero" zeroed them
        per_tensor = per_tensor.masked_fill(view.zeroed, 0.0)
    if math.isinf(norm_type):
        return per_tensor.max()
    return per_tensor.sum().pow(1.0 / norm_type)


class ClipGlobalNorm(Strategy):
    """Clip the global p-norm of the gradients, like ``torch.nn.utils.clip_grad_norm_``.

    $$
    ‖g‖_p = \\Big(\\sum_i ‖g_i‖_p^p\\Big)^{1/p}, \\qquad
    g_i \\leftarrow g_i \\cdot \\min\\Big(1, \\frac{\\text{max\\_norm}}{‖g‖_p + 10^{-6}}\\Big)
    $$

    "Global" means every layer this strategy is given: as the default of a
    `GradientNormalizer` that is the whole model (minus the
    layers overridden with another rule), as an override it is the layers that
    override names, clipped together. Half-precision norms are accumulated in
    float32; no value is read to the host. The total norm is in the report's
    stats as ``"global_norm"``.

    Args:
        max_norm: the largest allowed total norm, finite and > 0.
        norm_type: ``p``: any finite ``p >= 1`` or ``float("inf")``. Default 2.
            ``p = 2`` reuses the norms the engine measured; any other ``p``
            costs one more read of the gradients.

    On sharded gradients (FSDP2 ``DTensor`` s) the result is the single-process
    one, in the step's single collective: ``p = 2`` reads the reduced L2 norms;
    other ``p`` add, per tensor, this rank's ``Σ|g|^p`` of its piece (weighted
    ``1 / replicas``) to the summed vector, and ``p = ∞`` this rank's ``max|g|``
    to the maxima (see `gradclip.core.sharding.CrossRank`). The sum of
    ``p``-th powers is formed in float64, as torch's own DTensor norm does.

    Example:
        >>> report = gradclip.normalize_(model, gradclip.ClipGlobalNorm(1.0))
        >>> # same gradients as torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

    References:
        Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent
        neural networks", ICML 2013. PyTorch ``torch.nn.utils.clip_grad_norm_``.
    """

    name = "ClipGlobalNorm"

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        self.max_norm = check_threshold(max_norm, what="max_norm")
        if isinstance(norm_type, bool) or not isinstance(norm_type, int | float):
            raise TypeError(f"norm_type must be a number >= 1 or inf, got {norm_type!r}")
        p = float(norm_type)
        if math.isnan(p) or p < 1.0:
            raise ValueError(f"norm_type must be >= 1 or float('inf'), got {norm_type!r}")
        self.norm_type = p
        self.threshold = self.max_norm

    def config(self) -> Mapping[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def cross_rank(self, view: GroupView) -> CrossRank | None:
        if self.norm_type == 2.0:
            return None  # the engine reduces the L2 norms anyway
        if math.isinf(self.norm_type):
            return CrossRank(maxima=_local_max_norms(view))
        local = per_tensor_norms(view, self.norm_type)  # of this rank's pieces
        assert view.shards is not None
        return CrossRank(sums=local.pow_(self.norm_type).mul_(view.shards.weights))

    def scale(self, view: GroupView) -> torch.Tensor:
        if view.reduced is None:
            total = global_norm(view, self.norm_type)
        else:
            total = _sharded_total(view, view.reduced, self.norm_type)
        view.stats["global_norm"] = total
        return clip_coefficient(total, self.max_norm).expand(len(view.grads))
