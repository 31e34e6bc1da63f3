"""A round of a step: the ``k``-th rule of every group, called, then applied.

Every rule of the round computes first (scaling rules before in-place ones),
then the states are written and the coefficients multiplied in, one launch
per device and dtype for all the round's scaling rules together.
"""

from __future__ import annotations

import torch

from gradclip.core.kernels import add_at_
from gradclip.core.measure import Measurement
from gradclip.core.measure import layer_norms as _layer_norms
from gradclip.core.plan import Group, Plan, Stage
from gradclip.core.rule import Measured, ScalingRule, Shards
from gradclip.core.sharding import local_tensors
from gradclip.core.state import StateStore
from gradclip.core.validation import check_coefficients

__all__ = ["run_round", "select"]


def run_round(
    store: StateStore,
    plan: Plan,
    k: int,
    grads: list[torch.Tensor],
    measured: Measurement,
    zeroed: torch.Tensor | None,
    finite: torch.Tensor | None,
    changed: torch.Tensor,
    unknown: list[list[int]],
    stats: list[tuple[list[str], dict[str, torch.Tensor]]],
    seen: dict[int, set[str]],
    divisor: torch.Tensor | None = None,
    fold: bool = False,
) -> torch.Tensor | None:
    """Round ``k``: every rule computes, then states are written and coefficients multiplied.

    Scaling rules run before in-place ones (the plan orders them so), and nothing
    is written before every rule of the round has returned: a rule that raises
    leaves the round's state and the gradients of every scaling rule untouched.

    ``divisor``: the gradients are stored as the true ones over it (re-measured
    norms are divided by it); with ``fold`` (a round of one uniform coefficient
    ``c``, see `gradclip.core.folding`) nothing is multiplied and the divisor
    returned is ``divisor / c``, else ``divisor`` itself.
    """
    round_ = plan.rounds[k]
    coefficients: torch.Tensor | None = None
    done = []
    for group, stage in round_.stages:
        m = measured_for(store, plan, group, stage, grads, measured, k, zeroed, divisor)
        state = _load(store, stage)
        rule = stage.rule
        if isinstance(rule, ScalingRule):
            returned = rule.scale(m, state)
            coef = check_coefficients(rule, returned, len(m.grads)).to(plan.acc_dtype)
            new_state = returned[1]
            if round_.single:
                coefficients = coef
            else:
                if coefficients is None:
                    assert round_.scaled is not None
                    coefficients = torch.empty(
                        len(round_.scaled), dtype=plan.acc_dtype, device=plan.device
                    )
                assert stage.coefficient_index is not None
                coefficients.index_copy_(0, stage.coefficient_index, coef)
            flags: torch.Tensor | None = coef
        else:
            flags, new_state = rule.transform_(m, state)  # type: ignore[attr-defined]
        done.append((group, stage, m, state, new_state, flags))
    for group, stage, m, state, new_state, flags in done:
        if isinstance(stage.rule, ScalingRule):
            assert flags is not None
            add_at_(changed, group.tensor_layer_ids_t, (flags != 1).to(torch.int32))
        elif flags is None:
            unknown.append(group.layer_ids)
        else:
            add_at_(changed, group.layer_ids_t, flags.to(torch.int32))
        if stage.slot is not None:
            assert stage.row_index is not None
            elsewhere = measured.stage_bad[1].get(group.index) if measured.stage_bad else None
            keep = _keep_rows(stage, group, m, finite, elsewhere)
            new_state = store.store(
                stage.slot, stage.row_index, stage.whole_rows, state, new_state, keep
            )
        shown = stage.rule.stats(m, new_state)
        if shown:
            keys = seen.setdefault(group.index, set())
            named = {(f"{k}.{key}" if key in keys else key): v for key, v in shown.items()}
            keys.update(named)
            stats.append((list(stage.layout.layer_names), named))
    if coefficients is not None:
        if fold:
            assert divisor is not None
            return divisor / coefficients[0]
        assert round_.scaled is not None
        round_.scaled.scale_(grads, coefficients)
    return divisor


