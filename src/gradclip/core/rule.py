"""The rule contract: what a normalization rule receives, and what it returns.

A rule is an immutable value (a frozen dataclass): equal settings make equal
rules. It keeps no state of its own. Each step the engine measures what the
rule asks for, once for every layer of the model together, and calls it with
those measurements and the state it returned last time:

* a `ScalingRule` returns one multiplicative coefficient per tensor (the
  engine multiplies them in, with every other rule's, in one grouped launch per
  device and dtype) and its new state;
* an `InPlaceRule` rewrites the gradients itself (element-wise clipping,
  unit-wise AGC) and returns which layers it changed and its new state.

State is a flat ``{name: tensor}`` mapping whose tensors all have a leading
*row* dimension: one row for the whole group of layers the rule is given, or
one row per layer when `Rule.per_layer_state` is true. The engine owns it:
it stores each row under its layer's name, hands a rule the rows of the layers
that have gradients this step, and keeps a row as it was when that step's
norm was not finite. A rule therefore must return new tensors and never modify
the state it was given in place.

Examples:
    A rule that clips every tensor's root-mean-square to ``bound`` (the page
    "Write your own rule" of the documentation walks through it):

    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class ClipRMS(gradclip.ScalingRule):
    ...     bound: float = 1e-2
    ...
    ...     def scale(self, m, state):
    ...         rms = m.norms / m.numel.sqrt()
    ...         return torch.where(rms > self.bound, self.bound / rms, 1.0), state
    >>> report = gradclip.normalize_(model, ClipRMS(1e-3))
    >>> rms = [float(p.grad.pow(2).mean().sqrt()) for p in model.parameters()]
    >>> max(rms) <= 1e-3 * (1 + 1e-6)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import torch

if TYPE_CHECKING:
    from gradclip.core.split_rows import SplitRows

__all__ = [
    "Composite",
    "CrossRank",
    "GroupLayout",
    "InPlaceRule",
    "Measured",
    "Rule",
    "ScalingRule",
    "Shards",
    "State",
    "group_of",
    "set_fields",
    "stages_of",
]

State: TypeAlias = dict[str, torch.Tensor]


@dataclass(eq=False)
class CrossRank:
    """Per-rank partial quantities a rule needs summed or maximized over ranks.

    Returned by `Rule.cross_rank` on sharded gradients with this rank's values
    and handed back, reduced, in ``Measured.shards.reduced``; both ride in the
    step's one collective.

    Attributes:
        sums: ``(S,)`` summed over ranks. A piece held by several ranks (a
            ``Replicate`` placement) is summed once per holder: weight it by
            ``Shards.weights`` first.
        maxima: ``(M,)`` maximum over ranks.
        local: anything else the rule measured on this rank and wants back with
            the reduced values (e.g. the local norms it would otherwise measure twice).
    """

    sums: torch.Tensor | None = None
    maxima: torch.Tensor | None = None
    local: Any = None


@dataclass(eq=False)
class Shards:
    """How a group's gradients are sharded across ranks (``DTensor``, FSDP2).

    Attributes:
        weights: ``(T,)`` ``1 / replicas`` of each local piece: its weight in a
            sum over ranks.
        reduced: the reduced values of what `Rule.cross_rank` declared this step.
        zeroed: under ``nonfinite="zero"``, ``(T,)`` bool: tensors zeroed after
            ``reduced`` was measured, whose reduced quantities must be read as
            those of a zero tensor; else ``None``.
    """

    weights: torch.Tensor
    reduced: CrossRank | None = None
    zeroed: torch.Tensor | None = None


@dataclass(eq=False)
class GroupLayout:
    """The layers one rule is given in a step, as host-side facts plus cached indices.

    Everything here depends on which gradients exist, not on their values: it
    is built once when that set changes and reused every step.

    Attributes:
        layer_names: names of the layers that have gradients, in model order.
        param_names: qualified name of each tensor (``"layer.param"``).
        shapes: the shape of each gradient as the rule sees it (this rank's piece
            when sharded).
        full_numel: the number of elements of each full tensor.
        dtypes: the dtype of each gradient.
        devices: the device of each gradient.
        split_dims: when sharded, per tensor, the dims of the full tensor split
            across ranks (``()`` when this rank holds it whole); else empty.
        split_rows: when sharded, per tensor split on dim 0 and another dim, the
            rows of the full tensor this rank holds
            (`gradclip.core.split_rows.SplitRows`), ``None`` for the others; else empty.
        tensor_layer: ``(T,)`` int64 on ``device``: index in ``layer_names`` of
            each tensor's layer.
        layer_of_tensor: the same, as Python ints.
        rules: each layer's own rule (they differ only in `Rule.per_layer_fields`).
        device: where norms, coefficients and state live.
        dtype: the accumulation dtype of norms and coefficients (float64, or
            float32 where the device has no float64).
    """

    layer_names: tuple[str, ...]
    param_names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    full_numel: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[torch.device, ...]
    tensor_layer: torch.Tensor
    layer_of_tensor: tuple[int, ...]
    rules: tuple[Rule, ...]
    device: torch.device
    dtype: torch.dtype
    split_dims: tuple[tuple[int, ...], ...] = ()
    split_rows: tuple[SplitRows | None, ...] = ()
    _memo: dict[Hashable, torch.Tensor] = field(default_factory=dict, repr=False)

    def layer_values(self, name: str) -> torch.Tensor:
        """``(L,)`` the value of the field ``name`` of each layer's rule (cached)."""
        key = ("layer", name)
        if key not in self._memo:
            values = [float(getattr(rule, name)) for rule in self.rules]
            self._memo[key] = torch.tensor(values, dtype=self.dtype, device=self.device)
        return self._memo[key]

    def tensor_values(self, name: str) -> torch.Tensor:
        """``(T,)`` the value of the field ``name`` of each tensor's layer's rule (cached)."""
        key = ("tensor", name)
        if key not in self._memo:
            self._memo[key] = self.layer_values(name).index_select(0, self.tensor_layer)
        return self._memo[key]

    @property
    def numel(self) -> torch.Tensor:
        """``(T,)`` the number of elements of each tensor, in ``dtype`` (cached)."""
        key = "numel"
        if key not in self._memo:
            counts = [float(n) for n in self.full_numel]
            self._memo[key] = torch.tensor(counts, dtype=self.dtype, device=self.device)
        return self._memo[key]


