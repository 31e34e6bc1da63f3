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
size, plus the few quantities strategies declare (`CrossRank`).
Element-wise clipping and ``None`` measure nothing, so a step with only those
modes sends nothing. Under DDP gradients are plain tensors, already
averaged (identical on every rank): the engine needs no communication at all and
never calls into this module's collective.

Everything here that looks at placements runs once per `Plan`
(when the set of gradients changes); a model without ``DTensor`` gradients pays
one ``sys.modules`` lookup per plan and nothing per step.

Example:
    >>> from torch.distributed.fsdp import fully_shard
    >>> for block in model.blocks:
    ...     fully_shard(block)
    >>> fully_shard(model)
    >>> normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1.0)  # after fully_shard
    >>> loss.backward()
    >>> normalizer.apply()            # one all_reduce of len(parameters) floats

References:
    Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data
    Parallel", VLDB 2023 (sharding on dim 0, hybrid sharding).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gradclip.core.rule import CrossRank

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "Sharding",
    "is_dtensor",
    "local_tensor",
    "local_tensors",
    "p_norm_parts",
    "p_norms_from",
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

    Example:
        >>> g = local_tensor(param.grad)   # e.g. rows 0..k of a Shard(0) gradient
        >>> g.mul_(0.5)                     # scales param.grad's piece on this rank
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


@dataclass(eq=False)
class Sharding:
    """How the local norms of one plan's tensors become global norms.

    Built once per plan by `sharding_of`; every step the engine calls
    `local` on the gradients and `reduce` (or `reduce_norms`,
    when no strategy declared `CrossRank` quantities) on the measured norms.

    Attributes:
        group: the process group of the reduction (``None``: the default group).
        group_size: its number of ranks.
        weights: ``(T,)`` ``1 / replicas`` of each tensor, on the plan's device in
            its accumulation dtype; ``None`` when every piece is held by one rank.
        num_sharded: how many of the tensors are ``DTensor`` s.
        split_dims: per tensor, the dims split across ranks (see `gradclip.core.rule.Shards`).
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

    def reduce_norms(self, norms: torch.Tensor) -> torch.Tensor:
        """Global L2 norms from ``(T,)`` local ones, with one ``all_reduce``.

        ``sqrt(Σ_ranks w_i · n_i²)``; NaN entries (tensors not measured) stay NaN.
        The collective is enqueued like any other (asynchronous on NCCL); nothing
        is read to the host.

        Args:
            norms: ``(T,)`` L2 norms of the local pieces, in the accumulation dtype
                (float64 on CPU and CUDA, so squaring cannot overflow).

        Returns:
            ``(T,)`` L2 norms of the full tensors, the same on every rank.
        """
        import torch.distributed as dist

        squares = norms.square()
        if self.weights is not None:
            squares.mul_(self.weights)
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=self.group)
        return squares.sqrt_()

    def reduce(
        self, norms: torch.Tensor | None, extras: Sequence[CrossRank]
    ) -> tuple[torch.Tensor | None, list[CrossRank]]:
        """Global norms and strategies' quantities, with one ``all_reduce`` for all of them.

        The vector sent is ``[w·n² (T) | every extra's sums | (world, M) maxima
        slots]`` in the accumulation dtype (float64 on CPU and CUDA). This rank
        fills only its own row of the slots, so after the sum each row holds one
        rank's maxima exactly and their maximum is taken locally. Without maxima
        the vector is ``T + S`` floats; each maximum adds ``world_size`` floats.

        Args:
            norms: ``(T,)`` local L2 norms, or ``None`` when the step measures none.
            extras: the strategies' local `CrossRank` s.

        Returns:
            The global norms (``None`` if ``norms`` was) and, for each extra, a
            `CrossRank` of its reduced values, on the plan's device.
        """
        if not extras:
            return (None if norms is None else self.reduce_norms(norms)), []
        import torch.distributed as dist

        def flat(t: torch.Tensor | None) -> torch.Tensor:
            if t is None:
                return torch.zeros(0, dtype=self.dtype, device=self.device)
            return t.reshape(-1).to(self.device, self.dtype)

        parts: list[torch.Tensor] = []
        if norms is not None:
            squares = norms.square()
            if self.weights is not None:
                squares.mul_(self.weights)
            parts.append(squares)
        sums = [flat(e.sums) for e in extras]
        maxima = [flat(e.maxima) for e in extras]
        parts += sums
        num_max = sum(m.numel() for m in maxima)
        if num_max:
            slots = torch.zeros(self.group_size, num_max, dtype=self.dtype, device=self.device)
            slots[self.rank] = torch.cat(maxima)
            parts.append(slots.reshape(-1))
        vector = torch.cat(parts)
        dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=self.group)  # the step's one collective
        head = 0 if norms is None else norms.numel()
        reduced_norms = None if norms is None else vector[:head].sqrt()
        summed = vector[head : head + sum(s.numel() for s in sums)]
        best = vector[vector.numel() - self.group_size * num_max :]
        best = best.view(self.group_size, num_max).amax(dim=0)
        out = []
        s_off = m_off = 0
        for e, s, m in zip(extras, sums, maxima):
            reduced = CrossRank(local=e.local)
            if e.sums is not None:
                reduced.sums = summed[s_off : s_off + s.numel()].view(e.sums.shape)
            if e.maxima is not None:
                reduced.maxima = best[m_off : m_off + m.numel()].view(e.maxima.shape)
            s_off += s.numel()
            m_off += m.numel()
            out.append(reduced)
        return reduced_norms, out


def p_norm_parts(norms: torch.Tensor, norm_type: float, weights: torch.Tensor) -> CrossRank:
    """This rank's part of per-tensor p-norms: ``w·‖g_local‖_p^p`` summed, or ``max|g|`` maximized.

    ``weights`` are ``1 / replicas`` of each piece, so a replicated piece is
    counted once; a maximum needs no weight.
    """
    if math.isinf(norm_type):
        return CrossRank(maxima=norms)
    return CrossRank(sums=norms.pow(norm_type).mul_(weights))


def p_norms_from(reduced: CrossRank, norm_type: float) -> torch.Tensor:
    """The full tensors' p-norms from the reduced `p_norm_parts`."""
    if math.isinf(norm_type):
        assert reduced.maxima is not None
        return reduced.maxima
    assert reduced.sums is not None
    return reduced.sums.pow(1.0 / norm_type)


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