def _load(store: StateStore, stage: Stage) -> dict[str, torch.Tensor]:
    if stage.slot is None:
        return {}
    assert stage.row_index is not None
    return store.load(stage.slot, stage.row_index, stage.whole_rows)


def measured_for(
    store: StateStore,
    plan: Plan,
    group: Group,
    stage: Stage,
    grads: list[torch.Tensor],
    measured: Measurement,
    k: int,
    zeroed: torch.Tensor | None,
    divisor: torch.Tensor | None = None,
) -> Measured:
    """What ``stage``'s rule is called with in round ``k``."""
    index = group.index
    group_grads = grads if group.covers_all else [grads[p] for p in group.positions]
    norms: torch.Tensor | None = None
    layer_norms: torch.Tensor | None = None
    p = stage.rule.norm_type
    if p is not None:
        if k > 0:
            norms = measured.later_norms.get((k, index))  # measured for the stages already
            if norms is None:
                assert stage.norm_runs is not None
                norms = stage.norm_runs.norms(grads, p, plan.device, plan.acc_dtype)
                if divisor is not None:
                    norms = norms / divisor
        elif index in measured.p_norms:
            norms = measured.p_norms[index]
        else:  # the step's L2 norms, tensors' and layers' both measured already
            norms = select(measured.tensor_norms, group)
            layer_norms = (
                measured.layer_norms
                if group.covers_all
                else measured.layer_norms.index_select(0, group.layer_ids_t)
            )
        if layer_norms is None:
            layer_norms = _layer_norms(norms, stage.layout.tensor_layer, len(group.layer_ids), p)
    shards = None
    if group.shard_weights is not None:
        shards = Shards(
            group.shard_weights,
            measured.reduced.get(index) if k == 0 else None,
            None if zeroed is None else select(zeroed, group),
        )
    return Measured(
        grads=group_grads,
        params=group.params if plan.sharding is None else local_tensors(group.params),
        norms=norms,
        layer_norms=layer_norms,
        layout=stage.layout,
        prepared=stage.prepared,
        step=_host_steps(store, stage),
        shards=shards,
        stage_totals=_stage_totals(measured, index, k),
    )


def _stage_totals(measured: Measurement, index: int, k: int) -> dict[float, torch.Tensor] | None:
    # on pipeline stages: round 0's totals came with the step's collective, a later
    # round's with its own (`gradclip.core.stage_step.stage_round`)
    if measured.stage_totals is None:
        return None
    if k == 0:
        return measured.stage_totals.get(index, {})
    return measured.later_totals.get((k, index), {})


def _host_steps(store: StateStore, stage: Stage) -> int:
    # read only where the rule sizes a buffer by it: a changing Python int read
    # in a compiled step would recompile it
    if stage.slot is None or not stage.rule.growable_state:
        return 0
    return store.slots[stage.slot].steps


def select(values: torch.Tensor, group: Group) -> torch.Tensor:
    return values if group.covers_all else values.index_select(0, group.positions_t)


def _keep_rows(
    stage: Stage,
    group: Group,
    m: Measured,
    finite: torch.Tensor | None,
    elsewhere: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``(R,)`` bool: state rows to leave as they were (their norm was not finite).

    ``elsewhere``: 0-d bool, on pipeline stages a tensor of the group on some stage
    was not finite: a group row then stays as it was on every stage.
    """
    if finite is None:
        return None
    ok = finite if group.covers_all else finite.index_select(0, group.layer_ids_t)
    if m.layer_norms is not None:
        ok = ok & torch.isfinite(m.layer_norms)
    if m.stage_totals:  # a total over the stages is finite only if every stage's part is
        for total in m.stage_totals.values():
            ok = ok & torch.isfinite(total)
    if not stage.rule.per_layer_state:
        ok = ok.all().reshape(1)
        if elsewhere is not None:
            ok = ok & ~elsewhere
    return ~ok
