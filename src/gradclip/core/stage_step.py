"""Preparing a step for `gradclip.core.engine.Engine`: gather, plan, measure, reduce.

On a sharded model the step's one collective runs here, with the ranks'
agreement checked inside it (`gradclip.core.collective`); on pipeline stages
the stages' slots ride in it (`gradclip.core.pipeline`), or are the step's only
collective (`prepare_stages`), and `across_stages` gives the totals over every
stage once it ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gradclip.core.collective import ShardedModel, StepCollective, sharded_model
from gradclip.core.measure import (
    LocalParts,
    Measurement,
    finish,
    judged_layer_norms,
    measure,
    measure_local,
)
from gradclip.core.mesh_group import reduction_group
from gradclip.core.nonfinite import bad_layers, judge_unsquared
from gradclip.core.pipeline import Pipeline, transport_for
from gradclip.core.plan import Plan, accumulation_dtype_of
from gradclip.core.report import NormReport
from gradclip.core.sharding import is_dtensor, local_tensors
from gradclip.core.stage_transport import RELAYOUT, REPAIR, StageLayoutError, StageTransport

__all__ = [
    "UNKNOWN",
    "acc_of",
    "across_stages",
    "bad_before",
    "bad_tensors",
    "dp_ranks",
    "prepare_stages",
    "prepare_step",
    "stage_round",
]

UNKNOWN: Any = object()  # the sharded model's collective, before the first step sizes it


def prepare_step(engine: Any) -> tuple[Plan, list[torch.Tensor], Measurement] | NormReport:
    """Gather, plan and measure the step: on a sharded model, with its one collective.

    Every rank of a sharded model takes part in the collective, with or
    without gradients, and raises the same error if the ranks disagree (see
    `gradclip.core.collective`), before anything is modified. Returns the
    report of a step without any gradient instead of measuring.
    """
    if not engine._agreed:
        engine._agree()
    if engine._sharded is UNKNOWN:
        engine._sharded = sharded_model(
            engine.layers,
            engine.rules,
            engine.params,
            engine._names,
            trainable=engine._trainable(),
            measure_all=engine.measure_all,
            store=engine.store,
            tags=engine.tags,
        )
    sharded = engine._sharded
    collective = None if sharded is None else sharded.collective
    pipe = engine.pipeline if engine.pipeline is not None and engine.pipeline.active else None
    engine._stage_squares = None
    if pipe is not None and engine._transport is None:
        engine._transport = transport_for(
            pipe, None if sharded is None else dp_ranks(engine.params)
        )
    if pipe is not None and collective is None:
        return prepare_stages(engine, pipe, sharded)
    if collective is None:  # plain tensors, or a configuration that reduces nothing
        plan, grads = planned(engine, sharded)
        if not grads:
            return NormReport.empty(plan)
        return plan, grads, measure(plan, grads)
    body = None
    transport = engine._transport
    sums, maxima = (
        (None, None) if pipe is None else pipe.partials(None, None, *acc_of(engine.params))
    )
    try:
        grads_by_param, signature = engine.gather()
        plan = engine.plan(signature, grads_by_param)
        grads = local_tensors(plan.select(grads_by_param))
        parts = measure_local(plan, grads)
        if pipe is not None:
            bad = bad_before(pipe, plan, grads, parts)
            sums, maxima = pipe.partials(plan, parts, *acc_of(engine.params), bad)
        if plan.sharding is not None:
            body = plan.sharding.pack(parts.norms, parts.extras, collective.capacity)
        fingerprint = collective.cached(plan)
        if fingerprint is None:
            dtypes = [None if sig is None else sig[1] for sig in signature]
            fingerprint = collective.fingerprint(dtypes, key=plan)
    except Exception as error:  # still take part, so that no rank waits for this one
        raw = [p.grad if t else None for p, t in zip(engine.params, engine._trainable())]
        dtypes = [None if g is None else g.dtype for g in raw]
        reduce = None
        if transport is not None and pipe is not None:
            zeros = pipe.partials(None, None, *acc_of(engine.params))
            reduce = transport.reducer(*zeros)
        _exchange(collective, transport, collective.fingerprint(dtypes), True, None, reduce)
        raise error
    reduce = None
    if transport is not None and sums is not None and maxima is not None:
        reduce = transport.reducer(sums, maxima)
    reduced, alarms = _exchange(collective, transport, fingerprint, False, body, reduce)
    plan.changes_group = sharded.changes  # type: ignore[union-attr]
    if not grads:
        return NormReport.empty(plan)
    if plan.sharding is None:  # no DTensor gradient on any rank: nothing to reduce
        measured = finish(plan, parts)
    else:
        values = plan.sharding.unpack(reduced, parts.norms, parts.extras, collective.capacity)
        measured = finish(plan, parts, values)
    if alarms[REPAIR:] and alarms[REPAIR] and transport is not None and pipe is not None:
        # a tensor was not finite somewhere under nonfinite="zero": now that this
        # stage's norms are whole, send the sums of its finite layers again
        exact = bad_tensors(plan, bad_layers(plan, judged_layer_norms(plan, measured)))
        transport.rows(*pipe.partials(plan, parts, *acc_of(engine.params), exact))
    return plan, grads, across_stages(engine, plan, measured)


def _exchange(
    collective: StepCollective,
    transport: StageTransport | None,
    fingerprint: torch.Tensor,
    failed: bool,
    body: torch.Tensor | None,
    reduce: Any,
) -> tuple[torch.Tensor, list[bool]]:
    """`StepCollective.exchange`, run again in the new layout after a stage's changed
    (`gradclip.core.stage_transport`: every rank sees it in the same read)."""
    reduced, alarms = collective.exchange(fingerprint, failed, body, reduce)
    if alarms and alarms[RELAYOUT]:
        assert transport is not None
        transport.settle()
        reduced, alarms = collective.exchange(fingerprint, failed, body, reduce)
        if alarms and alarms[RELAYOUT]:  # every rank sees it alike: none waits
            raise StageLayoutError("the pipeline stages' layout changed twice within one step")
    return reduced, alarms


def planned(engine: Any, sharded: ShardedModel | None) -> tuple[Plan, list[torch.Tensor]]:
    """The step's plan and the gradients it selects (their local pieces, when sharded)."""
    grads_by_param, signature = engine.gather()
    plan = engine.plan(signature, grads_by_param)
    plan.changes_group = None if sharded is None else sharded.changes
    grads = plan.select(grads_by_param)
    return plan, local_tensors(grads) if plan.sharding is not None else grads


