"""Adaptive gradient clipping (AGC), unit-wise, as in NFNets.

For every *unit* — an output row of a weight (dim 0 of Linear ``[out, in]`` and
ConvNd ``[out, in, *k]`` weights, i.e. the norm over all dims but dim 0), or the
whole tensor for 0-/1-D parameters such as biases and gains —

    ``max = max(‖W_unit‖, eps) · clipping``
    ``G_unit ← G_unit``                               if ``‖G_unit‖ < max``
    ``G_unit ← G_unit · max / max(‖G_unit‖, 1e-6)``   otherwise

A unit under the bound is multiplied by exactly ``1.0`` (bit-for-bit unchanged).

On sharded gradients (FSDP2 ``DTensor`` s) a unit that one rank holds whole (a
row of a ``Shard(0)`` weight, any ``Replicate`` piece) is clipped locally; a
unit split across ranks (a sharded bias or gain, whose unit is the whole
tensor; a row of a weight sharded on another dim) has its squared gradient and
weight norms summed over ranks in the step's single collective, two floats
per such unit.

References:
    Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
    Recognition Without Normalization", ICML 2021 (NFNets), section 4.1.
    Reference implementations: deepmind-research ``nfnets/agc_optax.py``,
    ``optax.adaptive_grad_clip``, ``timm.utils.agc.adaptive_clip_grad``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gradclip.core.kernels import accumulation_dtype, large_tensor_elements
from gradclip.core.rule import GroupView, Strategy
from gradclip.core.sharding import CrossRank
from gradclip.core.validation import check_threshold
from gradclip.rules.global_norm import device_dtype_runs

__all__ = ["AdaptiveGradClip"]

# The floor of a gradient unit's norm in the division, as in the reference
# implementations (optax: 1e-6; timm: clamp(min=1e-6)).
_GRAD_NORM_FLOOR = 1e-6
# Small tensors of a run are concatenated (in chunks of at most this many times
# the large-tensor size) so that their unit norms cost a constant number of
# launches; the chunk cap bounds the extra memory.
_CHUNK_FACTOR = 16


def _units(t: torch.Tensor) -> int:
    return int(t.shape[0]) if t.dim() >= 2 else 1


def _unit_size(t: torch.Tensor) -> int:
    return t.numel() // max(_units(t), 1)


def _coef_shape(t: torch.Tensor) -> tuple[int, ...]:
    if t.dim() == 0:
        return ()
    return (_units(t),) + (1,) * (t.dim() - 1)


@dataclass(eq=False)
class _RunLayout:
    """How one (device, dtype) run of a group's tensors is split into units."""

    start: int
    chunks: list[tuple[list[int], torch.Tensor]]  # (local tensor indices, unit lengths)
    large: list[int]  # local indices of tensors reduced on their own
    order: list[int]  # local tensor indices in unit order (chunks, then large)
    coefficients: torch.Tensor  # (U,) float32 buffer on the run's device
    views: list[torch.Tensor]  # per tensor of `order`, a view of `coefficients`
    unit_layer: torch.Tensor  # (U,) group-local layer index of each unit, on view.device


def _layout(view: GroupView) -> list[_RunLayout]:
    cached = view.cache.get("agc_layout")
    if cached is not None:
        layouts: list[_RunLayout] = cached
        return layouts
    layouts = []
    for start, stop in device_dtype_runs(view):
        grads = view.grads[start:stop]
        device = grads[0].device
        limit = large_tensor_elements(device)
        chunks: list[tuple[list[int], torch.Tensor]] = []
        large: list[int] = []
        current: list[int] = []
        size = 0
        for i, g in enumerate(grads):
            if g.numel() >= limit:
                large.append(i)
                continue
            if current and size + g.numel() > _CHUNK_FACTOR * limit:
                chunks.append((current, torch.empty(0)))
                current, size = [], 0
            current.append(i)
            size += g.numel()
        if current:
            chunks.append((current, torch.empty(0)))
        chunks = [
            (
                idx,
                torch.tensor(
                    [_unit_size(grads[i]) for i in idx for _ in range(_units(grads[i]))],
                    dtype=torch.long,
                    device=device,
                ),
            )
            for idx, _ in chunks
        ]
        order = [i for idx, _ in chunks for i in idx] + large
        counts = [_units(grads[i]) for i in order]
        coefficients = torch.ones(
            sum(counts), dtype=accumulation_dtype(grads[0].dtype), device=device
        )
        views = []
        offset = 0
        for i, n in zip(order, counts):
            views.append(coefficients[offset : offset + n].view(_coef_shape(grads[i])))
            offset += n
        # Built on the device from the group's index vector: no host read.
        positions = torch.tensor([start + i for i in order], dtype=torch.long, device=view.device)
        unit_layer = view.tensor_layer.index_select(0, positions).repeat_interleave(
            torch.tensor(counts, dtype=torch.long, device=view.device),
            output_size=sum(counts),
        )
        layouts.append(_RunLayout(start, chunks, large, order, coefficients, views, unit_layer))
    view.cache["agc_layout"] = layouts
    return layouts


