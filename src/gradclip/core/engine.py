"""The data path of one normalization step, for every layer of a model at once.

::

    gradients ─┬─ grouped by (device, dtype) ─ one _foreach_norm per group ─┐
               │                                                            │
               │   per-tensor norms ─ index_add_ by layer ─ layer norms ────┤
               │                                                            ▼
               │        each strategy group: coefficients on the device (no sync)
               │                                                            │
               └─ one _foreach_mul_ per (device, dtype) group ◄─────────────┘
                  (+ element-wise clamps for ClipElementWiseAbsoluteValue)

The kernel launches of a step do not grow with the number of layers: the
layers only change the length of the small index vectors, which are built once
and cached in a `Plan`. A plan is rebuilt only when the set of
gradients changes (a parameter gets or loses its gradient, or changes dtype or
device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import torch

from gradclip.core.kernels import accumulation_dtype, foreach_l2_norms
from gradclip.core.layers import Layer
from gradclip.core.nonfinite import (
    check_nonfinite,
    raise_nonfinite,
    read_nonfinite,
    zero_nonfinite_,
)
from gradclip.core.report import NormReport
from gradclip.core.rule import GroupView, Strategy
from gradclip.core.sharding import CrossRank, GroupShards, Sharding, sharding_of
from gradclip.core.validation import check_gradient

__all__ = ["Engine", "Plan"]

# (device, dtype, layout) of each gradient, None where a parameter has none.
_Signature = list[tuple[torch.device, torch.dtype, torch.layout] | None]


def _accumulation_dtype(device: torch.device, dtypes: Sequence[torch.dtype]) -> torch.dtype:
    # Per-tensor norms come out of _foreach_norm in float32 (float64 for float64
    # gradients); their squares and per-layer sums are formed in float64, where a
    # float32 norm cannot overflow when squared. MPS has no float64.
    if device.type == "mps":
        return torch.float32
    return torch.float64


@dataclass(eq=False)
class _Group:
    """One strategy and the layers it owns, with its cached index tensors."""

    strategy: Strategy
    layer_ids: list[int]  # global layer index of each of the group's layers
    positions: list[int]  # position in the step's tensor order of each tensor
    tensor_layer: torch.Tensor  # (T_g,) local layer index
    layer_ids_t: torch.Tensor  # (L_g,) global layer ids
    positions_t: torch.Tensor  # (T_g,) positions
    layer_thresholds: torch.Tensor  # (L_g,)
    host_thresholds: list[float]  # per tensor
    covers_all: bool  # positions == range(T) and layers == range(L): no gathers needed
    state: dict[str, object]
    layer_names: list[str]
    param_names: list[str]
    params: list[torch.Tensor]
    cache: dict[str, Any] = field(default_factory=dict)
    shards: GroupShards | None = None  # set on sharded plans
    asks_cross_rank: bool = False  # the strategy overrides Strategy.cross_rank


@dataclass(eq=False)
class _Bucket:
    """Gradients of one (device, dtype): a contiguous range of the step's tensor order."""

    device: torch.device
    start: int
    stop: int
    measured_stop: int  # tensors [start, measured_stop) have their norms measured
    scaled_stop: int  # tensors [start, scaled_stop) are multiplied by a coefficient
    coefficients: torch.Tensor  # (stop - start,) reused buffer on `device`
    coefficient_views: tuple[torch.Tensor, ...]  # its 0-d views, cached