@dataclass(eq=False)
class Measured:
    """What a rule is called with in one step.

    Attributes:
        grads: the gradients of the rule's layers (this rank's pieces when
            sharded); an `InPlaceRule` rewrites them in place.
        params: the parameters they belong to (AGC reads the weights).
        norms: ``(T,)`` norm of order `Rule.norm_type` of each gradient, measured
            before this rule ran; ``None`` when the rule reads no norms.
        layer_norms: ``(L,)`` the same order of norm over each layer's tensors.
        layout: the layer names, shapes and cached indices (`GroupLayout`).
        prepared: what `Rule.prepare` returned for this layout.
        step: how many steps this rule has run before in this normalizer, counted
            on the host (an upper bound of any state row's own count).
        shards: how the gradients are sharded, or ``None``.
        stage_totals: on pipeline stages (``pp_mesh``), for a rule that
            `Rule.spans_layers`, ``{p: total}``: the p-norm (0-d) of all the group's
            gradients on every stage, which `total_norm` returns (the same on every
            rank); ``{}`` for a rule that does not span layers; ``None`` off pipelines.
    """

    grads: list[torch.Tensor]
    params: list[torch.Tensor]
    norms: torch.Tensor | None
    layer_norms: torch.Tensor | None
    layout: GroupLayout
    prepared: Any = None
    step: int = 0
    shards: Shards | None = None
    stage_totals: dict[float, torch.Tensor] | None = None
    _total: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def numel(self) -> torch.Tensor:
        """``(T,)`` element counts of the gradients (of the full tensors when sharded)."""
        return self.layout.numel

    def per_tensor(self, layer_values: torch.Tensor) -> torch.Tensor:
        """Spread ``(L,)`` per-layer values to ``(T,)``: each tensor gets its layer's."""
        return layer_values.index_select(0, self.layout.tensor_layer)

    def total_norm(self, norm_type: float = 2.0) -> torch.Tensor:
        """0-d norm of all the gradients together, from `norms` (memoized per step).

        On pipeline stages it is the total over every stage (`stage_totals`).

        Raises:
            RuntimeError: the rule reads no norms, or runs on pipeline stages
                without declaring `Rule.spans_layers` (its total would be this
                stage's alone).
        """
        if self.norms is None:
            raise RuntimeError("this rule reads no norms (norm_type is None)")
        if norm_type not in self._total:
            if self.stage_totals is not None:
                if norm_type not in self.stage_totals:
                    raise RuntimeError(
                        f"a rule read the total {norm_type}-norm of its layers on a pipeline "
                        "stage, where the other stages hold the rest of them: declare "
                        "spans_layers = True (and norm_type = the order it reads) on the rule "
                        "so that the step's collective brings the other stages' part"
                    )
                self._total[norm_type] = self.stage_totals[norm_type]
            else:
                self._total[norm_type] = torch.linalg.vector_norm(self.norms, ord=norm_type)
        return self._total[norm_type]