@dataclass(eq=False)
class _SplitUnits:
    """The units of one run split across ranks, whose norms need a reduction."""

    units: torch.Tensor  # (N,) indices into the run's unit vector, on the run's device
    weights: torch.Tensor  # (N,) 1 / replicas of each, on view.device in view.dtype


def _split_units(view: GroupView) -> list[_SplitUnits | None]:
    """Per run of `_layout`, its split units (``None`` if it has none); cached."""
    cached = view.cache.get("agc_split")
    if cached is not None:
        split: list[_SplitUnits | None] = cached
        return split
    assert view.shards is not None
    shards = view.shards
    split = []
    for layout in _layout(view):
        units: list[int] = []
        owners: list[int] = []
        offset = 0
        for i in layout.order:
            position = layout.start + i
            t = view.grads[position]
            dims = shards.split_dims[position]
            n = _units(t)
            if t.dim() >= 2 and 0 in dims and len(dims) > 1:
                raise NotImplementedError(
                    f"AdaptiveGradClip: the gradient of {view.param_names[position]!r} is sharded "
                    f"on dims {dims} (e.g. FSDP and tensor parallelism together): its rows are "
                    "split across ranks and not the same rows on every rank, which gradclip "
                    "cannot reduce in one collective. Override this layer with another rule."
                )
            if (t.dim() < 2 and dims) or any(d >= 1 for d in dims):
                units += range(offset, offset + n)
                owners += [position] * n
            offset += n
        if not units:
            split.append(None)
            continue
        device = layout.coefficients.device
        owners_t = torch.tensor(owners, dtype=torch.long, device=shards.weights.device)
        split.append(
            _SplitUnits(
                torch.tensor(units, dtype=torch.long, device=device),
                shards.weights.index_select(0, owners_t).to(view.device, view.dtype),
            )
        )
    view.cache["agc_split"] = split
    return split


def _unit_tensor(view: GroupView, layout: _RunLayout) -> torch.Tensor:
    """``(U,)`` group-local tensor index of each unit of a run, on view.device; cached."""
    key = f"agc_unit_tensor{layout.start}"
    cached = view.cache.get(key)
    if cached is None:
        owners = [
            layout.start + i
            for i in layout.order
            for _ in range(_units(view.grads[layout.start + i]))
        ]
        cached = view.cache[key] = torch.tensor(owners, dtype=torch.long, device=view.device)
    assert isinstance(cached, torch.Tensor)
    return cached


