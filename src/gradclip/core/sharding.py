"""Sharded gradients: ``DTensor`` (FSDP2, tensor parallel, HSDP) with one collective per step.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every gradient is a
``DTensor`` whose rank-local piece is a slice of the full gradient. A layer's
norm, or a tensor's, is then a sum over ranks. The engine works on the local
pieces only:

1. each rank measures the L2 norm ``n_{r,i}`` of its local piece of every tensor
   ``i`` (the usual one ``_foreach_norm`` per device and dtype);
2. the squares, weighted by ``w_i = 1 / replicas_i``, are summed over ranks with
   **one** ``all_reduce`` of a single ``(T,)`` vector for all layers together::

       ‖g_i‖² = Σ_r w_i · n_{r,i}²

   where ``replicas_i`` is the number of ranks holding the same piece (the
   product of the mesh sizes along the tensor's ``Replicate`` placements, e.g.
   the replica dimension of HSDP), so a replicated piece is counted once;
3. per-layer norms, coefficients and the in-place multiply are then local: every
   rank computes the same coefficients from the same reduced vector and scales
   its own piece.

A strategy that needs more than the L2 norms (a global p-norm with ``p != 2``,
AGC's whole-tensor units of sharded biases) declares per-rank partial
quantities with `cross_rank` (`CrossRank`: sums
and maxima); they travel in the **same** collective, appended to the norms'
vector. A maximum rides on the sum with an exact trick: each rank writes its
values into its own slot of a ``(world, M)`` block of zeros, the sum over ranks
leaves every rank's values intact (``x + 0 = x`` exactly, inf and NaN
included), and the maximum over the slots is taken locally.

The bytes sent per step are one float per gradient tensor, whatever the model's
size, plus the few quantities strategies declare (`CrossRank`), after a
fingerprint of one float per parameter with which the ranks check that they
agree on the step's gradients (`gradclip.core.collective`).
Element-wise clipping and ``None`` measure nothing, so a step with only those
modes sends nothing. Under DDP gradients are plain tensors, already
averaged (identical on every rank): the engine needs no communication at all and
never calls into this module's collective.

Everything here that looks at placements runs once per `Plan`
(when the set of gradients changes); a model without ``DTensor`` gradients pays
one ``sys.modules`` lookup per plan and nothing per step.

Under ``torchrun`` (a process group on every rank; the page "Distributed
training" runs this on two processes):

```python
from torch.distributed.fsdp import fully_shard

for block in model.blocks:
    fully_shard(block)
fully_shard(model)
normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1.0)  # after fully_shard
loss.backward()
normalizer.apply()  # one all_reduce of 2 · len(parameters) + 1 floats
```

References:
    Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data
    Parallel", VLDB 2023 (sharding on dim 0, hybrid sharding).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gradclip.core.mesh_group import reduction_group
from gradclip.core.rule import CrossRank
from gradclip.core.split_rows import SplitRows, split_rows_of

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "Capacity",
    "RankGroup",
    "Sharding",
    "is_dtensor",
    "local_tensor",
    "local_tensors",
    "sharding_of",
]

# Where DTensor lives (public since torch 2.5, private before). If neither module
# was imported, no DTensor can exist, so the check costs no import.
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def _dtensor_type() -> type | None:
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        cls = getattr(module, "DTensor", None) if module is not None else None
        if isinstance(cls, type):
            return cls
    return None


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing it)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a ``DTensor`` (sharing its storage); any other tensor as it is.

    Writing into the result in place writes into the ``DTensor``. Ranks that hold
    an empty shard get an empty tensor.

    Examples:
        >>> g = torch.ones(3)
        >>> local_tensor(g) is g  # a plain tensor is its own piece
        True
    """
    if is_dtensor(tensor):
        with torch.no_grad():  # to_local() returns the stored local tensor, no autograd node
            return tensor.to_local()  # type: ignore[no-any-return,attr-defined]
    return tensor


