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

from gradclip.core.collective import ShardedModel, sharded_model
from gradclip.core.measure import Measurement, finish, measure, measure_local
from gradclip.core.mesh_group import reduction_group
from gradclip.core.pipeline import Pipeline, transport_for
from gradclip.core.plan import Plan, accumulation_dtype_of
from gradclip.core.report import NormReport
from gradclip.core.sharding import is_dtensor, local_tensors

__all__ = ["UNKNOWN", "acc_of", "across_stages", "dp_ranks", "prepare_stages", "prepare_step"]

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
        grads_by_param, signature = engine.gather()
        plan = engine.plan(signature, grads_by_param)
        plan.changes_group = None if sharded is None else sharded.changes
        grads = plan.select(grads_by_param)
        if plan.sharding is not None:
            grads = local_tensors(grads)
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
            sums, maxima = pipe.partials(plan, parts, *acc_of(engine.params))
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
        collective.exchange(collective.fingerprint(dtypes), True, None, reduce)
        raise error
    reduce = None
    if transport is not None and sums is not None and maxima is not None:
        reduce = transport.reducer(sums, maxima)
    reduced = collective.exchange(fingerprint, False, body, reduce)
    plan.changes_group = sharded.changes  # type: ignore[union-attr]
    if not grads:
        return NormReport.empty(plan)
    if plan.sharding is None:  # no DTensor gradient on any rank: nothing to reduce
        return plan, grads, across_stages(engine, plan, finish(plan, parts))
    values = plan.sharding.unpack(reduced, parts.norms, parts.extras, collective.capacity)
    return plan, grads, across_stages(engine, plan, finish(plan, parts, values))


def prepare_stages(
    engine: Any, pipe: Pipeline, sharded: ShardedModel | None
) -> tuple[Plan, list[torch.Tensor], Measurement] | NormReport:
    """A step on pipeline stages without a data-parallel collective: the stages'
    slots are the step's one collective, which every rank takes part in."""
    transport = engine._transport
    assert transport is not None
    try:
        grads_by_param, signature = engine.gather()
        plan = engine.plan(signature, grads_by_param)
        plan.changes_group = None if sharded is None else sharded.changes
        grads = plan.select(grads_by_param)
        if plan.sharding is not None:
            grads = local_tensors(grads)
        parts = measure_local(plan, grads)
        sums, maxima = pipe.partials(plan, parts, *acc_of(engine.params))
    except Exception:  # still take part, so that no rank waits for this one
        transport.run(None, *pipe.partials(None, None, *acc_of(engine.params)))
        raise
    transport.run(None, sums, maxima)
    if not grads:
        return NormReport.empty(plan)
    return plan, grads, across_stages(engine, plan, finish(plan, parts))


def across_stages(engine: Any, plan: Plan, measured: Measurement) -> Measurement:
    """``measured`` with the totals over every stage (after the collective)."""
    transport, pipe = engine._transport, engine.pipeline
    if transport is None or pipe is None or transport.reduced is None:
        return measured
    measured.stage_totals, engine._stage_squares = pipe.totals(plan, *transport.reduced)
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
