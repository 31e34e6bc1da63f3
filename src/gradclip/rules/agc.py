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
per such unit. A weight sharded on dim 0 *and* another dim (FSDP2 over
row-wise tensor parallel) has different rows on different ranks: each rank
writes its rows' sums at their places in the full tensor
(`gradclip.core.split_rows`), two floats per row of the full tensor.

References:
    Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
    Recognition Without Normalization", ICML 2021 (NFNets), section 4.1.
    Reference implementations: deepmind-research ``nfnets/agc_optax.py``,
    ``optax.adaptive_grad_clip``, ``timm.utils.agc.adaptive_clip_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gradclip.core.kernels import accumulation_dtype, add_at_, large_tensor_elements
from gradclip.core.rule import CrossRank, GroupLayout, InPlaceRule, Measured, State, set_fields
from gradclip.core.validation import check_threshold

__all__ = ["AdaptiveGradClip"]

# The floor of a gradient unit's norm in the division, as in the reference
# implementations (optax: 1e-6; timm: clamp(min=1e-6)).
_GRAD_NORM_FLOOR = 1e-6
# Small tensors of a run are concatenated (in chunks of at most this many times
# the large-tensor size) so that their unit norms cost a constant number of
# launches; the chunk cap bounds the extra memory.
_CHUNK_FACTOR = 16


def _units(shape: torch.Size) -> int:
    return int(shape[0]) if len(shape) >= 2 else 1


def _coef_shape(shape: torch.Size) -> tuple[int, ...]:
    if len(shape) == 0:
        return ()
    return (_units(shape),) + (1,) * (len(shape) - 1)


@dataclass(eq=False)
class _Run:
    """How one (device, dtype) run of a group's tensors is split into units."""

    start: int  # the run is tensors [start, stop) of the group
    stop: int
    chunks: list[tuple[list[int], torch.Tensor]]  # (run-local indices, unit lengths)
    large: list[int]  # run-local indices of tensors reduced on their own
    order: list[int]  # run-local indices in unit order (chunks, then large)
    coefficients: torch.Tensor  # (U,) buffer on the run's device
    views: list[torch.Tensor]  # per tensor of `order`, a view of `coefficients`
    unit_layer: torch.Tensor  # (U,) group-local layer index of each unit
    unit_tensor: torch.Tensor  # (U,) group-local tensor index of each unit
    split: torch.Tensor | None  # (N,) units split across ranks (need a reduction)
    split_owner: torch.Tensor | None  # (N,) group-local tensor index of each
    # (N,) each one's place in the reduced block (its global row for weights split
    # on dims 0 and 1, whose ranks hold different rows); None: place k for unit k
    split_slot: torch.Tensor | None = None
    split_size: int = 0  # the block's length: the same on every rank


def _split_units(
    layout: GroupLayout, position: int, offset: int, head: int
) -> tuple[list[int], list[int], int]:
    """Units of tensor ``position`` (numbered from ``offset``) that ranks hold in pieces,
    their places in the reduced block (from ``head``), and the block's growth."""
    if not layout.split_dims:
        return [], [], 0
    shape, dims = layout.shapes[position], layout.split_dims[position]
    rows = layout.split_rows[position] if layout.split_rows else None
    if rows is not None:  # split on dim 0 too: each rank's rows sit at their global places
        local = list(range(offset, offset + _units(shape)))
        return local, [head + int(r) for r in rows.index.tolist()], rows.rows
    if len(shape) >= 2 and 0 in dims and len(dims) > 1:
        raise NotImplementedError(
            f"AdaptiveGradClip: the gradient of {layout.param_names[position]!r} is sharded on "
            f"dims {dims} (e.g. FSDP and tensor parallelism together): its rows are split across "
            "ranks and not the same rows on every rank, which gradclip cannot reduce in one "
            "collective. Override this layer with another rule."
        )
    if (len(shape) < 2 and dims) or any(d >= 1 for d in dims):
        n = _units(shape)
        return list(range(offset, offset + n)), list(range(head, head + n)), n
    return [], [], 0


