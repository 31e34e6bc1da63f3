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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gradclip.core.rule import Rule, group_of, stages_of

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from gradclip.core.measure import LocalParts
    from gradclip.core.plan import Plan

__all__ = [
    "EVERY_STAGE",
    "Pipeline",
    "StageTransport",
    "pipeline_of",
    "spanning_slots",
    "transport_for",
]


# what a group row's state covers on pipeline stages (each stage holds part of it)
EVERY_STAGE = "the group's layers on every pipeline stage"


def _slot_key(rule: Rule, tag: str | None) -> str:
    return repr(group_of(rule, tag))


def spanning_slots(rules: Iterable[tuple[Rule, str | None]]) -> tuple[tuple[str, float], ...]:
    """``(group key, p)`` of every ``(rule, override key)`` of the configuration that
    spans layers, sorted (the default rule's key is ``None``).

    Raises:
        ValueError: a chain member after the first spans layers (its norms are
            measured again after the first member ran, which would take a second
            collective), or a rule that spans layers reads no norm.
    """
    slots: set[tuple[str, float]] = set()
    for rule, tag in rules:
        members = stages_of(rule)
        for later in members[1:]:
            if later.spans_layers:
                raise ValueError(
                    f"{rule.describe()}: on pipeline stages a chain may read the total norm of "
                    f"its layers only in its first rule, not in {later.describe()} (the total "
                    "after the first rule ran would need a second collective); put the rule "
                    "that spans layers first"
                )
        first = members[0]
        if first.spans_layers:
            if first.norm_type is None:
                raise ValueError(f"{first.describe()} spans layers but reads no norm (norm_type)")
            slots.add((_slot_key(rule, tag), float(first.norm_type)))
    return tuple(sorted(slots))


