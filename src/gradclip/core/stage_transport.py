"""The step's ``all_reduce`` on pipeline stages, and what it does when a stage changes.

One vector, reduced over the ranks of every stage together::

    [lengths, one per rank | block of stage 0 | … | block of stage N-1 | (stages, S) sums
     | (ranks, M) maxima]

Each rank writes its stage's block (the data-parallel vector of a sharded step)
at the stage's offset, so that after the sum each block holds its own stage's
data-parallel sum, exactly as a reduction over that stage's data-parallel group
would; the rows are the `gradclip.core.pipeline.Pipeline`'s slots.

The blocks' lengths are learned once (one ``all_gather`` at the first step of
every rank together), and each step every rank writes its block's length in its
own entry of the header. A rank whose layers changed (a parameter added or
deleted rebuilds its engine, and its block's length changes with it) does not
learn alone, which would leave it in an ``all_gather`` while the other stages
wait in the ``all_reduce``: it sends the vector of the old layout, its block
zeroed, and its new length in the header. Every rank reads the header in the
step's one host read (`alarms`), sees the change, adopts the new lengths, and
the step runs again in the new layout: one more collective, on that step only.
If the ranks of one stage report different lengths (their layers differ), every
rank raises the same error instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["RELAYOUT", "REPAIR", "StageLayout", "StageLayoutError", "StageTransport"]

RELAYOUT = 0  # alarm: a stage's block changed length, the step runs again in the new layout
REPAIR = 1  # alarm: a tensor was not finite under nonfinite="zero": the rows are sent again


@dataclass(eq=False)
class StageLayout:
    """What the ranks of a sharded step learned of each other's blocks, kept by the
    `Pipeline` across this rank's rebuilt engines (a changed layer rebuilds them).

    Attributes:
        stage_of: per rank of the transport's group, its pipeline rank.
        blocks: per pipeline rank, its block's length.
    """

    stage_of: list[int] | None = None
    blocks: list[int] | None = None


class Stages(Protocol):
    """What the transport reads of a `gradclip.core.pipeline.Pipeline`."""

    rank: int
    size: int
    nonfinite: str
    layout: StageLayout

    @property
    def bad_at(self) -> int: ...


class StageLayoutError(RuntimeError):
    """The ranks of one pipeline stage hold different layers (raised on every rank)."""


@dataclass(eq=False)
class StageTransport:
    """The step's ``all_reduce`` on pipeline stages: stage blocks, then the shared slots.

    Attributes:
        pipeline: the stages and slots (and the `StageLayout` learned, kept there).
        group: the ranks reduced over (``None``: the default group).
        ranks: their number; rank: this rank's index in it.
        sharded: the gradients are sharded: stages send blocks of their own lengths.
        reduced: after a step, the reduced ``(sums rows, maxima rows)``.
        pending: see `gradclip.core.pipeline.Pipeline.now`.
    """

    pipeline: Stages
    group: ProcessGroup | None
    ranks: int
    rank: int
    sharded: bool = False
    reduced: tuple[torch.Tensor, torch.Tensor] | None = None
    #: a step's sums and maxima waiting for its first later round's collective
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    _header: torch.Tensor | None = None

    def _learn(self, length: int) -> list[int]:
        """Every stage's block length: learned once, by every rank at its first step."""
        layout = self.pipeline.layout
        if layout.blocks is None or layout.stage_of is None:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.ranks
            dist.all_gather_object(gathered, (self.pipeline.rank, length), group=self.group)
            layout.stage_of = [int(stage) for stage, _ in gathered]
            layout.blocks = self._blocks_of([int(n) for _, n in gathered])
        return layout.blocks

    def _blocks_of(self, lengths: list[int]) -> list[int]:
        """Per stage, the length its ranks report; raise if they differ (on every rank)."""
        stage_of = self.pipeline.layout.stage_of
        assert stage_of is not None
        blocks: dict[int, set[int]] = {}
        for stage, n in zip(stage_of, lengths):
            blocks.setdefault(stage, set()).add(n)
        for stage, seen in sorted(blocks.items()):
            if len(seen) > 1:
                raise StageLayoutError(
                    f"the ranks of pipeline stage {stage} hold different layers (their "
                    f"steps' vectors have lengths {sorted(seen)}): change a stage's layers "
                    "on all of its data-parallel ranks together. No gradient or state was "
                    "modified, on any rank."
                )
        return [min(blocks.get(s, {0})) for s in range(self.pipeline.size)]

    def run(
        self, block: torch.Tensor | None, sums: torch.Tensor, maxima: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """All-reduce once; keep the slots' rows (`reduced`).

        Returns:
            This stage's reduced block (``None`` without one), and the alarms to
            read with the step's host read (``None``: nothing to read), see
            `RELAYOUT`, `REPAIR` and `settle`.
        """
        import torch.distributed as dist

        pipe = self.pipeline
        length = 0 if block is None else block.numel()
        header = self.ranks if self.sharded else 0
        blocks = self._learn(length) if self.sharded else [0] * pipe.size
        fits = blocks[pipe.rank] == length
        head = header + sum(blocks)
        s, m = sums.numel(), maxima.numel()
        size = head + pipe.size * s + self.ranks * m
        vector = torch.zeros(size, dtype=sums.dtype, device=sums.device)
        offset = header + sum(blocks[: pipe.rank])
        if header:
            vector[self.rank] = length
        if block is not None and fits:
            vector[offset : offset + length] = block
        sum_rows = vector[head : head + pipe.size * s].view(pipe.size, s)
        sum_rows[pipe.rank] = sums
        max_rows = vector[head + pipe.size * s :].view(self.ranks, m)
        max_rows[self.rank] = maxima
        dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=self.group)  # the step's one
        self.reduced = (sum_rows, max_rows)
        alarms = self._alarms(vector[:header], blocks, sum_rows)
        if block is None:
            return None, alarms
        return (vector[offset : offset + length] if fits else block.new_zeros(length)), alarms

    def _alarms(
        self, header: torch.Tensor, blocks: list[int], sum_rows: torch.Tensor
    ) -> torch.Tensor | None:
        pipe = self.pipeline
        repair = pipe.nonfinite == "zero" and self.sharded
        if not self.sharded:
            return None
        stage_of = pipe.layout.stage_of
        assert stage_of is not None
        expected = torch.tensor(
            [blocks[stage] for stage in stage_of], dtype=header.dtype, device=header.device
        )
        self._header = header
        moved = (header != expected).any()
        again = sum_rows[:, pipe.bad_at].sum() > 0 if repair else torch.zeros_like(moved)
        return torch.stack([moved, again])

    def settle(self) -> None:
        """After a `RELAYOUT` alarm: adopt the lengths the ranks sent (read to the host,
        on that step only), so that the step can run again in the new layout.

        Raises:
            StageLayoutError: the ranks of a stage sent different lengths.
        """
        assert self._header is not None
        lengths = [int(n) for n in self._header.tolist()]
        self.pipeline.layout.blocks = self._blocks_of(lengths)

    def rows(self, sums: torch.Tensor, maxima: torch.Tensor) -> None:
        """All-reduce the slots' rows alone (`REPAIR`: the sums of the tensors left finite)."""
        import torch.distributed as dist

        pipe = self.pipeline
        s, m = sums.numel(), maxima.numel()
        vector = torch.zeros(pipe.size * s + self.ranks * m, dtype=sums.dtype, device=sums.device)
        sum_rows = vector[: pipe.size * s].view(pipe.size, s)
        sum_rows[pipe.rank] = sums
        max_rows = vector[pipe.size * s :].view(self.ranks, m)
        max_rows[self.rank] = maxima
        dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=self.group)
        self.reduced = (sum_rows, max_rows)

    def reducer(self, sums: torch.Tensor, maxima: torch.Tensor) -> Any:
        """``vector -> (reduced vector, alarms)`` for
        `gradclip.core.collective.StepCollective.exchange`."""

        def reduce(vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            out, alarms = self.run(vector, sums, maxima)
            assert out is not None
            return out, alarms

        return reduce