def _unit_lengths(shapes: list[torch.Size]) -> list[int]:
    """The number of elements of every unit of these tensors, in order."""
    return [s.numel() // _units(s) for s in shapes for _ in range(_units(s))]


def _plan_run(layout: GroupLayout, start: int, stop: int) -> _Run:
    shapes = layout.shapes[start:stop]
    device, dtype = layout.devices[start], layout.dtypes[start]
    limit = large_tensor_elements(device)
    chunks: list[list[int]] = []
    large: list[int] = []
    current: list[int] = []
    size = 0
    for i, shape in enumerate(shapes):
        n = shape.numel()
        if n >= limit:
            large.append(i)
            continue
        if current and size + n > _CHUNK_FACTOR * limit:
            chunks.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        chunks.append(current)
    order = [i for idx in chunks for i in idx] + large
    counts = [_units(shapes[i]) for i in order]
    coefficients = torch.ones(sum(counts), dtype=accumulation_dtype(dtype), device=device)
    views, split, owners, slots, offset, size = [], [], [], [], 0, 0
    for i, n in zip(order, counts):
        views.append(coefficients[offset : offset + n].view(_coef_shape(shapes[i])))
        units, places, grown = _split_units(layout, start + i, offset, size)
        split += units
        slots += places
        owners += [start + i] * len(units)
        offset += n
        size += grown
    owner_of_unit = [start + i for i, n in zip(order, counts) for _ in range(n)]

    def long(values: list[int], where: torch.device) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=where)

    return _Run(
        start,
        stop,
        [(idx, long(_unit_lengths([shapes[i] for i in idx]), device)) for idx in chunks],
        large,
        order,
        coefficients,
        views,
        long([layout.layer_of_tensor[p] for p in owner_of_unit], layout.device),
        long(owner_of_unit, layout.device),
        long(split, device) if size else None,
        long(owners, layout.device) if size else None,
        long(slots, layout.device) if slots != list(range(size)) else None,
        size,
    )


