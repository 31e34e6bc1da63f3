"""Measuring a step: the norms the rules read, and on sharded gradients their reduction.

Once per step, before any rule runs: the L2 norm of every measured tensor (one
``_foreach_norm`` per device and dtype), the p-norms of rules whose order is
not 2, and per layer the L2 norm of its tensors. On sharded gradients each of
these is first measured on the rank's local pieces (`measure_local`), then
summed over ranks with the step's one collective (`gradclip.core.sharding`),
together with the strategies' `CrossRank` quantities; `finish` turns the
reduced values into the step's `Measurement`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gradclip.core.kernels import add_at_
from gradclip.core.plan import Plan
from gradclip.core.rule import CrossRank, Measured, Shards
from gradclip.core.sharding import Capacity, local_tensors

__all__ = [
    "LocalParts",
    "Measurement",
    "capacity_of",
    "finish",
    "judged_layer_norms",
    "layer_norms",
    "measure",
    "measure_local",
    "p_norm_parts",
    "p_norms_from",
]


@dataclass(eq=False)
class Measurement:
    """The norms of a step, measured once before any rule runs."""

    tensor_norms: torch.Tensor  # (T,) L2, NaN where not measured
    layer_norms: torch.Tensor  # (L,) L2, NaN where not measured
    p_norms: dict[int, torch.Tensor]  # group index -> (T_g,) norms of its rule's order p != 2
    reduced: dict[int, CrossRank]  # group index -> its rule's reduced cross-rank quantities
    # pipeline stages: group index -> {p: norm of its gradients on every stage}
    stage_totals: dict[int, dict[float, torch.Tensor]] | None = None
    # pipeline stages, nonfinite "zero"/"skip": (a tensor on some stage was not
    # finite, {spanning group index: one of its tensors on some stage was not})
    stage_bad: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None
    # chain members after the first that span layers: (round, group index) -> the
    # norms measured again before the round, and {p: their total on every stage}
    later_norms: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    later_totals: dict[tuple[int, int], dict[float, torch.Tensor]] = field(default_factory=dict)


@dataclass(eq=False)
class LocalParts:
    """What one rank measured of a step, before any reduction.

    ``extras`` are the sharded step's cross-rank quantities: the parts of the
    p-norms, then the rules' own, each owned by ``("p" | "rule", group)``.
    """

    norms: torch.Tensor | None  # (T_measured,) L2 of the measured tensors' local pieces
    p_norms: dict[int, torch.Tensor]  # group index -> local p-norms
    extras: list[CrossRank] = field(default_factory=list)
    owners: list[tuple[str, int]] = field(default_factory=list)


def layer_norms(
    norms: torch.Tensor, tensor_layer: torch.Tensor, num_layers: int, norm_type: float
) -> torch.Tensor:
    """``(L,)`` p-norm of each layer's tensors from their ``(T,)`` p-norms."""
    if norm_type == math.inf:
        out = torch.zeros(num_layers, dtype=norms.dtype, device=norms.device)
        return out.scatter_reduce_(0, tensor_layer, norms, "amax")
    powers = torch.zeros(num_layers, dtype=norms.dtype, device=norms.device)
    if norm_type == 2.0:
        return add_at_(powers, tensor_layer, norms.square()).sqrt_()
    return add_at_(powers, tensor_layer, norms.pow(norm_type)).pow_(1.0 / norm_type)


def p_norm_parts(norms: torch.Tensor, norm_type: float, weights: torch.Tensor) -> CrossRank:
    """This rank's part of per-tensor p-norms: ``w·‖g_local‖_p^p`` summed, or ``max|g|`` maximized.

    ``weights`` are ``1 / replicas`` of each piece, so a replicated piece is
    counted once; a maximum needs no weight.
    """
    if norm_type == math.inf:
        return CrossRank(maxima=norms)
    return CrossRank(sums=norms.pow(norm_type).mul_(weights))


def p_norms_from(reduced: CrossRank, norm_type: float) -> torch.Tensor:
    """The full tensors' p-norms from the reduced `p_norm_parts`."""
    if norm_type == math.inf:
        assert reduced.maxima is not None
        return reduced.maxima
    assert reduced.sums is not None
    return reduced.sums.pow(1.0 / norm_type)