def local_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`local_tensor` of each tensor, under one ``no_grad``."""
    cls = _dtensor_type()
    if cls is None:
        return list(tensors)
    with torch.no_grad():
        return [t.to_local() if isinstance(t, cls) else t for t in tensors]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RankGroup:
    """The process group of a sharded model, for a collective a caller asks for explicitly."""

    group: ProcessGroup | None  # None: the default group


@dataclass(eq=False)
class Sharding:
    """How the local norms of one plan's tensors become global norms.

    Built once per plan by `sharding_of`; every step the engine takes the
    gradients' local pieces and sends the measured norms and the strategies'
    `CrossRank` quantities in one collective (`pack`, then ``all_reduce``,
    then `unpack`).

    Attributes:
        group: the process group of the reduction (``None``: the default group).
        group_size: its number of ranks.
        weights: ``(T,)`` ``1 / replicas`` of each tensor, on the plan's device in
            its accumulation dtype; ``None`` when every piece is held by one rank.
        norm_weights: ``weights`` of the tensors whose L2 norms a step packs, in
            their order (all of them unless the plan says otherwise, `measuring`).
        num_sharded: how many of the tensors are ``DTensor`` s.
        split_dims: per tensor, the dims split across ranks (see `gradclip.core.rule.Shards`).
        split_rows: per tensor split on dim 0 and another dim, the rows this rank
            holds (`gradclip.core.split_rows`); ``None`` for the others.
        rank: this rank's index in ``group``.
        device: where the norms live (the plan's device).
        dtype: their accumulation dtype.
    """

    group: ProcessGroup | None
    group_size: int
    weights: torch.Tensor | None
    num_sharded: int
    split_dims: list[tuple[int, ...]]
    rank: int
    device: torch.device
    dtype: torch.dtype
    split_rows: list[SplitRows | None] = field(default_factory=list)
    norm_weights: torch.Tensor | None = None

    def measuring(self, positions: torch.Tensor, count: int) -> None:
        """Steps pack the L2 norms of the tensors at ``positions`` only (of ``count``).

        Layers whose rules read no L2 norm (AGC, element-wise, ``None``) are not
        measured, so the norms' vector is shorter than ``weights`` (once per plan).
        """
        if self.weights is not None and len(positions) != count:
            self.norm_weights = self.weights.index_select(0, positions)

    def group_shards(self, positions: Sequence[int]) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        """``(weights, split_dims)`` of the tensors at ``positions`` (once per plan)."""
        if self.weights is None:
            weights = torch.ones(len(positions), dtype=self.dtype, device=self.device)
        else:
            index = torch.tensor(list(positions), dtype=torch.long, device=self.device)
            weights = self.weights.index_select(0, index)
        return weights, [self.split_dims[p] for p in positions]

    def local(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The rank-local pieces of ``tensors`` (plain tensors pass through)."""
        return local_tensors(tensors)

    def pack(
        self, norms: torch.Tensor | None, extras: Sequence[CrossRank], capacity: Capacity
    ) -> torch.Tensor:
        """This rank's part of the step's collective: ``capacity.size(group_size)`` floats.

        ``[w·n² (T) | every extra's sums (S) | (world, M) maxima slots]``, each
        block zero-padded to its capacity, in the accumulation dtype (float64 on
        CPU and CUDA, so squaring cannot overflow). This rank fills only its own
        row of the slots, so after the sum each row holds one rank's maxima
        exactly (``x + 0 = x``, inf and NaN included) and their maximum is taken
        locally. The length depends on ``capacity`` alone, never on this rank's
        gradients: ranks that disagree on them still send vectors of one size.

        Args:
            norms: ``(T,)`` local L2 norms, or ``None`` when the step measures none.
            extras: the strategies' local `CrossRank` s.
            capacity: the sizes of the blocks (at least what is packed).

        Raises:
            ValueError: more values than ``capacity`` holds (nothing is sent then).
        """

        def flat(t: torch.Tensor | None) -> torch.Tensor:
            if t is None:
                return torch.zeros(0, dtype=self.dtype, device=self.device)
            return t.reshape(-1).to(self.device, self.dtype)

        squares = flat(None) if norms is None else norms.square()
        if norms is not None and self.norm_weights is not None:
            squares.mul_(self.norm_weights)
        sums = [flat(e.sums) for e in extras]
        maxima = [flat(e.maxima) for e in extras]
        used = Capacity(
            squares.numel(), sum(x.numel() for x in sums), sum(x.numel() for x in maxima)
        )
        if not used.fits(capacity):
            raise ValueError(
                f"the step's quantities {used} exceed the collective's capacity {capacity}, "
                "which is sized from every parameter having a gradient: a rule's cross_rank() "
                "returns more values for fewer gradients"
            )
        vector = torch.zeros(capacity.size(self.group_size), dtype=self.dtype, device=self.device)
        vector[: used.norms] = squares
        head = capacity.norms
        if sums:
            vector[head : head + used.sums] = torch.cat(sums)
        if used.maxima:
            slots = vector[head + capacity.sums :].view(self.group_size, capacity.maxima)
            slots[self.rank, : used.maxima] = torch.cat(maxima)
        return vector

    def unpack(
        self,
        vector: torch.Tensor,
        norms: torch.Tensor | None,
        extras: Sequence[CrossRank],
        capacity: Capacity,
    ) -> tuple[torch.Tensor | None, list[CrossRank]]:
        """The global quantities from the reduced `pack` ed vector.

        Only meaningful when every rank packed the same layout (the same plan):
        the caller checks that first (`gradclip.core.collective`).

        Returns:
            The global L2 norms (``None`` if ``norms`` was) and, for each extra, a
            `CrossRank` of its reduced values (``local`` passed through).
        """
        reduced_norms = None if norms is None else vector[: norms.numel()].sqrt()
        sums = vector[capacity.norms : capacity.norms + capacity.sums]
        slots = vector[capacity.norms + capacity.sums :].view(self.group_size, capacity.maxima)
        best = slots.amax(dim=0)
        out = []
        s_off = m_off = 0
        for e in extras:
            reduced = CrossRank(local=e.local)
            if e.sums is not None:
                n = e.sums.numel()
                reduced.sums = sums[s_off : s_off + n].view(e.sums.shape)
                s_off += n
            if e.maxima is not None:
                n = e.maxima.numel()
                reduced.maxima = best[m_off : m_off + n].view(e.maxima.shape)
                m_off += n
            out.append(reduced)
        return reduced_norms, out

    def reduce(
        self, norms: torch.Tensor | None, extras: Sequence[CrossRank]
    ) -> tuple[torch.Tensor | None, list[CrossRank]]:
        """Global norms and strategies' quantities, with one ``all_reduce`` for all of them.

        `pack` with a capacity of exactly what is packed, ``all_reduce(SUM)``,
        `unpack`: ``T + S`` floats, plus ``world_size`` per maximum. The
        collective is enqueued like any other (asynchronous on NCCL); nothing is
        read to the host. Used where the ranks' agreement is not checked (see
        `gradclip.core.collective` for the step of a sharded model).

        Args:
            norms: ``(T,)`` local L2 norms, or ``None`` when the step measures none.
            extras: the strategies' local `CrossRank` s.

        Returns:
            The global norms (``None`` if ``norms`` was) and, for each extra, a
            `CrossRank` of its reduced values, on the plan's device.
        """
        import torch.distributed as dist

        capacity = Capacity.of(norms, extras)
        vector = self.pack(norms, extras, capacity)
        dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=self.group)  # the step's one collective
        return self.unpack(vector, norms, extras, capacity)


