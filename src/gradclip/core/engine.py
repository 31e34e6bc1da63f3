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

import operator
from collections.abc import Sequence
from typing import Any

import torch

from gradclip.core.agreement import Configuration, agree, dtensor_group
from gradclip.core.collective import ShardedModel
from gradclip.core.folding import FusedArgs, nonfinite_flag
from gradclip.core.identity import GROUP_ROW, layer_signature, legacy_slot_name
from gradclip.core.layers import Layer
from gradclip.core.measure import Measurement as _Measurement
from gradclip.core.measure import (
    judged_layer_norms,
)
from gradclip.core.nonfinite import (
    NonFiniteGradientError,
    bad_layers,
    check_nonfinite,
    judge_unsquared,
    read_bad_layers,
    zero_layers_,
)
from gradclip.core.pipeline import EVERY_STAGE, Pipeline, StageTransport
from gradclip.core.plan import Plan, Signature, accumulation_dtype_of
from gradclip.core.report import NormReport
from gradclip.core.rounds import run_round, select
from gradclip.core.rule import Rule, group_of, stages_of
from gradclip.core.sharding import RankGroup, is_dtensor
from gradclip.core.stage_step import UNKNOWN, prepare_step, stage_round
from gradclip.core.state import StateStore, state_rows, state_slot
from gradclip.core.validation import check_gradient, check_writable