def _unit_norms(tensors: list[torch.Tensor], run: _Run) -> torch.Tensor:
    """``(U,)`` L2 norm of every unit of ``tensors`` (one run), in unit order."""
    acc = run.coefficients.dtype
    parts = []
    for idx, lengths in run.chunks:
        # `cat` makes a private copy, so squaring it in place is safe; half
        # precision is widened before squaring so that it cannot overflow.
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).to(acc)
        # unsafe: the lengths are built with the plan and add up to the chunk
        # by construction; the safe variant checks that with a host read (a
        # sync per step on CUDA)
        squares = torch.segment_reduce(flat.square_(), "sum", lengths=lengths, unsafe=True)
        parts.append(squares.sqrt_())
    for i in run.large:
        t = tensors[i].detach()
        parts.append(torch.linalg.vector_norm(t.reshape(_units(t.shape), -1), dim=1, dtype=acc))
    if not parts:
        return torch.zeros(0, dtype=acc, device=run.coefficients.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@dataclass(frozen=True)
class AdaptiveGradClip(InPlaceRule):
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
    (device, dtype); large ones one by one. No value is read to the host. The
    paper clips every layer but the final linear classifier: leave it
    unclipped with an override.

    Args:
        clipping: ``λ``, the largest allowed ratio of gradient to weight norm
            per unit. Default 0.01 (the paper's value for large batches).
        eps: ``ε``, the floor of a weight unit's norm, so that zero-initialized
            weights can still move. Default 1e-3.

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> net(torch.ones(3, 4)).sum().backward()
        >>> normalizer = gradclip.GradientNormalizer(
        ...     net, gradclip.AdaptiveGradClip(clipping=0.01), overrides={"1": None})
        >>> sorted(normalizer.apply().changed_layers())   # the classifier "1" is left alone
        ['0']

    References:
        Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image
        Recognition Without Normalization", ICML 2021.
    """

    clipping: float = 0.01
    eps: float = 1e-3
    norm_type: ClassVar[float | None] = None
    layer_local: ClassVar[bool] = True

    def __post_init__(self) -> None:
        set_fields(
            self,
            clipping=check_threshold(self.clipping, what="clipping"),
            eps=check_threshold(self.eps, what="eps"),
        )

    def prepare(self, layout: GroupLayout) -> list[_Run]:
        runs, start = [], 0
        keys = list(zip(layout.devices, layout.dtypes))
        while start < len(keys):
            stop = start + 1
            while stop < len(keys) and keys[stop] == keys[start]:
                stop += 1
            runs.append(_plan_run(layout, start, stop))
            start = stop
        return runs

    def cross_rank(self, m: Measured) -> CrossRank | None:
        runs: list[_Run] = m.prepared
        if all(run.split is None for run in runs):
            return None  # every unit whole on this rank (rows of Shard(0) weights)
        assert m.shards is not None
        local: list[tuple[torch.Tensor, torch.Tensor]] = []
        grad_parts: list[torch.Tensor] = []
        weight_parts: list[torch.Tensor] = []
        for run in runs:
            grad_norms = _unit_norms(m.grads[run.start : run.stop], run)
            weight_norms = _unit_norms(m.params[run.start : run.stop], run)
            local.append((grad_norms, weight_norms))
            if run.split is not None and run.split_owner is not None:
                weights = m.shards.weights.index_select(0, run.split_owner)
                for norms, parts in ((grad_norms, grad_parts), (weight_norms, weight_parts)):
                    part = norms.index_select(0, run.split).to(weights).square_().mul_(weights)
                    if run.split_slot is not None:  # rows at their global places
                        part = part.new_zeros(run.split_size).index_copy_(0, run.split_slot, part)
                    parts.append(part)
        return CrossRank(sums=torch.cat(grad_parts + weight_parts), local=local)

    def transform_(self, m: Measured, state: State) -> tuple[torch.Tensor | None, State]:
        runs: list[_Run] = m.prepared
        layout = m.layout
        changed = torch.zeros(len(layout.layer_names), dtype=torch.int32, device=layout.device)
        reduced = m.shards.reduced if m.shards is not None else None
        sums = reduced.sums if reduced is not None else None
        half = 0 if sums is None else sums.numel() // 2
        offset = 0
        for k, run in enumerate(runs):
            grads = m.grads[run.start : run.stop]
            if reduced is not None and reduced.local is not None:
                grad_norms, weight_norms = reduced.local[k]
            else:
                grad_norms = _unit_norms(grads, run)
                weight_norms = _unit_norms(m.params[run.start : run.stop], run)
            if sums is not None and run.split is not None:
                n = run.split_size
                g2, w2 = sums[offset : offset + n], sums[half + offset : half + offset + n]
                offset += n
                if run.split_slot is not None:  # this rank's rows, from their global places
                    g2, w2 = g2.index_select(0, run.split_slot), w2.index_select(0, run.split_slot)
                grad_norms = grad_norms.index_copy(0, run.split, g2.sqrt().to(grad_norms))
                weight_norms = weight_norms.index_copy(0, run.split, w2.sqrt().to(weight_norms))
            if m.shards is not None and m.shards.zeroed is not None:
                # the local norms and the reduction predate nonfinite="zero"
                mask = m.shards.zeroed.index_select(0, run.unit_tensor)
                grad_norms = grad_norms.masked_fill(mask.to(grad_norms.device), 0.0)
            bound = weight_norms.clamp(min=self.eps).mul_(self.clipping)
            coef = torch.where(
                grad_norms < bound, 1.0, bound / grad_norms.clamp(min=_GRAD_NORM_FLOOR)
            )
            run.coefficients.copy_(coef)
            torch._foreach_mul_([grads[i] for i in run.order], run.views)
            flags = (coef != 1).to(torch.int32).to(layout.device)
            add_at_(changed, run.unit_layer, flags)
        return changed > 0, state