@dataclass(frozen=True)
class Capacity:
    """Sizes of the blocks of a step's collective: norms, sums, maxima per rank.

    Examples:
        >>> c = Capacity(norms=4, sums=2, maxima=3)
        >>> c.size(world=2)                 # 4 + 2 + 2 * 3
        12
        >>> Capacity(4, 1, 0).fits(c), Capacity(5, 0, 0).fits(c)
        (True, False)
    """

    norms: int = 0
    sums: int = 0
    maxima: int = 0

    def size(self, world: int) -> int:
        """Floats sent by each rank."""
        return self.norms + self.sums + world * self.maxima

    def fits(self, other: Capacity) -> bool:
        """Whether every block of this one fits in ``other`` 's."""
        return self.norms <= other.norms and self.sums <= other.sums and self.maxima <= other.maxima

    @staticmethod
    def of(norms: torch.Tensor | None, extras: Sequence[CrossRank]) -> Capacity:
        """Exactly what ``norms`` and ``extras`` take."""

        def numel(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.numel()

        return Capacity(
            numel(norms), sum(numel(e.sums) for e in extras), sum(numel(e.maxima) for e in extras)
        )


def _replicas(mesh: Any, placements: Sequence[Any], name: str) -> int:
    replicas = 1
    for dim, placement in enumerate(placements):
        if placement.is_partial():
            raise ValueError(
                f"gradient of {name!r} is a DTensor with a Partial placement {placement}: its "
                "local values are partial sums, not a piece of the gradient, so its norm cannot "
                "be measured locally. Reduce it first (FSDP2 and DDP do so in backward), e.g. "
                "grad.redistribute(placements=[Replicate()] * mesh.ndim)."
            )
        if placement.is_replicate():
            replicas *= mesh.size(dim)
    return replicas


def sharding_of(
    names: Sequence[str],
    grads: Sequence[torch.Tensor | None],
    device: torch.device,
    dtype: torch.dtype,
) -> Sharding | None:
    """Describe the sharding of one plan's gradients, or ``None`` if none is a ``DTensor``.

    Every rank must build the same plan (the same tensors, in the same order):
    the reduced vector is indexed by tensor. A model's steps check it in the
    collective itself (`gradclip.core.collective`). Plain tensors among ``DTensor`` s are
    taken to be replicated on every rank of the group (identical values, as after
    DDP's all-reduce) and weighted ``1 / group_size``.

    Args:
        names: qualified name of each gradient, for error messages.
        grads: the gradients, in the plan's order.
        device: where the norms live.
        dtype: their accumulation dtype.

    Returns:
        A `Sharding`, or ``None`` for a step without ``DTensor`` gradients.

    Raises:
        ValueError: a ``DTensor`` gradient with a ``Partial`` placement.
        NotImplementedError: meshes that neither nest nor are slices of one world
            mesh (see `gradclip.core.mesh_group.reduction_group`).

    The reduction runs over the ranks of the gradients' mesh (a sub-mesh of any
    number of dims gets one process group of its ranks, made once). Gradients on
    several meshes (expert parallel: the experts on an EP mesh, the rest on the
    data-parallel one) are reduced over the largest mesh when the others lie
    inside it, else over every rank of the job; a mesh of ``k`` ranks is then one
    of ``n / k`` slices of the ``n`` ranks reduced over, the slices holding the
    same gradients (replicated there, as data parallel leaves them): a piece is
    weighted ``1 / (replicas · n / k)``.
    """
    cls = _dtensor_type()
    if cls is None or not any(isinstance(g, cls) for g in grads):
        return None
    meshes: list[Any] = []  # the distinct meshes, in order of first use
    replicas: list[int | None] = []
    mesh_of: list[int | None] = []
    for name, grad in zip(names, grads):
        if not isinstance(grad, cls):
            replicas.append(None)
            mesh_of.append(None)
            continue
        dgrad: Any = grad
        grad_mesh: Any = dgrad.device_mesh
        if grad_mesh not in meshes:
            meshes.append(grad_mesh)
        mesh_of.append(meshes.index(grad_mesh))
        replicas.append(_replicas(grad_mesh, dgrad.placements, name))
    import torch.distributed as dist

    reduction = reduction_group(meshes, [names[mesh_of.index(m)] for m in range(len(meshes))])
    group, group_size = reduction.group, reduction.size
    counts = [
        group_size if r is None else r * reduction.copies[m]  # type: ignore[index]
        for r, m in zip(replicas, mesh_of)
    ]
    weights = None
    if any(c != 1 for c in counts):
        weights = torch.tensor([1.0 / c for c in counts], dtype=dtype, device=device)
    num_sharded = sum(1 for r in replicas if r is not None)
    split_dims = [_split_dims(g) if isinstance(g, cls) else () for g in grads]
    rows = [split_rows_of(g, d, device) if d else None for g, d in zip(grads, split_dims)]
    rank = dist.get_rank(group)
    return Sharding(
        group, group_size, weights, num_sharded, split_dims, rank, device, dtype, rows, weights
    )


def _split_dims(grad: Any) -> tuple[int, ...]:
    ndim = max(grad.dim(), 1)
    dims = {p.dim % ndim for p in grad.placements if p.is_shard()}
    return tuple(sorted(dims))