class Rule:
    """Base of every rule; subclass `ScalingRule` or `InPlaceRule`, as a frozen dataclass.

    Class attributes and methods a rule may override (all optional):

    * `norm_type`: the order of the per-tensor norms the engine measures for
      it (``2.0``); ``None`` for a rule that reads no norms.
    * `per_layer_fields`: fields whose value may differ between the layers
      the rule runs on as one group (the DL4J thresholds); read them with
      ``m.layout.layer_values(name)``.
    * `schedulable_fields`: fields that do not change what the state means (a
      threshold, a cap): changing them between steps keeps the state (see
      `gradclip.core.identity`).
    * `reads_gradient`: ``False`` for a rule that neither reads nor changes
      the gradients (DL4J ``None``): its layers are not even gathered unless a
      norm is asked for.
    * `layer_local`: ``True`` for a stateless rule whose effect on a layer
      depends on that layer alone (the DL4J modes, AGC): its layers run as one
      group whatever override key chose them (one call, fewer launches).
    * `squares`: ``False`` for a rule that never squares a gradient (DL4J
      ``None``, element-wise clipping): its layers are judged finite by their
      largest magnitude, so huge finite gradients are not refused.
    * `per_layer_state`: one state row per layer instead of one for the group.
    * `growable_state`: state entries the rule may grow along their non-row
      dims (a history buffer); the engine zero-pads the other rows to match.
    * `spans_layers`: whether the rule reads ``m.total_norm()`` of all its
      layers together (a global clip), which on pipeline stages spans ranks.
    * `uniform`: whether `ScalingRule.scale` gives every tensor of a layout the
      same coefficient (a global rule, or a per-layer one over one layer): the
      engine may then fold it into a fused optimizer's ``grad_scale``.
    * `init_state`, `prepare`, `stats`, `cross_rank`.
    """

    norm_type: ClassVar[float | None] = 2.0
    per_layer_fields: ClassVar[tuple[str, ...]] = ()
    schedulable_fields: ClassVar[tuple[str, ...]] = ()
    reads_gradient: ClassVar[bool] = True
    squares: ClassVar[bool] = True
    layer_local: ClassVar[bool] = False

    @property
    def per_layer_state(self) -> bool:
        """Whether the state has one row per layer (else one row for the group)."""
        return False

    @property
    def spans_layers(self) -> bool:
        """Whether the rule reads the total norm (of order `norm_type`) of all its layers.

        On a model split into pipeline stages (``pp_mesh``) the engine then adds
        the other stages' part of that total in the step's one collective
        (`Measured.stage_totals`); rules that decide layer by layer need nothing.
        """
        return False

    @property
    def growable_state(self) -> frozenset[str]:
        """State entries the rule may grow along their non-row dims (none by default)."""
        return frozenset()

    def uniform(self, layout: GroupLayout) -> bool:
        """Whether every tensor of ``layout`` gets the same coefficient, whatever the step.

        ``False`` by default: the engine then multiplies the coefficients in
        itself. Only a `ScalingRule` whose ``scale`` returns one value for all
        tensors may answer ``True``.
        """
        return False

    def init_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> State:
        """A fresh state of ``rows`` rows (every tensor's dim 0 is ``rows``); none by default."""
        return {}

    def prepare(self, layout: GroupLayout) -> Any:
        """Work that depends on the layout only, done once per layout; `Measured.prepared`.

        It runs before any gradient of the step is touched, so it is also the
        place to refuse a layout the rule cannot handle.
        """
        return None

    def stats(self, m: Measured, state: State) -> Mapping[str, torch.Tensor]:
        """Values to show in the report, from this step's measurements and new state."""
        return {}

    def cross_rank(self, m: Measured) -> CrossRank | None:
        """This rank's part of quantities to reduce over ranks, beyond the norms.

        Called only on sharded gradients, before the step's collective, with
        ``m.norms`` not yet reduced (``None``). The engine already reduces the
        norms of `norm_type`; only rules that need other quantities (AGC's
        row norms of split tensors) override this.
        """
        return None

    # -- identity -----------------------------------------------------------------------
    def group_key(self) -> Hashable:
        """Layers whose rules share this key run as one group."""
        if not dataclasses.is_dataclass(self):
            return (type(self), id(self))
        fixed = tuple(
            (f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in self.per_layer_fields
        )
        return (type(self), fixed)

    def describe(self) -> str:
        """``Name(field=value, ...)``: the rule as shown in tables and state dicts."""
        if not dataclasses.is_dataclass(self):
            return type(self).__name__
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"{type(self).__name__}({args})"


class Composite(Rule):
    """Rules applied one after the other to the same layers (built by `gradclip.chain`).

    The engine runs member ``k`` of every composite in its ``k``-th round,
    measuring the norms again before a member that reads them.
    """

    rules: tuple[Rule, ...]


def group_of(rule: Rule, tag: str | None) -> Hashable:
    """Layers with equal group keys run as one group: equal rules (up to per-layer fields)
    chosen by the same override key ``tag``, or by any key for a `Rule.layer_local` rule."""
    local = all(stage.layer_local for stage in stages_of(rule))
    return (None if local else tag, rule.group_key())


def stages_of(rule: Rule) -> tuple[Rule, ...]:
    """The rules a rule runs as, in order: a chain's members (flattened), else itself."""
    if not isinstance(rule, Composite):
        return (rule,)
    return tuple(stage for member in rule.rules for stage in stages_of(member))


class ScalingRule(Rule):
    """A rule that scales each gradient tensor by a coefficient it computes on the device."""

    def scale(self, m: Measured, state: State) -> tuple[torch.Tensor, State]:
        """``(T,)`` coefficients, one per tensor of ``m.grads``, and the new state.

        A coefficient of exactly ``1.0`` leaves its tensor bit-for-bit unchanged.
        """
        raise NotImplementedError


class InPlaceRule(Rule):
    """A rule that rewrites its gradients itself (element-wise or unit-wise)."""

    def transform_(self, m: Measured, state: State) -> tuple[torch.Tensor | None, State]:
        """Rewrite ``m.grads`` in place; return ``(L,)`` bool "layer changed" (or ``None``
        when that is unknown without an extra pass) and the new state."""
        raise NotImplementedError


def set_fields(rule: Rule, **values: Any) -> None:
    """Store validated values on a frozen dataclass rule (for ``__post_init__``)."""
    for name, value in values.items():
        object.__setattr__(rule, name, value)