def _reduction_group(mesh: Any) -> tuple[ProcessGroup | None, int]:
    import torch.distributed as dist

    world = dist.get_world_size()
    if mesh.size() == world:
        return None, world  # the mesh holds every rank: the default group is the mesh
    if mesh.ndim == 1:
        return mesh.get_group(0), mesh.size()
    raise NotImplementedError(
        f"gradients are DTensors on a {mesh.ndim}-D device mesh of {mesh.size()} ranks, a "
        f"subset of the {world} ranks of the default group; gradclip reduces over the whole "
        "mesh with one collective and supports a 1-D sub-mesh or a mesh of every rank. Normalize "
        "each mesh's parameters with their own GradientNormalizer built on a 1-D mesh, or open "
        "an issue with your setup."
    )


def sharding_of(
    names: Sequence[str],
    grads: Sequence[torch.Tensor | None],
    device: torch.device,
    dtype: torch.dtype,
) -> Sharding | None:
    """Describe the sharding of one plan's gradients, or ``None`` if none is a ``DTensor``.

    Every rank must build the same plan (the same tensors, in the same order):
    the reduced vector is indexed by tensor. Plain tensors among ``DTensor`` s are
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
        ValueError: a ``DTensor`` gradient with a ``Partial`` placement, or gradients
            on different device meshes.
        NotImplementedError: a multi-dimensional mesh that is a strict subset of
            the default group.
    """
    cls = _dtensor_type()
    if cls is None or not any(isinstance(g, cls) for g in grads):
        return None
    mesh: Any = None
    mesh_owner = ""
    replicas: list[int | None] = []
    for name, grad in zip(names, grads):
        if not isinstance(grad, cls):
            replicas.append(None)
            continue
        dgrad: Any = grad
        grad_mesh: Any = dgrad.device_mesh
        if mesh is None:
            mesh, mesh_owner = grad_mesh, name
        elif grad_mesh != mesh:
            raise ValueError(
                f"gradients live on different device meshes: {mesh_owner!r} on {mesh} and "
                f"{name!r} on {grad_mesh}. gradclip reduces all norms with one collective over "
                "one mesh; normalize each mesh's parameters with their own GradientNormalizer "
                "(a custom grouping)."
            )
        replicas.append(_replicas(grad_mesh, dgrad.placements, name))
    import torch.distributed as dist

    group, group_size = _reduction_group(mesh)
    counts = [group_size if r is None else r for r in replicas]
    weights = None
    if any(c != 1 for c in counts):
        weights = torch.tensor([1.0 / c for c in counts], dtype=dtype, device=device)
    num_sharded = sum(1 for r in replicas if r is not None)
    split_dims = [_split_dims(g) if isinstance(g, cls) else () for g in grads]
    rank = dist.get_rank(group)
    return Sharding(group, group_size, weights, num_sharded, split_dims, rank, device, dtype)


def _split_dims(grad: Any) -> tuple[int, ...]:
    ndim = max(grad.dim(), 1)
    dims = {p.dim % ndim for p in grad.placements if p.is_shard()}
    return tuple(sorted(dims))