@dataclass(eq=False)
class Pipeline:
    """This rank's place among the pipeline stages, and the slots the step exchanges.

    Attributes:
        group: the pipeline process group (``None``: the default group).
        rank: this rank's index in it (its row).
        size: its number of ranks.
        slots: ``(group key, p)`` of the configuration's rules that span layers.
    """

    group: ProcessGroup | None
    rank: int
    size: int
    slots: tuple[tuple[str, float], ...] = ()
    _sum_of: dict[str, int] = field(default_factory=dict, repr=False)
    _max_of: dict[str, int] = field(default_factory=dict, repr=False)
    _plan_slots: tuple[Plan, list[tuple[int, float, bool, int]]] | None = field(
        default=None, repr=False
    )

    def __post_init__(self) -> None:
        sums = maxima = 0
        for key, p in self.slots:
            if math.isinf(p):
                self._max_of[key] = maxima
                maxima += 1
            else:
                sums += 1  # slot 0 is the report's total
                self._sum_of[key] = sums

    def with_slots(self, slots: tuple[tuple[str, float], ...]) -> Pipeline:
        """This pipeline exchanging ``slots``."""
        return Pipeline(self.group, self.rank, self.size, slots)

    @property
    def active(self) -> bool:
        """Whether a step exchanges anything between stages."""
        return bool(self.slots)

    @property
    def num_sums(self) -> int:
        return 1 + len(self._sum_of)

    @property
    def num_maxima(self) -> int:
        return len(self._max_of)

    def partials(
        self, plan: Plan | None, parts: LocalParts | None, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's ``(S,)`` sums and ``(M,)`` maxima (zeros without gradients)."""
        sums = torch.zeros(self.num_sums, dtype=dtype, device=device)
        maxima = torch.zeros(self.num_maxima, dtype=dtype, device=device)
        if plan is None or parts is None:
            return sums, maxima
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
        for gi, p, is_max, index in self._slots_of(plan):
            group = plan.groups[gi]
            norms = parts.p_norms.get(gi)
            if norms is None:  # the step's L2 norms of the group's tensors
                assert full is not None
                norms = full if group.covers_all else full.index_select(0, group.positions_t)
            if is_max:
                maxima[index] = norms.amax() if norms.numel() else norms.new_zeros(())
            else:
                powers = norms.pow(p)
                if group.shard_weights is not None:
                    powers = powers * group.shard_weights
                sums[index] = powers.sum()
        return sums, maxima

    def _slots_of(self, plan: Plan) -> list[tuple[int, float, bool, int]]:
        """``(group index, p, is a maximum, slot)`` of the plan's spanning groups (cached)."""
        cached = self._plan_slots
        if cached is not None and cached[0] is plan:
            return cached[1]
        out = []
        for gi, group in enumerate(plan.groups):
            key = _slot_key(group.rule, plan.tags[group.layer_ids[0]])
            p = group.stages[0].rule.norm_type
            if p is None or (key not in self._sum_of and key not in self._max_of):
                continue
            if key in self._max_of:
                out.append((gi, p, True, self._max_of[key]))
            else:
                out.append((gi, p, False, self._sum_of[key]))
        self._plan_slots = (plan, out)
        return out

    def totals(
        self, plan: Plan, sum_rows: torch.Tensor, max_rows: torch.Tensor
    ) -> tuple[dict[int, dict[float, torch.Tensor]], torch.Tensor]:
        """Per group index ``{p: norm of its gradients on every stage}``, and the sum of
        squares of every stage's measured gradients (the report's), from the rows.

        Formed from the reduced rows alone, in one order, so that every rank of
        every stage gets the same bits (and the state of a global rule is the
        same on every stage, which a checkpoint keeps one copy of).
        """
        summed = sum_rows.sum(dim=0)
        top = max_rows.amax(dim=0) if max_rows.numel() else max_rows.new_zeros(0)
        out: dict[int, dict[float, torch.Tensor]] = {}
        for gi, p, is_max, index in self._slots_of(plan):
            out[gi] = {p: top[index] if is_max else summed[index].pow(1.0 / p)}
        return out, summed[0]


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


@dataclass(eq=False)
class StageTransport:
    """The step's ``all_reduce`` on pipeline stages: stage blocks, then the shared slots.

    ``[block of stage 0 | … | block of stage N-1 | (stages, S) sums | (ranks, M) maxima]``:
    this rank writes its stage's block (the data-parallel vector of a sharded
    step, or nothing) at the stage's offset, so that after the sum over the
    ranks of every stage each block holds its own stage's data-parallel sum,
    exactly as a reduction over that stage's data-parallel group would.

    Attributes:
        pipeline: the stages and slots.
        group: the ranks reduced over (``None``: the default group).
        ranks: their number; rank: this rank's index in it.
        sharded: the gradients are sharded: stages send blocks of their own lengths.
        blocks: every stage's block length, by pipeline rank (learned once).
    """

    pipeline: Pipeline
    group: ProcessGroup | None
    ranks: int
    rank: int
    sharded: bool = False
    blocks: list[int] | None = None
    reduced: tuple[torch.Tensor, torch.Tensor] | None = None

    def _learn_blocks(self, length: int) -> list[int]:
        if self.blocks is None:
            if self.pipeline.size == 1:
                self.blocks = [length]
            else:  # once per engine: the other stages' lengths
                import torch.distributed as dist

                gathered: list[Any] = [None] * self.pipeline.size
                dist.all_gather_object(gathered, length, group=self.pipeline.group)
                self.blocks = [int(n) for n in gathered]
        if self.blocks[self.pipeline.rank] != length:
            raise RuntimeError("a sharded step's vector changed length on a pipeline stage")
        return self.blocks

    def run(
        self, block: torch.Tensor | None, sums: torch.Tensor, maxima: torch.Tensor
    ) -> torch.Tensor | None:
        """All-reduce once; keep the slots' rows (`reduced`) and return this stage's block."""
        import torch.distributed as dist

        pipe = self.pipeline
        length = 0 if block is None else block.numel()
        blocks = self._learn_blocks(length) if self.sharded else [0] * pipe.size
        head = sum(blocks)
        s, m = sums.numel(), maxima.numel()
        size = head + pipe.size * s + self.ranks * m
        vector = torch.zeros(size, dtype=sums.dtype, device=sums.device)
        offset = sum(blocks[: pipe.rank])
        if block is not None:
            vector[offset : offset + length] = block
        sum_rows = vector[head : head + pipe.size * s].view(pipe.size, s)
        sum_rows[pipe.rank] = sums
        max_rows = vector[head + pipe.size * s :].view(self.ranks, m)
        max_rows[self.rank] = maxima
        dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=self.group)  # the step's one
        self.reduced = (sum_rows, max_rows)
        return None if block is None else vector[offset : offset + length]

    def reducer(self, sums: torch.Tensor, maxima: torch.Tensor) -> Callable[[torch.Tensor], Any]:
        """``vector -> reduced vector`` for `gradclip.core.collective.StepCollective.exchange`."""

        def reduce(vector: torch.Tensor) -> Any:
            return self.run(vector, sums, maxima)

        return reduce


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
