"""One normalization step for every layer of a model at once.

::

    gradients ── by (device, dtype) ── one _foreach_norm per run ──┐
                                                                   │  (sharded: one all_reduce)
           per-tensor norms ── index_add_ by layer ── layer norms ◄┘
                                                                   │
           round k: the k-th rule of every group, on the device ◄──┘  (no host sync)
                 scaling rules: coefficients ─ one _foreach_mul_ per run
                 in-place rules: their own grouped kernels (clamp, AGC)
                 state rows: read, updated, written back unless not finite

A *group* is the layers that share a rule (equal rules, or DL4J modes that
differ only in their threshold); round 0 runs every group's rule, and further
rounds run the later members of `chain` s, measuring their norms again. The
number of launches depends on the configuration (rules, devices, dtypes), not
on the number of layers: the layers only change the length of small index
vectors, built once per `Plan`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradclip.core.layers import Layer
from gradclip.core.nonfinite import (
    NonFiniteGradientError,
    bad_layers,
    check_nonfinite,
    read_bad_layers,
    zero_layers_,
)
from gradclip.core.plan import Group, Plan, Signature, Stage, accumulation_dtype_of
from gradclip.core.report import NormReport
from gradclip.core.rule import CrossRank, Measured, Rule, ScalingRule, Shards, stages_of
from gradclip.core.sharding import is_dtensor, local_tensors, p_norm_parts, p_norms_from
from gradclip.core.state import StateStore, state_rows, state_slot
from gradclip.core.validation import check_gradient

__all__ = ["Engine"]


@dataclass(eq=False)
class _Measurement:
    """The norms of a step, measured once before any rule runs."""

    tensor_norms: torch.Tensor  # (T,) L2, NaN where not measured
    layer_norms: torch.Tensor  # (L,) L2, NaN where not measured
    p_norms: dict[int, torch.Tensor]  # group index -> (T_g,) norms of its rule's order p != 2
    reduced: dict[int, CrossRank]  # group index -> its rule's reduced cross-rank quantities


class Engine:
    """Runs normalization steps over a list of layers, caching the plan, owning the state.

    Args:
        layers: the layers, see `gradclip.core.layers.build_layers`.
        rules: one rule per layer.
        measure_all: also measure the norms of layers whose rule needs none
            (``None`` and element-wise clipping), for telemetry; costs one read of
            their gradients.
        nonfinite: what to do with layers whose norm is inf or NaN (see
            `gradclip.core.nonfinite`); any policy but ``"propagate"`` measures
            every layer.
        store: the rules' state, kept when the engine is rebuilt for a changed model.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        rules: Sequence[Rule],
        *,
        measure_all: bool = False,
        nonfinite: str = "propagate",
        store: StateStore | None = None,
    ) -> None:
        if len(layers) != len(rules):
            raise ValueError("one rule per layer is required")
        self.layers = list(layers)
        self.rules = list(rules)
        self.nonfinite = check_nonfinite(nonfinite)
        self.measure_all = measure_all or self.nonfinite != "propagate"
        self.store = store if store is not None else StateStore()
        self.params = [p for layer in self.layers for p in layer.params]
        self._names = [
            layer.qualified(k) for layer in self.layers for k in range(len(layer.params))
        ]
        frozen_checks = [not layer.explicit for layer in self.layers for _ in layer.params]
        self._check_frozen: bool | list[bool] = (
            (frozen_checks[0] if len(set(frozen_checks)) == 1 else frozen_checks)
            if frozen_checks
            else True
        )
        owned = [
            (owner, key, p)
            for layer in self.layers
            for (owner, key), p in zip(layer.owners, layer.params)
        ]
        self._owner_dicts = [o for o, _, _ in owned]
        self._owner_keys = [k for _, k, _ in owned]
        self._owned = [p for _, _, p in owned]
        self._plan: Plan | None = None
        self._signature: Signature | None = None
        self._checked: Signature | None = None  # the last signature whose gradients passed
        #: the non-finite layers of the last step ("error" and "skip" policies)
        self.last_nonfinite: list[str] = []
        self._init_state()
        self._predict_plan()

    def _predict_plan(self) -> None:
        """Build the plan of the usual step now: every trainable parameter with a gradient.

        So that the first step of a compiled ``apply`` finds its plan cached
        instead of tracing the plan's construction. Sharded models are planned at
        their first step, where the gradients' placements are known.
        """
        check = self._check_frozen
        flags = [check] * len(self.params) if isinstance(check, bool) else check
        guess: list[torch.Tensor | None] = [
            p if (p.requires_grad or not c) else None for p, c in zip(self.params, flags)
        ]
        if not self.params or any(is_dtensor(p) for p in self.params):
            return
        signature: Signature = [None if p is None else (p.device, p.dtype, p.layout) for p in guess]
        try:
            for name, p in zip(self._names, guess):
                if p is not None:
                    check_gradient(name, p)  # a gradient shares its parameter's dtype and layout
            self.plan(signature, guess)
        except Exception:  # the real step will raise it, with the real gradients
            self.invalidate()
            return
        self._checked = signature

    def _init_state(self) -> None:
        """Give every stateful rule its slot and rows now, before any step (for checkpoints)."""
        device = self.params[0].device if self.params else torch.device("cpu")
        dtype = accumulation_dtype_of(device)
        groups: dict[object, list[int]] = {}
        for lid, rule in enumerate(self.rules):
            groups.setdefault(rule.group_key(), []).append(lid)
        keep: dict[str, list[str]] = {}
        for layer_ids in groups.values():
            rule = self.rules[layer_ids[0]]
            stages = stages_of(rule)
            for k, stage in enumerate(stages):
                slot = state_slot(rule, k, stage, len(stages) > 1)
                if slot is not None:
                    rows = state_rows(stage, [self.layers[i].name for i in layer_ids])
                    self.store.ensure(slot, stage, rows, device, dtype)
                    keep[slot] = rows
        self.store.prune(keep)

    # -- layout ----------------------------------------------------------------------------
    def swapped(self) -> bool:
        """Whether a module now holds another parameter under a name this engine normalizes.

        Catches ``module._parameters[name] = new_param``, which no registration
        hook sees, at the cost of one dict lookup per parameter.
        """
        current = map(_entry, self._owner_dicts, self._owner_keys)
        return not all(map(operator.is_, current, self._owned))

    def gather(self) -> tuple[list[torch.Tensor | None], Signature]:
        """Current gradients (``None`` where skipped) and their signature, validated.

        Raises before anything is modified if a gradient is sparse or complex.
        """
        check = self._check_frozen
        if check is True:
            grads = [p.grad if p.requires_grad else None for p in self.params]
        elif check is False:
            grads = [p.grad for p in self.params]
        else:
            grads = [
                p.grad if (p.requires_grad or not c) else None for p, c in zip(self.params, check)
            ]
        signature: Signature = [None if g is None else (g.device, g.dtype, g.layout) for g in grads]
        if signature != self._checked:
            for name, g in zip(self._names, grads):
                if g is not None:
                    check_gradient(name, g)
            self._checked = signature
        return grads, signature

    def plan(self, signature: Signature, grads: Sequence[torch.Tensor | None]) -> Plan:
        """The cached plan for this signature, rebuilt when the gradients' layout changed."""
        plan = self._plan
        if (
            plan is None
            or plan.store_generation != self.store.generation
            or signature != self._signature
        ):
            plan = self._plan = Plan(
                self.layers,
                self.rules,
                signature,
                params=self.params,
                grads=grads,
                measure_all=self.measure_all,
                store=self.store,
            )
            self._signature = signature
        return plan

    def __getstate__(self) -> dict[str, Any]:
        # a plan holds closures and device buffers: a copy plans again
        state = dict(self.__dict__)
        state.update(_plan=None, _signature=None, _checked=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._predict_plan()

    def invalidate(self) -> None:
        """Forget the cached plan (after the state store changed shape)."""
        self._plan = None
        self._signature = None

    # -- the step ------------------------------------------------------------------------------
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
            grads = local_tensors(grads)
        if not grads:
            return NormReport.empty(plan)
        measured = _measure(plan, grads)
        reported = (measured.tensor_norms, measured.layer_norms)
        judged = _judged_layer_norms(plan, measured)
        bad: torch.Tensor | None = None
        zeroed: torch.Tensor | None = None
        if self.nonfinite in ("error", "skip"):
            bad = bad_layers(plan, judged)
            self.last_nonfinite = read_bad_layers(plan, bad)  # the one host read
            if self.last_nonfinite and self.nonfinite == "error":
                raise NonFiniteGradientError(self.last_nonfinite)
            if self.last_nonfinite:  # "skip": leave every gradient and state as it is
                unchanged = torch.zeros(plan.num_layers, dtype=torch.bool, device=plan.device)
                return NormReport(plan, measured.tensor_norms, measured.layer_norms, unchanged)
        elif self.nonfinite == "zero":
            bad = bad_layers(plan, judged)
            zeroed = zero_layers_(plan, grads, bad)
            # the rules see the zeroed layers as they now are: norm 0
            measured = _Measurement(
                measured.tensor_norms.masked_fill(zeroed, 0.0),
                measured.layer_norms.masked_fill(bad, 0.0),
                {
                    gi: norms.masked_fill(_select(zeroed, plan.groups[gi]), 0.0)
                    for gi, norms in measured.p_norms.items()
                },
                measured.reduced,
            )
        finite = torch.isfinite(judged) if plan.has_state else None
        changed = torch.zeros(plan.num_layers, dtype=torch.int32, device=plan.device)
        known = [True] * plan.num_layers
        stats: list[tuple[list[str], dict[str, torch.Tensor]]] = []
        seen: dict[int, set[str]] = {}  # stats keys per group, to tell chain members apart
        for k in range(len(plan.rounds)):
            self._run_round(plan, k, grads, measured, zeroed, finite, changed, known, stats, seen)
        if zeroed is not None and bad is not None:
            changed |= bad.to(torch.int32)
        return NormReport(plan, reported[0], reported[1], changed > 0, stats, known)

    def _run_round(
        self,
        plan: Plan,
        k: int,
        grads: list[torch.Tensor],
        measured: _Measurement,
        zeroed: torch.Tensor | None,
        finite: torch.Tensor | None,
        changed: torch.Tensor,
        known: list[bool],
        stats: list[tuple[list[str], dict[str, torch.Tensor]]],
        seen: dict[int, set[str]],
    ) -> None:
        """Round ``k``: every rule computes, then states are written and coefficients multiplied.

        Scaling rules run before in-place ones (the plan orders them so), and nothing
        is written before every rule of the round has returned: a rule that raises
        leaves the round's state and the gradients of every scaling rule untouched.
        """
        round_ = plan.rounds[k]
        coefficients: torch.Tensor | None = None
        done = []
        for group, stage in round_.stages:
            m = self._measured(plan, group, stage, grads, measured, k, zeroed)
            state = self._load(stage)
            rule = stage.rule
            if isinstance(rule, ScalingRule):
                coef, new_state = rule.scale(m, state)
                coef = coef.to(plan.acc_dtype)
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
                changed.index_add_(0, group.tensor_layer_ids_t, (flags != 1).to(torch.int32))
            elif flags is None:
                for lid in group.layer_ids:
                    known[lid] = False
            else:
                changed.index_add_(0, group.layer_ids_t, flags.to(torch.int32))
            if stage.slot is not None:
                assert stage.row_index is not None
                keep = _keep_rows(stage, group, m, finite)
                new_state = self.store.store(
                    stage.slot, stage.row_index, stage.whole_rows, state, new_state, keep
                )
            shown = stage.rule.stats(m, new_state)
            if shown:
                keys = seen.setdefault(group.index, set())
                named = {(f"{k}.{key}" if key in keys else key): v for key, v in shown.items()}
                keys.update(named)
                stats.append((list(stage.layout.layer_names), named))
        if coefficients is not None:
            assert round_.scaled is not None
            round_.scaled.scale_(grads, coefficients)

    def _load(self, stage: Stage) -> dict[str, torch.Tensor]:
        if stage.slot is None:
            return {}
        assert stage.row_index is not None
        return self.store.load(stage.slot, stage.row_index, stage.whole_rows)

    def _measured(
        self,
        plan: Plan,
        group: Group,
        stage: Stage,
        grads: list[torch.Tensor],
        measured: _Measurement,
        k: int,
        zeroed: torch.Tensor | None,
    ) -> Measured:
        """What ``stage``'s rule is called with in round ``k``."""
        index = group.index
        group_grads = grads if group.covers_all else [grads[p] for p in group.positions]
        norms: torch.Tensor | None = None
        layer_norms: torch.Tensor | None = None
        p = stage.rule.norm_type
        if p is not None:
            if k > 0:
                assert stage.norm_runs is not None
                norms = stage.norm_runs.norms(grads, p, plan.device, plan.acc_dtype)
            elif index in measured.p_norms:
                norms = measured.p_norms[index]
            else:  # the step's L2 norms, tensors' and layers' both measured already
                norms = _select(measured.tensor_norms, group)
                layer_norms = (
                    measured.layer_norms
                    if group.covers_all
                    else measured.layer_norms.index_select(0, group.layer_ids_t)
                )
            if layer_norms is None:
                layer_norms = _layer_norms(
                    norms, stage.layout.tensor_layer, len(group.layer_ids), p
                )
        shards = None
        if group.shard_weights is not None:
            shards = Shards(
                group.shard_weights,
                measured.reduced.get(index) if k == 0 else None,
                None if zeroed is None else _select(zeroed, group),
            )
        return Measured(
            grads=group_grads,
            params=group.params if plan.sharding is None else local_tensors(group.params),
            norms=norms,
            layer_norms=layer_norms,
            layout=stage.layout,
            prepared=stage.prepared,
            step=_host_steps(self.store, stage),
            shards=shards,
        )


def _host_steps(store: StateStore, stage: Stage) -> int:
    # read only where the rule sizes a buffer by it: a changing Python int read
    # in a compiled step would recompile it
    if stage.slot is None or not stage.rule.growable_state:
        return 0
    return store.slots[stage.slot].steps


def _entry(owner: Mapping[str, Any], key: str) -> Any:
    return owner.get(key)


def _select(values: torch.Tensor, group: Group) -> torch.Tensor:
    return values if group.covers_all else values.index_select(0, group.positions_t)


def _layer_norms(
    norms: torch.Tensor, tensor_layer: torch.Tensor, num_layers: int, norm_type: float
) -> torch.Tensor:
    """``(L,)`` p-norm of each layer's tensors from their ``(T,)`` p-norms."""
    if math.isinf(norm_type):
        out = torch.zeros(num_layers, dtype=norms.dtype, device=norms.device)
        return out.scatter_reduce_(0, tensor_layer, norms, "amax")
    powers = torch.zeros(num_layers, dtype=norms.dtype, device=norms.device)
    if norm_type == 2.0:
        return powers.index_add_(0, tensor_layer, norms.square()).sqrt_()
    return powers.index_add_(0, tensor_layer, norms.pow(norm_type)).pow_(1.0 / norm_type)


def _measure(plan: Plan, grads: list[torch.Tensor]) -> _Measurement:
    """The step's L2 norms, the p-norms some rules read, and (sharded) their reduction."""
    dev, acc = plan.device, plan.acc_dtype
    local = plan.measured.norms(grads, 2.0, dev, acc) if plan.any_measured else None
    p_norms: dict[int, torch.Tensor] = {}
    for gi, group in enumerate(plan.groups):
        stage = group.stages[0]
        if stage.norm_runs is not None and stage.rule.norm_type is not None:
            p_norms[gi] = stage.norm_runs.norms(grads, stage.rule.norm_type, dev, acc)
    reduced: dict[int, CrossRank] = {}
    if plan.sharding is not None:
        local, p_norms, reduced = _reduce(plan, grads, local, p_norms)
    if local is None:
        tensor_norms = torch.full((plan.num_tensors,), math.nan, dtype=acc, device=dev)
        layer_norms = torch.full((plan.num_layers,), math.nan, dtype=acc, device=dev)
        return _Measurement(tensor_norms, layer_norms, p_norms, reduced)
    if plan.all_measured:
        tensor_norms = local
        measured = local
    else:
        tensor_norms = torch.full((plan.num_tensors,), math.nan, dtype=acc, device=dev)
        tensor_norms.index_copy_(0, plan.measured_positions_t, local)
        measured = local
    layer_norms = _layer_norms(measured, plan.measured_layer_t, plan.num_layers, 2.0)
    if not all(plan.layer_measured):
        layer_norms = torch.where(plan.layer_measured_t, layer_norms, math.nan)
    return _Measurement(tensor_norms, layer_norms, p_norms, reduced)


def _reduce(
    plan: Plan,
    grads: list[torch.Tensor],
    local: torch.Tensor | None,
    p_norms: dict[int, torch.Tensor],
) -> tuple[torch.Tensor | None, dict[int, torch.Tensor], dict[int, CrossRank]]:
    """Sum the step's local quantities over ranks in one collective."""
    assert plan.sharding is not None
    extras: list[CrossRank] = []
    owners: list[tuple[str, int]] = []
    for gi, norms in p_norms.items():
        group = plan.groups[gi]
        assert group.shard_weights is not None and group.stages[0].rule.norm_type is not None
        extras.append(p_norm_parts(norms, group.stages[0].rule.norm_type, group.shard_weights))
        owners.append(("p", gi))
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
            extras.append(extra)
            owners.append(("rule", gi))
    if local is None and not extras:
        return None, p_norms, {}
    reduced_l2, out = plan.sharding.reduce(local, extras)
    p_global: dict[int, torch.Tensor] = {}
    reduced: dict[int, CrossRank] = {}
    for (kind, gi), values in zip(owners, out):
        if kind == "p":
            norm_type = plan.groups[gi].stages[0].rule.norm_type
            assert norm_type is not None
            p_global[gi] = p_norms_from(values, norm_type)
        else:
            reduced[gi] = values
    return reduced_l2, p_global, reduced


def _judged_layer_norms(plan: Plan, measured: _Measurement) -> torch.Tensor:
    """``(L,)`` the norm each layer is judged finite or not by: the one its rule reads."""
    if not measured.p_norms:
        return measured.layer_norms
    judged = measured.layer_norms.clone()
    for gi, norms in measured.p_norms.items():
        group = plan.groups[gi]
        p = group.stages[0].rule.norm_type
        assert p is not None
        layer = _layer_norms(norms, group.stages[0].layout.tensor_layer, len(group.layer_ids), p)
        judged.index_copy_(0, group.layer_ids_t, layer)
    return judged


def _keep_rows(
    stage: Stage, group: Group, m: Measured, finite: torch.Tensor | None
) -> torch.Tensor | None:
    """``(R,)`` bool: state rows to leave as they were (their norm was not finite)."""
    if finite is None:
        return None
    ok = finite if group.covers_all else finite.index_select(0, group.layer_ids_t)
    if m.layer_norms is not None:
        ok = ok & torch.isfinite(m.layer_norms)
    if not stage.rule.per_layer_state:
        ok = ok.all().reshape(1)
    return ~ok