class Plan:
    """Everything about a step that depends on the layout, not on gradient values.

    Tensors are ordered by (device, dtype, category, model order) where the
    category puts scaled tensors first, then other measured ones, then the
    unmeasured: each (device, dtype) bucket is a contiguous range, its measured
    tensors a prefix of it and its scaled tensors a prefix of that.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        strategies: Sequence[Strategy],
        signature: _Signature,
        *,
        params: Sequence[torch.Tensor],
        measure_all: bool,
        states: dict[object, dict[str, object]],
        grads: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        flat_layer: list[int] = []
        names: list[str] = []
        for layer_id, layer in enumerate(layers):
            for k in range(len(layer.params)):
                flat_layer.append(layer_id)
                names.append(layer.qualified(k))
        _check_layer_devices(layers, signature, flat_layer, names)

        def category(i: int) -> int:
            strategy = strategies[flat_layer[i]]
            if strategy.scales:
                return 0
            return 1 if (measure_all or strategy.measures_norms) else 2

        def sort_key(i: int) -> tuple[str, int, str, int, int]:
            device, dtype, _ = signature[i]  # type: ignore[misc]
            return (device.type, device.index or 0, str(dtype), category(i), i)

        order = sorted((i for i, sig in enumerate(signature) if sig is not None), key=sort_key)
        self.order = order  # flat parameter index of each of the step's tensors
        self._identity_order = order == list(range(len(signature)))
        self._pick = itemgetter(*order) if len(order) > 1 else None
        self.names = [names[i] for i in order]
        self.num_tensors = len(order)
        self.num_layers = len(layers)
        self.layer_names = [layer.name for layer in layers]
        self.tensor_layer_ids = [flat_layer[i] for i in order]
        self.tensor_dtypes = [signature[i][1] for i in order]  # type: ignore[index]
        categories = [category(i) for i in order]

        devices = sorted({signature[i][0] for i in order}, key=lambda d: (d.type, d.index or 0))  # type: ignore[index]
        self.device = devices[0] if devices else torch.device("cpu")
        self.acc_dtype = _accumulation_dtype(self.device, self.tensor_dtypes)
        wide = any(dt == torch.float64 for dt in self.tensor_dtypes)
        self.report_dtype = (
            torch.float64 if wide and self.acc_dtype == torch.float64 else torch.float32
        )

        self.layer_changes_known = [
            strategies[lid].reports_changes for lid in range(self.num_layers)
        ]
        self.layer_has_grad = [False] * self.num_layers
        self.layer_measured = [False] * self.num_layers
        for lid, cat in zip(self.tensor_layer_ids, categories):
            self.layer_has_grad[lid] = True
            if cat < 2:
                self.layer_measured[lid] = True
        measured_positions = [p for p, cat in enumerate(categories) if cat < 2]
        self.all_measured = len(measured_positions) == self.num_tensors
        self.any_measured = bool(measured_positions)
        self.all_layers_measured = all(self.layer_measured)

        dev = self.device
        self.measured_layer_t = torch.tensor(
            [self.tensor_layer_ids[p] for p in measured_positions], dtype=torch.long, device=dev
        )
        self.measured_positions_t = torch.tensor(measured_positions, dtype=torch.long, device=dev)
        self.layer_measured_t = torch.tensor(self.layer_measured, dtype=torch.bool, device=dev)
        self.buckets = self._make_buckets(order, signature, categories)
        self.params = [params[i] for i in order]
        self.groups = self._make_groups(strategies, states)
        # DTensor gradients (FSDP2): local pieces, norms reduced once per step.
        self.sharding: Sharding | None = None
        if grads is not None:
            self.sharding = sharding_of(
                self.names,
                [grads[i] for i in order],
                self.device,
                self.acc_dtype,
            )
        if self.sharding is not None:
            for group in self.groups:
                group.shards = self.sharding.group_shards(group.positions, group.positions_t)
                group.asks_cross_rank = type(group.strategy).cross_rank is not Strategy.cross_rank

    def select(self, grads_by_param: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The step's gradients in the plan's order (``grads_by_param`` indexed like the params)."""
        if self._identity_order:
            return grads_by_param  # type: ignore[return-value]
        if self._pick is None:  # zero or one gradient
            return [grads_by_param[i] for i in self.order]  # type: ignore[misc]
        return list(self._pick(grads_by_param))

    def _make_buckets(
        self, order: list[int], signature: _Signature, categories: list[int]
    ) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        start = 0
        while start < len(order):
            key = signature[order[start]][:2]  # type: ignore[index]
            stop = start
            while stop < len(order) and signature[order[stop]][:2] == key:  # type: ignore[index]
                stop += 1
            cats = categories[start:stop]
            scaled_stop = start + sum(1 for c in cats if c == 0)
            measured_stop = start + sum(1 for c in cats if c < 2)
            device, dtype = key
            buffer = torch.ones(scaled_stop - start, dtype=accumulation_dtype(dtype), device=device)
            buckets.append(
                _Bucket(device, start, stop, measured_stop, scaled_stop, buffer, buffer.unbind(0))
            )
            start = stop
        return buckets

    def _make_groups(
        self, strategies: Sequence[Strategy], states: dict[object, dict[str, object]]
    ) -> list[_Group]:
        keyed: dict[object, list[int]] = {}
        for lid, strategy in enumerate(strategies):
            if self.layer_has_grad[lid]:
                keyed.setdefault(strategy.group_key(), []).append(lid)
        positions_of_layer: dict[int, list[int]] = {}
        for p, lid in enumerate(self.tensor_layer_ids):
            positions_of_layer.setdefault(lid, []).append(p)

        groups = []
        dev = self.device
        every_position = list(range(self.num_tensors))
        for key, layer_ids in keyed.items():
            strategy = strategies[layer_ids[0]]
            local = {lid: k for k, lid in enumerate(layer_ids)}
            positions = sorted(p for lid in layer_ids for p in positions_of_layer[lid])
            thresholds = [float(strategies[lid].threshold) for lid in layer_ids]
            if key not in states:
                states[key] = strategy.init_state(len(layer_ids), dev, self.acc_dtype)
            groups.append(
                _Group(
                    strategy=strategy,
                    layer_ids=layer_ids,
                    positions=positions,
                    tensor_layer=torch.tensor(
                        [local[self.tensor_layer_ids[p]] for p in positions],
                        dtype=torch.long,
                        device=dev,
                    ),
                    layer_ids_t=torch.tensor(layer_ids, dtype=torch.long, device=dev),
                    positions_t=torch.tensor(positions, dtype=torch.long, device=dev),
                    layer_thresholds=torch.tensor(thresholds, dtype=self.acc_dtype, device=dev),
                    host_thresholds=[
                        thresholds[local[self.tensor_layer_ids[p]]] for p in positions
                    ],
                    covers_all=positions == every_position
                    and layer_ids == list(range(self.num_layers)),
                    state=states[key],
                    layer_names=[self.layer_names[i] for i in layer_ids],
                    param_names=[self.names[p] for p in positions],
                    params=[self.params[p] for p in positions],
                )
            )
        return groups