__all__ = ["Engine"]


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
        replicas: the ranks that hold replicas of these layers (a DDP target's group,
            an explicit ``process_group=``); ``None``: those of the ``DTensor``
            parameters' mesh, if any. Their configurations are compared at the
            first step (`gradclip.core.agreement`).
        tags: per layer, the override key that chose its rule (``None``: the default
            rule). Equal rules under different tags are different groups: a global
            rule clips each key's layers alone, a stateful one keeps a state per key.
        pipeline: this rank's pipeline stage(s) and the slots of the rules that
            span layers (see `gradclip.core.pipeline`); ``None`` for a whole model.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        rules: Sequence[Rule],
        *,
        measure_all: bool = False,
        nonfinite: str = "propagate",
        store: StateStore | None = None,
        tags: Sequence[str | None] | None = None,
        replicas: RankGroup | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        if len(layers) != len(rules) or (tags is not None and len(tags) != len(rules)):
            raise ValueError("one rule (and one tag) per layer is required")
        self.layers = list(layers)
        self.rules = list(rules)
        self.tags: list[str | None] = list(tags) if tags is not None else [None] * len(rules)
        self.nonfinite = check_nonfinite(nonfinite)
        self.measure_all = measure_all or self.nonfinite != "propagate"
        self._measure_all_setting = bool(measure_all)  # as configured, for the replicas
        self.store = store if store is not None else StateStore()
        self.pipeline = pipeline
        self._transport: StageTransport | None = None
        self._stage_squares: torch.Tensor | None = None
        self.params = [p for layer in self.layers for p in layer.params]
        self._names = [
            layer.qualified(k) for layer in self.layers for k in range(len(layer.params))
        ]
        # Layers whose rule reads nothing (DL4J None) are not even validated, unless
        # a norm is asked for: their gradients may be anything (sparse, say).
        idle = [
            not any(s.reads_gradient for s in stages_of(rule))
            for layer, rule in zip(self.layers, self.rules)
            for _ in layer.params
        ]
        self._idle = idle  # for the message when such a gradient is refused after all
        inert = [i and not self.measure_all for i in idle]
        self._inert: list[bool] | None = inert if any(inert) else None
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
        # no gradient seen yet: the first eager step checks them all, even under the
        # signature `_predict_plan` guessed from the parameters (their memory may overlap)
        self._unseen = True
        #: the non-finite layers of the last step ("error" and "skip" policies)
        self.last_nonfinite: list[str] = []
        #: the last step was skipped ("skip": a layer here, or on another stage, not finite)
        self.skipped = False
        #: after a step with ``divisor`` or ``fold``: what the fused optimizer must
        #: divide the gradients by (its ``grad_scale``); ``None`` otherwise
        self.divisor: torch.Tensor | None = None
        #: after a step with ``skip_on_device``: 0-d bool, a layer was not finite
        self.bad_step: torch.Tensor | None = None
        #: after a step with ``find_inf``: 0-d float32, 1 if a norm was not finite
        self.found_inf: torch.Tensor | None = None
        # known now for plain tensors (no collective), so that a compiled first step
        # finds it set; a sharded model's collective is sized at its first step
        plain = not any(is_dtensor(p) for p in self.params)
        self._sharded: ShardedModel | None = None if plain else UNKNOWN
        # replicas compare configurations once, before this engine's first collective
        self._replicas = replicas if replicas is not None else dtensor_group(self.params)
        self._agreed = self._replicas is None
        self._init_state()
        self._predict_plan()

    def _predict_plan(self) -> None:
        """Build the plan of the usual step now: every trainable parameter with a gradient.

        So that the first step of a compiled ``apply`` finds its plan cached
        instead of tracing the plan's construction. Sharded models are planned at
        their first step, where the gradients' placements are known.
        """
        if not self.params or self._sharded is not None:
            return
        guess: list[torch.Tensor | None] = [
            p if trainable else None for p, trainable in zip(self.params, self._trainable())
        ]
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
        """Give every stateful rule its slot and rows now, before any step (for checkpoints).

        Each row records the layers it covers (`gradclip.core.identity`); a row
        kept from before that now covers other layers starts afresh.
        """
        device = self.params[0].device if self.params else torch.device("cpu")
        dtype = accumulation_dtype_of(device)
        groups: dict[object, list[int]] = {}
        for lid, (rule, tag) in enumerate(zip(self.rules, self.tags)):
            groups.setdefault(group_of(rule, tag), []).append(lid)
        keep: dict[str, list[str]] = {}
        for layer_ids in groups.values():
            rule, tag = self.rules[layer_ids[0]], self.tags[layer_ids[0]]
            stages = stages_of(rule)
            names = [self.layers[i].name for i in layer_ids]
            signatures = tuple(layer_signature(self.layers[i]) for i in layer_ids)
            for k, stage in enumerate(stages):
                many = len(stages) > 1
                slot = state_slot(rule, k, stage, many)
                if slot is None:
                    continue
                rows = state_rows(stage, names, tag)
                taken = set(keep.get(slot, ())) & set(rows)
                if taken:
                    raise ValueError(
                        f"two groups of {stage.describe()} would share the state row(s) "
                        f"{sorted(taken)}: give each group of layers its own tag"
                    )
                per_layer = rows == names
                # on pipeline stages a group row covers the group's layers on every
                # stage: the same entry on each (a checkpoint keeps one copy)
                whole = signatures if self.pipeline is None else (EVERY_STAGE,)
                covers = (
                    dict(zip(rows, ((s,) for s in signatures))) if per_layer else {rows[0]: whole}
                )
                old = legacy_slot_name(rule, k, stage, many)
                legacy = {r: (old, r if per_layer else GROUP_ROW) for r in rows}
                self.store.ensure(slot, stage, rows, device, dtype, covers, legacy)
                keep.setdefault(slot, []).extend(rows)
        self.store.prune(keep)

    # -- layout ----------------------------------------------------------------------------
    def swapped(self) -> bool:
        """Whether a module now holds another parameter under a name this engine normalizes.

        Catches ``module._parameters[name] = new_param``, which no registration
        hook sees, at the cost of one dict lookup per parameter.
        """
        try:  # C-level loops: this runs every step
            current = list(map(operator.getitem, self._owner_dicts, self._owner_keys))
        except KeyError:  # a parameter deleted from its module
            return True
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
        checked = self._checked
        same = signature == checked
        if same and (torch.compiler.is_compiling() or not self._unseen):
            # the very list the plan was keyed by: `plan` then compares identities
            return grads, checked  # type: ignore[return-value]
        inert = self._inert or [False] * len(grads)
        for name, g, skip, idle in zip(self._names, grads, inert, self._idle):
            if g is not None and not skip:
                try:
                    check_gradient(name, g)
                except TypeError as error:
                    if not idle:
                        raise
                    asks = (
                        "measure_all=True"
                        if self.nonfinite == "propagate"
                        else (f"nonfinite={self.nonfinite!r}")
                    )
                    raise TypeError(
                        f"{error} Its layer's rule (None) does not read it, but {asks} asks "
                        "for its norm: without it the gradient is left unread"
                    ) from None
                if (not idle or self.nonfinite == "zero") and not torch.compiler.is_compiling():
                    check_writable(name, g)  # it may be written
        self._unseen = False
        if not same or checked is None:
            self._checked = checked = signature
        return grads, checked

    def plan(self, signature: Signature, grads: Sequence[torch.Tensor | None]) -> Plan:
        """The cached plan for this signature, rebuilt when the gradients' layout changed."""
        plan = self._plan
        if (
            plan is None
            or plan.store_generation != self.store.generation
            or (signature is not self._signature and signature != self._signature)
        ):
            plan = self._plan = Plan(
                self.layers,
                self.rules,
                signature,
                params=self.params,
                grads=grads,
                measure_all=self.measure_all,
                store=self.store,
                tags=self.tags,
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
    def step(self, fused: FusedArgs | None = None) -> NormReport:
        """Normalize the current gradients in place and report what was measured.

        Runs under ``torch.no_grad()``, as ``clip_grad_norm_`` does: gradients made
        with ``create_graph=True`` are rescaled without recording autograd history.
        ``fused``: a fused optimizer's step (`gradclip.core.folding.FusedArgs`);
        `divisor` is then its ``grad_scale`` and `bad_step` its skip flag.
        """
        report = self._step(fused)
        if self.pipeline is not None:
            report.stages = (self.pipeline, self._stage_squares)
        return report

    def _step(self, fused: FusedArgs | None) -> NormReport:
        self.divisor, self.bad_step, self.found_inf = None, None, None
        self.skipped = False
        prepared = self._prepare()
        if isinstance(prepared, NormReport):  # no gradient at all
            if fused is not None:
                self.divisor = fused.divisor
                if fused.find_inf and fused.divisor is not None:
                    self.found_inf = torch.zeros((), device=fused.divisor.device)
            return prepared
        plan, grads, measured = prepared
        if self.pipeline is not None and measured.stage_totals is None:
            measured.stage_totals = {}  # nothing from other stages: a total would be refused
        fused = fused or FusedArgs(optimizer_step=False)
        measured, carried, fold = fused.begin(plan, measured)
        skip = fused.skip
        if fused.find_inf:
            self.found_inf = skip = nonfinite_flag(plan, grads, measured)
        reported = (measured.tensor_norms, measured.layer_norms)
        judged = judged_layer_norms(plan, measured)
        if self.nonfinite != "propagate" and plan.sharding is None:
            judged = judge_unsquared(plan, grads, judged)
        bad: torch.Tensor | None = None
        zeroed: torch.Tensor | None = None
        # on pipeline stages: whether a tensor on any stage was not finite
        elsewhere = measured.stage_bad[0] if measured.stage_bad is not None else None
        if self.nonfinite == "skip" and fused.skip_on_device:
            self.bad_step = bad_layers(plan, judged).any()
            if elsewhere is not None:
                self.bad_step = self.bad_step | elsewhere
            skip = self.bad_step if skip is None else self.bad_step | skip.to(self.bad_step)
        elif self.nonfinite in ("error", "skip"):
            bad = bad_layers(plan, judged)
            # the one host read (with the other stages' verdict, on pipeline stages)
            self.last_nonfinite, self.skipped = read_bad_layers(plan, bad, elsewhere)
            if self.skipped:  # "error" raises, "skip" leaves everything as it is
                self.divisor = fused.divisor  # the gradients as they are
                report = NormReport.unchanged(plan, *reported)
                if self.nonfinite == "error":  # with the step's norms, for a recording
                    raise NonFiniteGradientError(
                        self.last_nonfinite or ["(a layer of another pipeline stage)"], report
                    )
                return report
        elif self.nonfinite == "zero":
            bad = bad_layers(plan, judged)
            zeroed = zero_layers_(plan, grads, bad)
            # the rules see the zeroed layers as they now are: norm 0
            measured = _Measurement(
                measured.tensor_norms.masked_fill(zeroed, 0.0),
                measured.layer_norms.masked_fill(bad, 0.0),
                {
                    gi: norms.masked_fill(select(zeroed, plan.groups[gi]), 0.0)
                    for gi, norms in measured.p_norms.items()
                },
                measured.reduced,
                measured.stage_totals,  # formed without the zeroed layers (stage_step)
                measured.stage_bad,
            )
        finite = torch.isfinite(judged) if plan.has_state else None
        if finite is not None and skip is not None:
            finite = finite & ~skip.to(device=plan.device, dtype=torch.bool)
        changed = torch.zeros(plan.num_layers, dtype=torch.int32, device=plan.device)
        unknown: list[list[int]] = []  # layers whose rule cannot tell if it changed them
        stats: list[tuple[list[str], dict[str, torch.Tensor]]] = []
        seen: dict[int, set[str]] = {}  # stats keys per group, to tell chain members apart
        later = self.pipeline.later_rounds if self.pipeline is not None else ()
        for k in range(max(len(plan.rounds), max(later, default=-1) + 1)):
            if k in later:  # a chain member spans layers: the stages' norms now
                stage_round(self, plan, k, grads, measured, carried)
            if k < len(plan.rounds):
                carried = run_round(
                    self.store, plan, k, grads, measured, zeroed, finite, changed, unknown,
                    stats, seen, carried, fold,
                )  # fmt: skip
        self.divisor = fused.finish(grads, carried, fold)
        if zeroed is not None and bad is not None:
            changed |= bad.to(torch.int32)
        return NormReport(plan, reported[0], reported[1], changed > 0, stats, unknown)

    def _prepare(self) -> tuple[Plan, list[torch.Tensor], _Measurement] | NormReport:
        """Gather, plan and measure the step (`gradclip.core.stage_step.prepare_step`)."""
        return prepare_step(self)

    @torch.compiler.disable  # type: ignore[untyped-decorator]  # once per engine: a collective
    def _agree(self) -> None:
        """Compare this engine's configuration with its replicas' (raises on every rank)."""
        assert self._replicas is not None
        config = Configuration.of(
            [layer.name for layer in self.layers],
            [layer.param_names for layer in self.layers],
            [rule.describe() for rule in self.rules],
            self.nonfinite,
            self._measure_all_setting,
        )
        agree(config, self._replicas, self.params)
        self._agreed = True

    def _trainable(self) -> list[bool]:
        check = self._check_frozen
        flags = [check] * len(self.params) if isinstance(check, bool) else check
        return [p.requires_grad or not c for p, c in zip(self.params, flags)]