def _unit_norms(tensors: list[torch.Tensor], layout: _RunLayout) -> torch.Tensor:
    """``(U,)`` L2 norm of every unit of ``tensors`` (a run), in unit order.

    Accumulated in ``layout.coefficients.dtype`` (float32, or float64 for float64).
    """
    acc = layout.coefficients.dtype
    parts = []
    for idx, lengths in layout.chunks:
        # `cat` makes a private copy, so squaring it in place is safe; half
        # precision is widened before squaring so that it cannot overflow.
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).to(acc)
        parts.append(torch.segment_reduce(flat.square_(), "sum", lengths=lengths).sqrt_())
    for i in layout.large:
        t = tensors[i].detach()
        parts.append(torch.linalg.vector_norm(t.reshape(_units(t), -1), dim=1, dtype=acc))
    if not parts:
        return torch.zeros(0, dtype=acc, device=layout.coefficients.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class AdaptiveGradClip(Strategy):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets).

    $$
    m_u = \\max(‖W_u‖_2, \\epsilon)\\cdot\\lambda, \\qquad
    G_u \\leftarrow \\begin{cases} G_u & ‖G_u‖_2 < m_u \\\\
    G_u \\cdot m_u / \\max(‖G_u‖_2, 10^{-6}) & \\text{otherwise} \\end{cases}
    $$

    where a unit ``u`` is an output row (dim 0) of a weight of 2 or more
    dimensions and the whole tensor for 0-/1-D parameters. Norms are formed in
    float32 (float64 for float64 gradients); the gradients keep their dtype.
    Small tensors are reduced together with a constant number of launches per
    (device, dtype); tensors too large for that to pay (see
    `gradclip.core.kernels.large_tensor_elements`) are reduced one by one.
    No value is read to the host.

    The paper clips every layer but the final linear classifier: leave it
    unclipped with an override.

    Args:
        clipping: ``λ``, the largest allowed ratio of gradient to weight norm
            per unit. Default 0.01 (the paper's value for large batches; it
            advises larger values for small batches).
        eps: ``ε``, the floor of a weight unit's norm, so that zero-initialized
            weights can still move. Default 1e-3.

    Example:
        >>> normalizer = gradclip.GradientNormalizer(
        ...     model, gradclip.AdaptiveGradClip(clipping=0.01),
        ...     overrides={"head": None})            # the classifier stays unclipped
        >>> normalizer.attach(optimizer)

    References:
        Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021.
    """

    name = "AdaptiveGradClip"
    measures_norms = False
    scales = False

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3) -> None:
        self.clipping = check_threshold(clipping, what="clipping")
        self.eps = check_threshold(eps, what="eps")
        self.threshold = self.clipping

    def config(self) -> Mapping[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps}

    def cross_rank(self, view: GroupView) -> CrossRank | None:
        split = _split_units(view)
        if all(s is None for s in split):
            return None  # every unit whole on this rank (rows of Shard(0) weights)
        local: list[tuple[torch.Tensor, torch.Tensor]] = []
        grad_parts: list[torch.Tensor] = []
        weight_parts: list[torch.Tensor] = []
        for layout, units in zip(_layout(view), split):
            stop = layout.start + len(layout.order)
            grad_norms = _unit_norms(view.grads[layout.start : stop], layout)
            weight_norms = _unit_norms(view.params[layout.start : stop], layout)
            local.append((grad_norms, weight_norms))
            if units is not None:
                for norms, parts in ((grad_norms, grad_parts), (weight_norms, weight_parts)):
                    part = norms.index_select(0, units.units).to(view.device, view.dtype)
                    parts.append(part.square_().mul_(units.weights))
        view.cache["agc_local"] = local  # this step's local norms, for transform_
        return CrossRank(sums=torch.cat(grad_parts + weight_parts))

    def transform_(self, view: GroupView) -> None:
        changed = torch.zeros(len(view.layer_names), dtype=torch.int32, device=view.device)
        local = view.cache.pop("agc_local", None)
        reduced = view.reduced.sums if view.reduced is not None else None
        split = _split_units(view) if reduced is not None else None
        half = 0 if reduced is None else reduced.numel() // 2
        offset = 0
        for k, layout in enumerate(_layout(view)):
            stop = layout.start + len(layout.order)
            grads = view.grads[layout.start : stop]
            params = view.params[layout.start : stop]
            if local is not None:
                grad_norms, weight_norms = local[k]
            else:
                grad_norms = _unit_norms(grads, layout)
                weight_norms = _unit_norms(params, layout)
            units = split[k] if split is not None else None
            if reduced is not None and units is not None:
                n = units.units.numel()
                g2, w2 = reduced[offset : offset + n], reduced[half + offset : half + offset + n]
                offset += n
                grad_norms = grad_norms.index_copy(0, units.units, g2.sqrt().to(grad_norms))
                weight_norms = weight_norms.index_copy(0, units.units, w2.sqrt().to(weight_norms))
            if view.zeroed is not None:  # local norms and `reduced` predate the zeroing
                mask = view.zeroed.index_select(0, _unit_tensor(view, layout))
                grad_norms = grad_norms.masked_fill(mask.to(grad_norms.device), 0.0)
            bound = weight_norms.clamp_(min=self.eps).mul_(self.clipping)
            coef = torch.where(
                grad_norms < bound,
                torch.ones_like(bound),
                bound / grad_norms.clamp(min=_GRAD_NORM_FLOOR),
            )
            layout.coefficients.copy_(coef)
            torch._foreach_mul_([grads[i] for i in layout.order], layout.views)
            changed.index_add_(0, layout.unit_layer, (coef != 1).to(torch.int32).to(view.device))
        view.cache["changed"] = changed > 0

    def layer_changed(self, view: GroupView) -> torch.Tensor | None:
        flags = view.cache.pop("changed", None)
        return flags if isinstance(flags, torch.Tensor) else None