def prepare_stages(
    engine: Any, pipe: Pipeline, sharded: ShardedModel | None
) -> tuple[Plan, list[torch.Tensor], Measurement] | NormReport:
    """A step on pipeline stages without a data-parallel collective: the stages'
    slots are the step's one collective, which every rank takes part in."""
    transport = engine._transport
    assert transport is not None
    try:
        plan, grads = planned(engine, sharded)
        parts = measure_local(plan, grads)
        bad = bad_before(pipe, plan, grads, parts)
        sums, maxima = pipe.partials(plan, parts, *acc_of(engine.params), bad)
    except Exception:  # still take part, so that no rank waits for this one
        zeros = pipe.partials(None, None, *acc_of(engine.params))
        transport.pending = None
        if pipe.now:
            transport.run(None, *zeros)
        _rounds_without(engine, zeros)
        raise
    transport.reduced = transport.pending = None
    if pipe.now:
        transport.run(None, sums, maxima)
    else:  # the first later round's collective carries them
        transport.pending = (sums, maxima)
    if not grads:
        _rounds_without(engine, pipe.partials(None, None, *acc_of(engine.params)))
        return NormReport.empty(plan)
    return plan, grads, across_stages(engine, plan, finish(plan, parts))


def _rounds_without(engine: Any, zeros: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Take part in the later rounds' collectives of a step this rank does not run."""
    transport = engine._transport
    for _ in engine.pipeline.later_rounds:
        transport.rows(*(transport.pending or zeros))
        transport.pending = None


def stage_round(
    engine: Any,
    plan: Plan,
    k: int,
    grads: list[torch.Tensor],
    measured: Measurement,
    divisor: torch.Tensor | None,
) -> None:
    """Before round ``k > 0`` on pipeline stages: the norms of the groups whose ``k``-th
    member spans layers, measured again (the earlier rounds changed the gradients),
    and their totals over every stage, in one collective for all of them.

    A stage without such a group (or that ran fewer rounds) sends zeros, so that
    every rank takes part. The collective also carries the step's sums when none
    ran before round 0 (`gradclip.core.pipeline.Pipeline.now`).
    """
    pipe, transport = engine.pipeline, engine._transport
    assert pipe is not None and transport is not None
    norms: dict[int, torch.Tensor] = {}
    for gi, p in pipe.round_groups(plan, k):
        stage = plan.groups[gi].stages[k]
        assert stage.norm_runs is not None
        n = stage.norm_runs.norms(grads, p, plan.device, plan.acc_dtype)
        norms[gi] = measured.later_norms[k, gi] = n if divisor is None else n / divisor
    base = transport.pending
    transport.pending = None
    zeros = pipe.partials(None, None, plan.acc_dtype, plan.device)
    transport.rows(*pipe.round_partials(plan, k, norms, base or zeros))
    assert transport.reduced is not None
    totals = pipe.totals(plan, *transport.reduced, k=k, base=base is not None)
    measured.later_totals.update({(k, gi): t for gi, t in totals.norms.items()})
    if base is not None:
        engine._stage_squares = totals.squares
        if totals.anywhere is not None:
            measured.stage_bad = (totals.anywhere, totals.bad)


def bad_before(
    pipe: Pipeline, plan: Plan, grads: list[torch.Tensor], parts: LocalParts
) -> torch.Tensor | None:
    """``(T,)`` bool, the tensors that count as not finite before the collective
    (``nonfinite="zero"``/``"skip"`` on stages; ``None`` otherwise).

    Whole tensors (replicated, DDP): every tensor of a layer judged not finite, as
    the step will judge it. Sharded: the tensors whose piece on this rank is not
    finite (then so is the whole), the count that tells every stage; under
    ``"zero"`` the sums are sent again once this stage's norms are whole.
    """
    if not pipe.flags or not plan.num_tensors:
        return None
    if plan.sharding is None:
        measured = finish(plan, parts)
        judged = judge_unsquared(plan, grads, judged_layer_norms(plan, measured))
        return bad_tensors(plan, bad_layers(plan, judged))
    bad = torch.zeros(plan.num_tensors, dtype=torch.bool, device=plan.device)
    if parts.norms is not None:
        bad.index_copy_(0, plan.measured_positions_t, ~torch.isfinite(parts.norms))
    for gi, norms in parts.p_norms.items():
        positions = plan.groups[gi].positions_t
        bad.index_copy_(0, positions, bad.index_select(0, positions) | ~torch.isfinite(norms))
    return bad


def bad_tensors(plan: Plan, layers: torch.Tensor) -> torch.Tensor:
    """``(T,)`` bool: the measured tensors of the ``(L,)`` flagged layers."""
    out = torch.zeros(plan.num_tensors, dtype=torch.bool, device=plan.device)
    if plan.any_measured:
        out.index_copy_(0, plan.measured_positions_t, layers.index_select(0, plan.measured_layer_t))
    return out


def across_stages(engine: Any, plan: Plan, measured: Measurement) -> Measurement:
    """``measured`` with the totals over every stage (after the collective)."""
    transport, pipe = engine._transport, engine.pipeline
    if transport is None or pipe is None or transport.reduced is None:
        return measured
    totals = pipe.totals(plan, *transport.reduced)
    measured.stage_totals, engine._stage_squares = totals.norms, totals.squares
    if totals.anywhere is not None:
        measured.stage_bad = (totals.anywhere, totals.bad)
    return measured


def acc_of(params: Sequence[torch.Tensor]) -> tuple[torch.dtype, torch.device]:
    """The accumulation dtype and the device of an engine's norms."""
    device = params[0].device if params else torch.device("cpu")
    return accumulation_dtype_of(device), device


def dp_ranks(params: Sequence[torch.Tensor]) -> int:
    """How many ranks the step of the sharded parameters reduces over (one stage's ranks:
    their mesh's, or the largest mesh's with expert parallel, see
    `gradclip.core.mesh_group`)."""
    meshes: list[Any] = []
    for p in params:
        if is_dtensor(p) and p.device_mesh not in meshes:  # type: ignore[attr-defined]
            meshes.append(p.device_mesh)  # type: ignore[attr-defined]
    return reduction_group(meshes).size