def measure_local(plan: Plan, grads: list[torch.Tensor]) -> LocalParts:
    """The step's norms on this rank's pieces, and (sharded) what rides in the collective."""
    dev, acc = plan.device, plan.acc_dtype
    local = plan.measured.norms(grads, 2.0, dev, acc) if plan.any_measured else None
    p_norms: dict[int, torch.Tensor] = {}
    for gi, group in enumerate(plan.groups):
        stage = group.stages[0]
        if stage.norm_runs is not None and stage.rule.norm_type is not None:
            p_norms[gi] = stage.norm_runs.norms(grads, stage.rule.norm_type, dev, acc)
    parts = LocalParts(local, p_norms)
    if plan.sharding is not None:
        for gi, norms in p_norms.items():
            group = plan.groups[gi]
            p = group.stages[0].rule.norm_type
            assert group.shard_weights is not None and p is not None
            parts.extras.append(p_norm_parts(norms, p, group.shard_weights))
            parts.owners.append(("p", gi))
        _rule_extras(plan, grads, parts)
    return parts


def _rule_extras(plan: Plan, grads: list[torch.Tensor], parts: LocalParts) -> None:
    for gi, group in enumerate(plan.groups):
        if not group.asks_cross_rank:
            continue
        stage = group.stages[0]
        m = Measured(
            grads=[grads[p] for p in group.positions],
            params=local_tensors(group.params),
            norms=None,
            layer_norms=None,
            layout=stage.layout,
            prepared=stage.prepared,
            shards=Shards(group.shard_weights),  # type: ignore[arg-type]
        )
        extra = stage.rule.cross_rank(m)
        if extra is not None:
            parts.extras.append(extra)
            parts.owners.append(("rule", gi))


def capacity_of(plan: Plan, stand_ins: list[torch.Tensor]) -> Capacity:
    """What a step of ``plan`` sends, from its layout (``stand_ins``: tensors shaped like
    the local gradients, e.g. the parameters' local pieces, for the rules' `cross_rank`)."""
    if plan.sharding is None:
        return Capacity()
    sums = maxima = 0
    for group in plan.groups:
        stage = group.stages[0]
        p = stage.rule.norm_type
        if stage.norm_runs is not None and p is not None:
            if p == math.inf:
                maxima += len(group.positions)
            else:
                sums += len(group.positions)
    parts = LocalParts(None, {})
    _rule_extras(plan, stand_ins, parts)
    rules = Capacity.of(None, parts.extras)
    norms = len(plan.measured_positions_t) if plan.any_measured else 0
    return Capacity(norms, sums + rules.sums, maxima + rules.maxima)


def finish(
    plan: Plan,
    parts: LocalParts,
    reduced: tuple[torch.Tensor | None, list[CrossRank]] | None = None,
) -> Measurement:
    """The step's `Measurement` from the local parts and (sharded) their reduction."""
    local, p_norms = parts.norms, parts.p_norms
    out: dict[int, CrossRank] = {}
    if reduced is not None:
        local, values = reduced
        p_norms = {}
        for (kind, gi), value in zip(parts.owners, values):
            if kind == "p":
                p = plan.groups[gi].stages[0].rule.norm_type
                assert p is not None
                p_norms[gi] = p_norms_from(value, p)
            else:
                out[gi] = value
    dev, acc = plan.device, plan.acc_dtype
    if local is None:
        tensor_norms = torch.full((plan.num_tensors,), math.nan, dtype=acc, device=dev)
        layers = torch.full((plan.num_layers,), math.nan, dtype=acc, device=dev)
        return Measurement(tensor_norms, layers, p_norms, out)
    if plan.all_measured:
        tensor_norms = local
    else:
        tensor_norms = torch.full((plan.num_tensors,), math.nan, dtype=acc, device=dev)
        tensor_norms.index_copy_(0, plan.measured_positions_t, local)
    layers = layer_norms(local, plan.measured_layer_t, plan.num_layers, 2.0)
    if not all(plan.layer_measured):
        layers = torch.where(plan.layer_measured_t, layers, math.nan)
    return Measurement(tensor_norms, layers, p_norms, out)


def measure(plan: Plan, grads: list[torch.Tensor]) -> Measurement:
    """Measure a step; gradients that are ``DTensor`` s are reduced, unchecked.

    Used where the step has no `gradclip.core.collective`: plain tensors (one
    process, DDP) are measured locally and send nothing.
    """
    parts = measure_local(plan, grads)
    if plan.sharding is None or (parts.norms is None and not parts.extras):
        return finish(plan, parts)
    return finish(plan, parts, plan.sharding.reduce(parts.norms, parts.extras))


def judged_layer_norms(plan: Plan, measured: Measurement) -> torch.Tensor:
    """``(L,)`` the norm each layer is judged finite or not by: the one its rule reads."""
    if not measured.p_norms:
        return measured.layer_norms
    judged = measured.layer_norms.clone()
    for gi, norms in measured.p_norms.items():
        group = plan.groups[gi]
        p = group.stages[0].rule.norm_type
        assert p is not None
        layer = layer_norms(norms, group.stages[0].layout.tensor_layer, len(group.layer_ids), p)
        judged.index_copy_(0, group.layer_ids_t, layer)
    return judged
