"""Pipeline stages: rules over the whole model when each rank holds only some of its layers.

With pipeline parallelism (``torch.distributed.pipelining``, torchtitan) a rank
holds the layers of its stage (or of several, with interleaved schedules),
under their global names. A rule that decides layer by layer needs nothing
from the other stages. A rule that `spans_layers <gradclip.core.rule.Rule.spans_layers>`
(``ClipGlobalNorm``, AutoClip and ZClip with ``scope="global"``) reads the
total norm of *all* its layers, so each rank sends its part of that total:

* for a finite order ``p``, ``s_r = Σ_i w_i · n_{r,i}^p`` over the rule's
  tensors on rank ``r`` (``n`` the norms of its local pieces, ``w = 1/replicas``
  as in `gradclip.core.sharding`), written in row ``stage`` of a
  ``(stages, S)`` block: after the sum over ranks, row ``s`` holds stage ``s``'s
  part, and every rank forms the same total from the rows::

      ‖g‖_p = (Σ_s row_s)^{1/p}

* for ``p = ∞``, the local maximum, in this rank's row of a ``(ranks, M)``
  block of zeros (the maxima trick of `gradclip.core.sharding`); the maximum
  over the rows is the maximum over every stage.

One more sum carries the squares of every measured tensor, for the report's
`total_norm <gradclip.core.report.NormReport.total_norm>`. The slots are
named by the configuration (the default rule and the overrides), which every
rank has alike, so ranks agree on the layout without talking.

These few floats ride in the step's **one** collective: on replicated
gradients (DDP) an ``all_reduce`` over the pipeline group; on sharded ones
(FSDP2/HSDP over the data-parallel mesh) they are appended to the data-parallel
vector, each stage's block at its own offset, and the whole vector is reduced
over the ranks of every stage together (see `StageTransport`). A configuration
without such a rule sends nothing more than it would on one stage.

With ``nonfinite="zero"`` or ``"skip"`` the rows also count each stage's
non-finite tensors, so that every stage skips, or leaves the zeroed layers out
of its totals, as the unsplit model does. A `chain` member after the first that
spans layers reads the norms the earlier members left: its slot travels in a
collective of its own before its round (`Pipeline.later_rounds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gradclip.core.rule import Rule, group_of, stages_of
from gradclip.core.stage_transport import StageLayout, StageTransport

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradclip.core.measure import LocalParts
    from gradclip.core.plan import Plan

__all__ = [
    "EVERY_STAGE",
    "Pipeline",
    "StageLayout",
    "StageTotals",
    "StageTransport",
    "pipeline_of",
    "spanning_slots",
    "transport_for",
]


# what a group row's state covers on pipeline stages (each stage holds part of it)
EVERY_STAGE = "the group's layers on every pipeline stage"


def _slot_key(rule: Rule, tag: str | None) -> str:
    return repr(group_of(rule, tag))


Slot = tuple[str, int, float]  # (group key, round, p)


def spanning_slots(rules: Iterable[tuple[Rule, str | None]]) -> tuple[Slot, ...]:
    """``(group key, round, p)`` of every member of every ``(rule, override key)`` of the
    configuration that spans layers, sorted (the default rule's key is ``None``; the
    round is the member's place in a `chain`, 0 for a single rule).

    Raises:
        ValueError: a rule that spans layers reads no norm.
    """
    slots: set[Slot] = set()
    for rule, tag in rules:
        for k, member in enumerate(stages_of(rule)):
            if not member.spans_layers:
                continue
            if member.norm_type is None:
                raise ValueError(f"{member.describe()} spans layers but reads no norm (norm_type)")
            slots.add((_slot_key(rule, tag), k, float(member.norm_type)))
    return tuple(sorted(slots))


# per plan: (group index, round, p, is a maximum, its column, its place j in `slots`)
Entry = tuple[int, int, float, bool, int, int]


@dataclass(eq=False)
class Pipeline:
    """This rank's place among the pipeline stages, and the slots the step exchanges.

    A chain member after the first that spans layers (round ``k > 0``) reads the
    norms left by the rounds before it, on every stage: its slot travels in a
    collective of its own, run before its round (`later_rounds`). When no rule
    needs the stages before round 0 (`now` is false), the step's own columns
    (the report's sum, the non-finite counts) wait for that collective, which is
    then the step's only one.

    Attributes:
        group: the pipeline process group (``None``: the default group).
        rank: this rank's index in it (its row).
        size: its number of ranks.
        slots: ``(group key, round, p)`` of the configuration's members that span layers.
        nonfinite: the normalizer's policy (``"zero"``, ``"skip"``: see `flags`).
        layout: what the ranks learned of each other's blocks (`StageLayout`).
    """

    group: ProcessGroup | None
    rank: int
    size: int
    slots: tuple[Slot, ...] = ()
    nonfinite: str = "propagate"
    layout: StageLayout = field(default_factory=lambda: StageLayout())
    _sum_of: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)
    _max_of: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)
    _plan_slots: tuple[Plan, list[Entry]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        sums = maxima = 0
        for key, k, p in self.slots:
            if math.isinf(p):
                self._max_of[key, k] = maxima
                maxima += 1
            else:
                sums += 1  # slot 0 is the report's total
                self._sum_of[key, k] = sums

    def with_slots(self, slots: tuple[Slot, ...]) -> Pipeline:
        """This pipeline exchanging ``slots`` (the same policy, and the layout learned)."""
        return Pipeline(self.group, self.rank, self.size, slots, self.nonfinite, self.layout)

    @property
    def later_rounds(self) -> tuple[int, ...]:
        """The rounds after the first with a member that spans layers: one collective each."""
        return tuple(sorted({k for _, k, _ in self.slots if k > 0}))

    @property
    def active(self) -> bool:
        """Whether a step exchanges anything between stages."""
        return bool(self.slots) or self.now

    @property
    def now(self) -> bool:
        """Whether the stages exchange before round 0: a first rule spans layers, or a
        non-finite layer on any stage decides every stage's step (``"skip"``, and
        ``"error"`` when a later collective would wait for a rank that raised)."""
        return (
            self.nonfinite == "skip" or self._error_decides or any(k == 0 for _, k, _ in self.slots)
        )

    @property
    def _error_decides(self) -> bool:
        return self.nonfinite == "error" and bool(self.later_rounds)

    @property
    def flags(self) -> bool:
        """Whether the sums carry the counts of non-finite tensors."""
        return self.nonfinite in ("zero", "skip") or self._error_decides

    @property
    def bad_at(self) -> int:
        """The column counting every non-finite tensor (slot ``j``'s: ``bad_at + 1 + j``)."""
        return 1 + len(self._sum_of)

    @property
    def num_sums(self) -> int:
        return self.bad_at + (1 + len(self.slots) if self.flags else 0)

    @property
    def num_maxima(self) -> int:
        return len(self._max_of)

    def partials(
        self,
        plan: Plan | None,
        parts: LocalParts | None,
        dtype: torch.dtype,
        device: torch.device,
        bad: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(S,)`` sums and ``(M,)`` maxima before round 0 (zeros without
        gradients): the report's sum, the first rules' slots, the non-finite counts.

        ``bad``: ``(T,)`` bool, the plan's tensors that count as non-finite
        (``nonfinite="zero"``/``"skip"``): they add 0 to the spanning rules' sums
        and maxima, as the zeroed layers of the unsplit model do, and are counted
        in the flag columns (every tensor's, and each slot's). The report's sum
        keeps them, as the unsplit model's report does.
        """
        sums = torch.zeros(self.num_sums, dtype=dtype, device=device)
        maxima = torch.zeros(self.num_maxima, dtype=dtype, device=device)
        if plan is None or parts is None:
            return sums, maxima
        if bad is not None and self.flags:
            sums[self.bad_at] = bad.sum()
        weights = plan.sharding.weights if plan.sharding is not None else None
        full: torch.Tensor | None = None  # (T,) local L2 norms, 0 where not measured
        if parts.norms is not None:
            squares = parts.norms.square()
            if weights is not None:
                squares = squares * weights.index_select(0, plan.measured_positions_t)
            sums[0] = squares.sum()
            full = parts.norms
            if not plan.all_measured:
                full = parts.norms.new_zeros(plan.num_tensors)
                full.index_copy_(0, plan.measured_positions_t, parts.norms)
        for gi, k, p, is_max, index, j in self._slots_of(plan):
            group = plan.groups[gi]
            own = None
            if bad is not None:
                own = bad if group.covers_all else bad.index_select(0, group.positions_t)
                if self.flags:
                    sums[self.bad_at + 1 + j] = own.sum()
            if k > 0:  # measured again before its round
                continue
            norms = parts.p_norms.get(gi)
            if norms is None:  # the step's L2 norms of the group's tensors
                assert full is not None
                norms = full if group.covers_all else full.index_select(0, group.positions_t)
            if own is not None:
                norms = norms.masked_fill(own, 0.0)
            self._put(sums, maxima, group.shard_weights, norms, p, is_max, index)
        return sums, maxima

    def round_partials(
        self,
        plan: Plan | None,
        k: int,
        norms: dict[int, torch.Tensor],
        base: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``base`` (`partials`' or zeros) with round ``k``'s slots: each group's
        ``norms``, measured again before the round."""
        sums, maxima = base[0].clone(), base[1].clone()
        for gi, kk, p, is_max, index, _ in self._slots_of(plan) if plan is not None else ():
            if kk == k and gi in norms:
                shard_weights = plan.groups[gi].shard_weights  # type: ignore[union-attr]
                self._put(sums, maxima, shard_weights, norms[gi], p, is_max, index)
        return sums, maxima

    @staticmethod
    def _put(
        sums: torch.Tensor,
        maxima: torch.Tensor,
        shard_weights: torch.Tensor | None,
        norms: torch.Tensor,
        p: float,
        is_max: bool,
        index: int,
    ) -> None:
        if is_max:
            maxima[index] = norms.amax() if norms.numel() else norms.new_zeros(())
        else:
            powers = norms.pow(p)
            if shard_weights is not None:
                powers = powers * shard_weights
            sums[index] = powers.sum()

    def round_groups(self, plan: Plan, k: int) -> list[tuple[int, float]]:
        """``(group index, p)`` of the plan's groups with a slot in round ``k``."""
        return [(gi, p) for gi, kk, p, _, _, _ in self._slots_of(plan) if kk == k]

    def _slots_of(self, plan: Plan) -> list[Entry]:
        """The plan's `Entry` s, one per spanning member of each group (cached)."""
        cached = self._plan_slots
        if cached is not None and cached[0] is plan:
            return cached[1]
        place = {(key, k): j for j, (key, k, _) in enumerate(self.slots)}
        out = []
        for gi, group in enumerate(plan.groups):
            key = _slot_key(group.rule, plan.tags[group.layer_ids[0]])
            for k, stage in enumerate(group.stages):
                p = stage.rule.norm_type
                if p is None or (key, k) not in place:
                    continue
                if (key, k) in self._max_of:
                    out.append((gi, k, p, True, self._max_of[key, k], place[key, k]))
                else:
                    out.append((gi, k, p, False, self._sum_of[key, k], place[key, k]))
        self._plan_slots = (plan, out)
        return out

    def totals(
        self,
        plan: Plan | None,
        sum_rows: torch.Tensor,
        max_rows: torch.Tensor,
        k: int = 0,
        base: bool = True,
    ) -> StageTotals:
        """The totals over every stage of round ``k``'s slots, from the reduced rows (see
        `StageTotals`); with ``base``, also the report's sum and the non-finite flags.

        Formed from the reduced rows alone, in one order, so that every rank of
        every stage gets the same bits (and the state of a global rule is the
        same on every stage, which a checkpoint keeps one copy of).
        """
        summed = sum_rows.sum(dim=0)
        top = max_rows.amax(dim=0) if max_rows.numel() else max_rows.new_zeros(0)
        norms: dict[int, dict[float, torch.Tensor]] = {}
        bad: dict[int, torch.Tensor] = {}
        for gi, kk, p, is_max, index, j in self._slots_of(plan) if plan is not None else ():
            if kk == k:
                norms[gi] = {p: top[index] if is_max else summed[index].pow(1.0 / p)}
            if self.flags and base:
                flag = summed[self.bad_at + 1 + j] > 0
                bad[gi] = flag if gi not in bad else bad[gi] | flag
        anywhere = summed[self.bad_at] > 0 if self.flags and base else None
        return StageTotals(norms, summed[0] if base else None, anywhere, bad)


@dataclass(eq=False)
class StageTotals:
    """What a step learns from every stage.

    Attributes:
        norms: per group index ``{p: norm of its gradients on every stage}`` (of one round).
        squares: the sum of squares of every stage's measured gradients (the report's),
            when the collective carried it.
        anywhere: 0-d bool, a tensor on some stage was not finite (``nonfinite``
            ``"zero"``/``"skip"``; ``None`` otherwise).
        bad: per spanning group index, 0-d bool: one of its tensors, on some
            stage, was not finite (its group state then stays as it was, as on
            the unsplit model).
    """

    norms: dict[int, dict[float, torch.Tensor]]
    squares: torch.Tensor | None
    anywhere: torch.Tensor | None = None
    bad: dict[int, torch.Tensor] = field(default_factory=dict)


def pipeline_of(pp_mesh: Any) -> Pipeline:
    """The `Pipeline` of a 1-D ``DeviceMesh`` or a ``ProcessGroup`` of the stages.

    Raises:
        ValueError: a mesh of more than one dimension, or no process group.
        TypeError: neither a mesh nor a process group.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "pp_mesh needs an initialized process group (torch.distributed.init_process_group)"
        )
    if hasattr(pp_mesh, "get_group") and hasattr(pp_mesh, "ndim"):
        if pp_mesh.ndim != 1:
            raise ValueError(
                f"pp_mesh must be a 1-D mesh of the pipeline stages, got a {pp_mesh.ndim}-D "
                "mesh: pass world_mesh['pp']"
            )
        group = pp_mesh.get_group(0)
    elif isinstance(pp_mesh, dist.ProcessGroup):
        group = pp_mesh
    else:
        raise TypeError(
            f"pp_mesh must be a 1-D DeviceMesh or a ProcessGroup, got {type(pp_mesh).__name__}"
        )
    return Pipeline(group, dist.get_rank(group), dist.get_world_size(group))


def transport_for(pipeline: Pipeline, sharded_world: int | None) -> StageTransport:
    """The transport of a step: over the pipeline group (replicated gradients), or over
    the default group when the stages' meshes (of any number of dims) together make
    up the world.

    Raises:
        NotImplementedError: sharded gradients whose reduction group (a stage's
            mesh: data parallel, HSDP, data x tensor parallel) times the stages is not
            every rank (a stage with ranks outside its mesh, e.g. DDP replicas of
            a tensor-parallel mesh).
    """
    import torch.distributed as dist

    if sharded_world is None:
        return StageTransport(pipeline, pipeline.group, pipeline.size, pipeline.rank)
    world = dist.get_world_size()
    if sharded_world * pipeline.size != world:
        raise NotImplementedError(
            f"sharded gradients reduced over {sharded_world} ranks on each of "
            f"{pipeline.size} pipeline stages, but the job has {world} ranks: gradclip "
            "reduces the stages' meshes together over every rank, which needs "
            "stages x ranks of a stage's mesh = world size: put every sharded parameter "
            "of a stage on one mesh of all its ranks (e.g. (replicate, shard) or (dp, tp))"
        )
    return StageTransport(pipeline, None, world, dist.get_rank(), sharded=True)
