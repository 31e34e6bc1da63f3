"""The plan of a step: everything that depends on which gradients exist, not on their values.

A plan is built when the set of gradients changes (a parameter gets or loses
its gradient, changes dtype or device) and reused by every step until then. It
fixes

* the order of the step's tensors: by device and dtype, so that each grouped
  launch covers a contiguous run, then tensors scaled by the first rule, then
  other measured ones, then the rest;
* the *groups*: layers whose rules are equal (or differ only in per-layer
  fields such as the DL4J thresholds) and were chosen by the same override
  key (or by none; any key for a `Rule.layer_local` rule) run as one call;
* the *rounds*: round ``k`` runs the ``k``-th rule of every group (a `chain`
  has several; any other rule, one), with one multiply launch per device and
  dtype for all of them;
* the index tensors and buffers those launches use.

Everything that can be refused (a layer split over devices, a rule that
cannot handle the layout, a chain on sharded gradients) is refused here,
before any gradient of the step is touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import torch

from gradclip.core.kernels import Runs
from gradclip.core.layers import Layer
from gradclip.core.rule import GroupLayout, InPlaceRule, Rule, ScalingRule, group_of, stages_of
from gradclip.core.sharding import RankGroup, Sharding, local_tensors, sharding_of
from gradclip.core.state import StateStore, is_stateful, state_rows, state_slot

__all__ = [
    "Group",
    "Plan",
    "Round",
    "Signature",
    "Stage",
    "accumulation_dtype_of",
    "check_not_replaced",
]

# (device, dtype, layout) of each parameter's gradient; None where it has none.
Signature = list[tuple[torch.device, torch.dtype, torch.layout] | None]


def accumulation_dtype_of(device: torch.device) -> torch.dtype:
    # Per-tensor norms come out of _foreach_norm in float32 (float64 for float64
    # gradients); their squares, sums and the coefficients are formed in float64,
    # where a float32 norm cannot overflow when squared. MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(eq=False)
class Stage:
    """One rule of one group in one round."""

    rule: Rule
    layout: GroupLayout
    prepared: Any
    slot: str | None  # state slot, None for a stateless rule
    rows: list[str]  # state rows this step reads and writes
    row_index: torch.Tensor | None  # their indices in the slot
    whole_rows: bool  # they are all of the slot's rows, in order
    norm_runs: Runs | None  # re-measures the group's norms (rounds > 0, and p != 2)
    coefficient_index: torch.Tensor | None  # positions in the round's coefficient vector


@dataclass(eq=False)
class Group:
    """Layers that run one rule together, and the index tensors that select them."""

    index: int  # in Plan.groups
    rule: Rule
    stages: list[Stage]
    layer_ids: list[int]  # global layer index of each of the group's layers
    positions: list[int]  # positions of its tensors in the step's order
    positions_t: torch.Tensor
    layer_ids_t: torch.Tensor
    tensor_layer_ids_t: torch.Tensor  # global layer index of each of its tensors
    covers_all: bool  # the group is every tensor and every layer, in order
    params: list[torch.Tensor]
    shard_weights: torch.Tensor | None = None
    split_dims: list[tuple[int, ...]] | None = None
    asks_cross_rank: bool = False


@dataclass(eq=False)
class Round:
    """The ``k``-th rule of every group that has one, multiplied in together."""

    stages: list[tuple[Group, Stage]]
    scaled: Runs | None  # the tensors of the round's scaling rules
    single: bool  # one scaling stage covering ``scaled`` exactly, in order


class Plan:
    """Everything about a step that depends on the layout of the gradients, not their values.

    Args:
        layers: the model's layers.
        rules: one rule per layer.
        signature: ``(device, dtype, layout)`` of each parameter's gradient, or ``None``.
        params: the parameters, flattened in layer order.
        grads: the gradients (to find ``DTensor`` sharding), indexed like ``params``.
        measure_all: also measure layers whose rules read no norms.
        store: where the rules' state lives; slots and rows are added for new layers.
        tags: per layer, the override key of its rule (see `gradclip.core.engine.Engine`).
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        rules: Sequence[Rule],
        signature: Signature,
        *,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None],
        measure_all: bool,
        store: StateStore,
        tags: Sequence[str | None] | None = None,
    ) -> None:
        flat_layer = [lid for lid, layer in enumerate(layers) for _ in layer.params]
        names = [layer.qualified(k) for layer in layers for k in range(len(layer.params))]
        check_not_replaced(names, params)
        _check_layer_devices(layers, signature, flat_layer, names)
        stages = [stages_of(rule) for rule in rules]

        def category(i: int) -> int:
            first = stages[flat_layer[i]][0]
            if isinstance(first, ScalingRule):
                return 0
            reads = any(s.norm_type is not None or is_stateful(s) for s in stages[flat_layer[i]])
            return 1 if measure_all or reads else 2

        def sort_key(i: int) -> tuple[str, int, str, int, int]:
            device, dtype, _ = signature[i]  # type: ignore[misc]
            return (device.type, device.index or 0, str(dtype), category(i), i)

        order = sorted((i for i, sig in enumerate(signature) if sig is not None), key=sort_key)
        self.order = order
        self._identity = order == list(range(len(signature)))
        self._pick = itemgetter(*order) if len(order) > 1 else None
        self.names = [names[i] for i in order]
        self.num_tensors = len(order)
        self.num_layers = len(layers)
        self.layer_names = [layer.name for layer in layers]
        self.tensor_layer_ids = [flat_layer[i] for i in order]
        self.params = [params[i] for i in order]
        keys = [signature[i][:2] for i in order]  # type: ignore[index]
        grads_in_order = [grads[i] for i in order]
        # sharded gradients: what this rank holds of each (possibly nothing)
        local_shapes = [g.shape for g in local_tensors(grads_in_order)]  # type: ignore[arg-type]
        empty = [shape.numel() == 0 for shape in local_shapes]
        self._numels = [shape.numel() for shape in local_shapes]
        categories = [category(i) for i in order]

        devices = sorted({k[0] for k in keys}, key=lambda d: (d.type, d.index or 0))
        self.device = devices[0] if devices else torch.device("cpu")
        self.acc_dtype = accumulation_dtype_of(self.device)
        wide = any(k[1] == torch.float64 for k in keys) and self.acc_dtype == torch.float64
        self.report_dtype = torch.float64 if wide else torch.float32

        self.layer_has_grad = [False] * self.num_layers
        self.layer_measured = [False] * self.num_layers
        for lid, cat in zip(self.tensor_layer_ids, categories):
            self.layer_has_grad[lid] = True
            self.layer_measured[lid] = self.layer_measured[lid] or cat < 2
        measured = [p for p, cat in enumerate(categories) if cat < 2]
        self.all_measured = len(measured) == self.num_tensors
        self.any_measured = bool(measured)
        dev = self.device
        self.measured = Runs(measured, keys, empty, numels=self._numels)
        self.measured_positions_t = torch.tensor(measured, dtype=torch.long, device=dev)
        self.measured_layer_t = torch.tensor(
            [self.tensor_layer_ids[p] for p in measured], dtype=torch.long, device=dev
        )
        self.layer_measured_t = torch.tensor(self.layer_measured, dtype=torch.bool, device=dev)

        self.sharding: Sharding | None = sharding_of(
            self.names, grads_in_order, dev, self.acc_dtype
        )
        if self.sharding is not None:
            self.sharding.measuring(self.measured_positions_t, self.num_tensors)
        #: on a sharded model with in-place rules, the group over which
        #: `NormReport.across_ranks` combines their per-rank ``changed`` flags
        self.changes_group: RankGroup | None = None
        self.tags = list(tags) if tags is not None else [None] * len(layers)
        self.groups = self._make_groups(layers, rules, stages, keys, empty, store, local_shapes)
        self.rounds = self._make_rounds(keys, empty)
        self.has_state = any(s.slot is not None for g in self.groups for s in g.stages)
        # row indices are taken once every slot has every row this plan needs
        for group in self.groups:
            for stage in group.stages:
                if stage.slot is not None:
                    stage.row_index, stage.whole_rows = store.slots[stage.slot].index(stage.rows)
        self.store_generation = store.generation

    def select(self, grads_by_param: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The step's gradients in the plan's order (``grads_by_param`` indexed like the params)."""
        if self._identity:
            return grads_by_param  # type: ignore[return-value]
        if self._pick is None or torch.compiler.is_compiling():  # Dynamo cannot trace itemgetter
            return [grads_by_param[i] for i in self.order]  # type: ignore[misc]
        return list(self._pick(grads_by_param))

    # -- construction -------------------------------------------------------------------
    def _make_groups(
        self,
        layers: Sequence[Layer],
        rules: Sequence[Rule],
        stages: list[tuple[Rule, ...]],
        keys: list[tuple[torch.device, torch.dtype]],
        empty: list[bool],
        store: StateStore,
        local_shapes: list[torch.Size],
    ) -> list[Group]:
        keyed: dict[object, list[int]] = {}
        for lid, rule in enumerate(rules):
            if self.layer_has_grad[lid]:
                keyed.setdefault(group_of(rule, self.tags[lid]), []).append(lid)
        positions_of: dict[int, list[int]] = {}
        for p, lid in enumerate(self.tensor_layer_ids):
            positions_of.setdefault(lid, []).append(p)
        dev = self.device
        groups: list[Group] = []
        for layer_ids in keyed.values():
            rule = rules[layer_ids[0]]
            positions = sorted(p for lid in layer_ids for p in positions_of[lid])
            local = {lid: k for k, lid in enumerate(layer_ids)}
            layer_of_tensor = tuple(local[self.tensor_layer_ids[p]] for p in positions)
            tensor_layer = torch.tensor(layer_of_tensor, dtype=torch.long, device=dev)
            group = Group(
                index=len(groups),
                rule=rule,
                stages=[],
                layer_ids=layer_ids,
                positions=positions,
                positions_t=torch.tensor(positions, dtype=torch.long, device=dev),
                layer_ids_t=torch.tensor(layer_ids, dtype=torch.long, device=dev),
                tensor_layer_ids_t=torch.tensor(
                    [self.tensor_layer_ids[p] for p in positions], dtype=torch.long, device=dev
                ),
                covers_all=positions == list(range(self.num_tensors))
                and layer_ids == list(range(self.num_layers)),
                params=[self.params[p] for p in positions],
            )
            if self.sharding is not None:
                group.shard_weights, group.split_dims = self.sharding.group_shards(positions)
            many = len(stages[layer_ids[0]]) > 1
            for k, stage_rule in enumerate(stages[layer_ids[0]]):
                layout = GroupLayout(
                    layer_names=tuple(self.layer_names[lid] for lid in layer_ids),
                    param_names=tuple(self.names[p] for p in positions),
                    shapes=tuple(local_shapes[p] for p in positions),
                    full_numel=tuple(self.params[p].numel() for p in positions),
                    dtypes=tuple(keys[p][1] for p in positions),
                    devices=tuple(keys[p][0] for p in positions),
                    tensor_layer=tensor_layer,
                    layer_of_tensor=layer_of_tensor,
                    rules=tuple(stages[lid][k] for lid in layer_ids),
                    device=dev,
                    dtype=self.acc_dtype,
                    split_dims=tuple(group.split_dims or ()),
                    split_rows=(
                        ()
                        if self.sharding is None or not self.sharding.split_rows
                        else tuple(self.sharding.split_rows[p] for p in positions)
                    ),
                )
                # filled now, not inside a (possibly compiled) step
                for name in stage_rule.per_layer_fields:
                    layout.tensor_values(name)
                _ = layout.numel
                group.stages.append(
                    self._make_stage(group, k, stage_rule, layout, many, keys, empty, store)
                )
            group.asks_cross_rank = any(
                type(s.rule).cross_rank is not Rule.cross_rank for s in group.stages
            )
            if self.sharding is not None:
                _check_sharded_chain(group)
            groups.append(group)
        return groups

    def _make_stage(
        self,
        group: Group,
        k: int,
        rule: Rule,
        layout: GroupLayout,
        many: bool,
        keys: list[tuple[torch.device, torch.dtype]],
        empty: list[bool],
        store: StateStore,
    ) -> Stage:
        if not isinstance(rule, ScalingRule | InPlaceRule):
            raise TypeError(
                f"{rule.describe()} is not a ScalingRule or an InPlaceRule: a rule implements "
                "scale() (subclass gradclip.ScalingRule) or transform_() (gradclip.InPlaceRule)"
            )
        slot = state_slot(group.rule, k, rule, many)
        rows: list[str] = []
        if slot is not None:
            rows = state_rows(rule, layout.layer_names, self.tags[group.layer_ids[0]])
            store.ensure(slot, rule, rows, self.device, self.acc_dtype)
        remeasure = rule.norm_type is not None and (k > 0 or rule.norm_type != 2.0)
        return Stage(
            rule=rule,
            layout=layout,
            prepared=rule.prepare(layout),
            slot=slot,
            rows=rows,
            row_index=None,
            whole_rows=False,
            norm_runs=(
                Runs(group.positions, keys, empty, numels=self._numels) if remeasure else None
            ),
            coefficient_index=None,
        )

    def _make_rounds(
        self, keys: list[tuple[torch.device, torch.dtype]], empty: list[bool]
    ) -> list[Round]:
        rounds = []
        for k in range(max((len(g.stages) for g in self.groups), default=0)):
            members = [(g, g.stages[k]) for g in self.groups if len(g.stages) > k]
            # scaling rules first: the engine calls them before any in-place rule
            members.sort(key=lambda gs: not isinstance(gs[1].rule, ScalingRule))
            scaling = [(g, s) for g, s in members if isinstance(s.rule, ScalingRule)]
            positions = sorted(p for g, _ in scaling for p in g.positions)
            index = {p: i for i, p in enumerate(positions)}
            for g, s in scaling:
                s.coefficient_index = torch.tensor(
                    [index[p] for p in g.positions], dtype=torch.long, device=self.device
                )
            single = len(scaling) == 1 and scaling[0][0].positions == positions
            runs = Runs(positions, keys, empty, scaled=True) if positions else None
            rounds.append(Round(members, runs, single))
        return rounds


def check_not_replaced(names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
    """Refuse parameters that FSDP2's ``fully_shard`` replaced after they were collected.

    ``fully_shard`` puts a new ``DTensor`` parameter in the module and marks the
    one it replaced (``_fsdp_orig_uid``); the replaced one never gets a gradient
    again, so a normalizer still holding it would skip its layer forever. A
    normalizer built on a module follows the swap before planning; one built
    on tensors (a custom grouping) cannot, and is refused here.

    Raises:
        RuntimeError: naming the replaced parameters.
    """
    stale = [name for name, p in zip(names, params) if hasattr(p, "_fsdp_orig_uid")]
    if stale:
        shown = ", ".join(map(repr, stale[:10])) + (" ..." if len(stale) > 10 else "")
        raise RuntimeError(
            f"parameter(s) {shown} were replaced by fully_shard (FSDP2) after they were given "
            "to this normalizer: they will never have a gradient again, and their layers would "
            "never be normalized. A normalizer built on a module follows the swap; one built on "
            "tensors cannot: build it after fully_shard, from the module's new parameters."
        )


def _check_layer_devices(
    layers: Sequence[Layer], signature: Signature, flat_layer: list[int], names: list[str]
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


def _check_sharded_chain(group: Group) -> None:
    # The step's one collective reduces the norms measured before the first rule;
    # a later rule that reads norms would need them re-measured and reduced again.
    if len(group.stages) < 2:
        return
    first, later = group.stages[0].rule, [s.rule for s in group.stages[1:]]
    asks = type(first).cross_rank is not Rule.cross_rank or first.norm_type not in (None, 2.0)
    if asks or any(
        r.norm_type is not None or is_stateful(r) or type(r).cross_rank is not Rule.cross_rank
        for r in later
    ):
        raise NotImplementedError(
            "chain() on sharded (DTensor/FSDP2) gradients is exact only when its first "
            "rule needs L2 norms alone and the later rules read no norms (e.g. "
            "chain('ClipL2PerLayer', ('ClipElementWiseAbsoluteValue', 0.5))); this one "
            f"is {group.rule.describe()}. Use overrides (one rule per layer) instead."
        )