def _check_layer_devices(
    layers: Sequence[Layer], signature: _Signature, flat_layer: list[int], names: list[str]
) -> None:
    first: dict[int, tuple[torch.device, str]] = {}
    for i, sig in enumerate(signature):
        if sig is None:
            continue
        lid = flat_layer[i]
        if lid not in first:
            first[lid] = (sig[0], names[i])
        elif sig[0] != first[lid][0]:
            raise RuntimeError(
                f"layer {layers[lid].name!r} has gradients on different devices: "
                f"{first[lid][1]!r} on {first[lid][0]} and {names[i]!r} on {sig[0]}. "
                "Move the layer to one device, or split it with a custom grouping."
            )


class Engine:
    """Runs normalization steps over a fixed list of layers, caching the plan.

    Args:
        layers: the layers, see `gradclip.core.layers.build_layers`.
        strategies: one strategy per layer.
        measure_all: also measure the norms of layers whose strategy needs none
            (``None`` and element-wise clipping), for telemetry; costs one read of
            their gradients.
        nonfinite: what to do with layers whose norm is inf or NaN, see
            `gradclip.core.nonfinite.check_nonfinite`; any policy but
            ``"propagate"`` measures every layer (as ``measure_all``).
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        strategies: Sequence[Strategy],
        *,
        measure_all: bool = False,
        nonfinite: str = "propagate",
    ) -> None:
        if len(layers) != len(strategies):
            raise ValueError("one strategy per layer is required")
        self.layers = list(layers)
        self.strategies = list(strategies)
        self.nonfinite = check_nonfinite(nonfinite)
        self.measure_all = measure_all or self.nonfinite != "propagate"
        # set by the "error" and "skip" policies: the non-finite layers of the last step
        self.last_nonfinite: list[str] = []
        self.params = [p for layer in self.layers for p in layer.params]
        self._names = [
            layer.qualified(k) for layer in self.layers for k in range(len(layer.params))
        ]
        self._plan: Plan | None = None
        self._signature: _Signature | None = None
        self.states: dict[object, dict[str, object]] = {}

    def gather(self) -> tuple[list[torch.Tensor | None], _Signature]:
        """Current gradients (``None`` where skipped) and their signature, validated.

        Raises before anything is modified if a gradient is sparse or complex,
        or if a layer's gradients sit on different devices.
        """
        grads = [p.grad if p.requires_grad else None for p in self.params]
        signature: _Signature = [
            None if g is None else (g.device, g.dtype, g.layout) for g in grads
        ]
        if signature != self._signature:
            for name, g in zip(self._names, grads):
                if g is not None:
                    check_gradient(name, g)
        return grads, signature

    def plan(
        self, signature: _Signature, grads: Sequence[torch.Tensor | None] | None = None
    ) -> Plan:
        """The cached plan for this signature, rebuilt if the gradients' layout changed."""
        if self._plan is None or signature != self._signature:
            self._plan = Plan(
                self.layers,
                self.strategies,
                signature,
                params=self.params,
                measure_all=self.measure_all,
                states=self.states,
                grads=grads,
            )
            self._signature = signature
        return self._plan

    @torch.no_grad()
    def step(self) -> NormReport:
        """Normalize the current gradients in place and report what was measured.

        Runs under ``torch.no_grad()``, as ``clip_grad_norm_`` does: gradients made
        with ``create_graph=True`` are rescaled without recording autograd history.
        """
        grads_by_param, signature = self.gather()
        plan = self.plan(signature, grads_by_param)
        grads = plan.select(grads_by_param)
        if plan.sharding is not None:
            grads = plan.sharding.local(grads)
        if not grads:
            return NormReport.empty(plan)
        reduced: list[CrossRank | None] | None = None
        if plan.sharding is None:
            tensor_norms, layer_norms = self.measure(plan, grads)
        else:
            tensor_norms, layer_norms, reduced = _measure_sharded(plan, grads)
        reported = (tensor_norms, layer_norms)
        dropped: torch.Tensor | None = None
        zeroed: torch.Tensor | None = None
        if self.nonfinite in ("error", "skip"):
            self.last_nonfinite = read_nonfinite(plan, layer_norms)  # the one host read
            if self.last_nonfinite and self.nonfinite == "error":
                raise_nonfinite(self.last_nonfinite)
            if self.last_nonfinite:  # "skip": leave every gradient and state as it is
                unchanged = torch.zeros(plan.num_layers, dtype=torch.bool, device=plan.device)
                return NormReport(plan, tensor_norms, layer_norms, unchanged, [])
        elif self.nonfinite == "zero":
            tensor_norms, layer_norms, dropped = zero_nonfinite_(plan, grads, *reported)
            if reduced is not None:  # strategies' reduced quantities predate the zeroing
                zeroed = dropped.index_select(0, plan.measured_layer_t)
        coefficients: torch.Tensor | None = None
        changed = torch.zeros(plan.num_layers, dtype=torch.bool, device=plan.device)
        stats: list[tuple[list[str], dict[str, torch.Tensor]]] = []
        for gi, group in enumerate(plan.groups):
            view = _view(plan, group, grads, tensor_norms, layer_norms)
            if reduced is not None:
                view.reduced = reduced[gi]
                if zeroed is not None:
                    view.zeroed = (
                        zeroed if group.covers_all else zeroed.index_select(0, group.positions_t)
                    )
            strategy = group.strategy
            if strategy.scales:
                coef = strategy.scale(view)
                if group.covers_all:
                    coefficients = coef
                else:
                    if coefficients is None:
                        coefficients = torch.ones_like(tensor_norms)
                    coefficients.index_copy_(0, group.positions_t, coef.to(coefficients.dtype))
                flags = torch.zeros(len(group.layer_ids), dtype=torch.int32, device=plan.device)
                flags.index_add_(0, group.tensor_layer, (coef != 1).to(torch.int32))
                changed.index_copy_(0, group.layer_ids_t, flags > 0)
            else:
                strategy.transform_(view)
                flags_or_none = strategy.layer_changed(view)
                if flags_or_none is not None:
                    changed.index_copy_(0, group.layer_ids_t, flags_or_none)
            if view.stats:
                stats.append((group.layer_names, dict(view.stats)))
        if coefficients is not None:
            multiply_(plan, grads, coefficients)
        if dropped is not None:
            changed |= dropped
        return NormReport(plan, *reported, changed, stats)

    @staticmethod
    def measure(plan: Plan, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T,)`` per-tensor and ``(L,)`` per-layer L2 norms; NaN where not measured."""
        tensor_norms = _local_norms(plan, grads)
        if plan.sharding is not None and plan.any_measured:
            tensor_norms = plan.sharding.reduce_norms(tensor_norms)  # the step's one collective
        return tensor_norms, _layer_norms(plan, tensor_norms)


def _local_norms(plan: Plan, grads: list[torch.Tensor]) -> torch.Tensor:
    """``(T,)`` L2 norm of each of ``grads`` (local pieces if sharded); NaN where not measured."""
    acc = plan.acc_dtype
    parts: list[torch.Tensor] = []
    for bucket in plan.buckets:
        if bucket.measured_stop > bucket.start:
            norms = foreach_l2_norms(grads[bucket.start : bucket.measured_stop], acc)
            parts.append(norms.to(plan.device, non_blocking=True))
        if bucket.stop > bucket.measured_stop:
            parts.append(
                torch.full(
                    (bucket.stop - bucket.measured_stop,),
                    float("nan"),
                    dtype=acc,
                    device=plan.device,
                )
            )
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _layer_norms(plan: Plan, tensor_norms: torch.Tensor) -> torch.Tensor:
    """``(L,)`` per-layer L2 norms from the per-tensor ones; NaN where not measured."""
    acc = plan.acc_dtype
    if not plan.any_measured:
        return torch.full((plan.num_layers,), float("nan"), dtype=acc, device=plan.device)
    measured = (
        tensor_norms
        if plan.all_measured
        else tensor_norms.index_select(0, plan.measured_positions_t)
    )
    squares = torch.zeros(plan.num_layers, dtype=acc, device=plan.device)
    squares.index_add_(0, plan.measured_layer_t, measured.square())
    layer_norms = squares.sqrt_()
    if not plan.all_layers_measured:
        layer_norms = torch.where(plan.layer_measured_t, layer_norms, math.nan)
    return layer_norms


def _measure_sharded(
    plan: Plan, grads: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[CrossRank | None]]:
    """`Engine.measure` on local pieces, plus each group's `Strategy.cross_rank`.

    The L2 norms and every strategy's declared quantities travel in one
    collective (none if there is nothing to reduce). Returns the global norms
    and, per group, its reduced quantities (``None`` where it declared none).
    """
    assert plan.sharding is not None
    tensor_norms = _local_norms(plan, grads)
    asked: list[int] = []
    extras: list[CrossRank] = []
    for gi, group in enumerate(plan.groups):
        if group.asks_cross_rank:
            extra = group.strategy.cross_rank(_view(plan, group, grads, None, None))
            if extra is not None:
                asked.append(gi)
                extras.append(extra)
    reduced: list[CrossRank | None] = [None] * len(plan.groups)
    if plan.any_measured or extras:
        norms, out = plan.sharding.reduce(tensor_norms if plan.any_measured else None, extras)
        if norms is not None:
            tensor_norms = norms
        for gi, values in zip(asked, out):
            reduced[gi] = values
    return tensor_norms, _layer_norms(plan, tensor_norms), reduced


def _view(
    plan: Plan,
    group: _Group,
    grads: list[torch.Tensor],
    tensor_norms: torch.Tensor | None,
    layer_norms: torch.Tensor | None,
) -> GroupView:
    # tensor_norms None: the view a strategy's cross_rank sees, before the reduction
    norms: torch.Tensor | None = tensor_norms
    layers: torch.Tensor | None = layer_norms
    if group.covers_all:
        group_grads = grads
    else:
        group_grads = [grads[p] for p in group.positions]
        if tensor_norms is not None and layer_norms is not None:
            norms = tensor_norms.index_select(0, group.positions_t)
            layers = layer_norms.index_select(0, group.layer_ids_t)
    measured = group.strategy.measures_norms or plan.all_measured
    return GroupView(
        layer_names=group.layer_names,
        param_names=group.param_names,
        grads=group_grads,
        params=group.params if plan.sharding is None else plan.sharding.local(group.params),
        tensor_layer=group.tensor_layer,
        layer_thresholds=group.layer_thresholds,
        host_thresholds=group.host_thresholds,
        tensor_norms=norms if measured else None,
        layer_norms=layers if measured else None,
        device=plan.device,
        dtype=plan.acc_dtype,
        state=group.state,
        cache=group.cache,
        shards=group.shards,
    )


def multiply_(plan: Plan, grads: list[torch.Tensor], coefficients: torch.Tensor) -> None:
    """``grads[i] *= coefficients[i]`` for every scaled tensor: one ``_foreach_mul_`` per bucket.

    The coefficients are copied into a buffer cached per bucket whose 0-d views
    were made once, so a step creates no per-tensor Python objects.
    """
    for bucket in plan.buckets:
        if bucket.scaled_stop == bucket.start:
            continue
        bucket.coefficients.copy_(
            coefficients[bucket.start : bucket.scaled_stop], non_blocking=True
        )
        torch._foreach_mul_(grads[bucket.start : bucket.scaled_stop], bucket.coefficient_views)
