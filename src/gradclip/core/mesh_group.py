"""The ranks a sharded step reduces over: one group for the device meshes of the gradients.

A sharded step sums its per-tensor norms over the ranks that hold pieces of the
gradients (`gradclip.core.sharding`). Which ranks those are follows from the
gradients' device meshes:

* one mesh of every rank: the default group;
* a 1-D sub-mesh (the data-parallel ranks of a pipeline stage): the mesh's own group;
* a 2-D or larger sub-mesh (a pipeline stage under HSDP, or FSDP2 with tensor
  parallel): one process group of the mesh's ranks, created once per set of
  ranks by those ranks alone (``new_group(..., use_local_synchronization=True)``),
  so that the other stages need not take part;
* several meshes (expert parallel: the experts on an EP mesh, the rest on the
  data-parallel one): the group of the largest, when every other mesh's ranks
  lie inside it; a mesh of ``k`` ranks inside one of ``n`` is then taken to be
  one of ``n / k`` slices holding the same gradients (replicated across the
  slices, as data parallel leaves them), so its pieces are weighted by
  ``k / n``. Meshes that do not nest are reduced over every rank of the job
  (each then a slice of one world mesh).

Everything here runs when an engine is built and once per plan, never per step;
a group is made once per process and set of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["MeshGroup", "mesh_ranks", "reduction_group"]

# (the default group, the ranks) -> the group made for them: made once per process
_MADE: dict[tuple[int, tuple[int, ...]], tuple[Any, ProcessGroup]] = {}


def mesh_ranks(mesh: Any) -> tuple[int, ...]:
    """The global ranks of this rank's slice of ``mesh``, sorted."""
    return tuple(sorted(int(r) for r in mesh.mesh.flatten().tolist()))


def _group_of_ranks(ranks: tuple[int, ...]) -> ProcessGroup:
    """A process group of ``ranks``, made by those ranks alone, once per process."""
    import torch.distributed as dist

    default = dist.group.WORLD
    key = (id(default), ranks)
    made = _MADE.get(key)
    if made is not None and made[0] is default:
        return made[1]
    # only the members take part: the other stages make their own groups, or none
    group: ProcessGroup | None = dist.new_group(list(ranks), use_local_synchronization=True)
    assert group is not None
    _MADE[key] = (default, group)
    return group


def _group_of_mesh(mesh: Any, world: int) -> ProcessGroup | None:
    if mesh.size() == world:
        return None  # the mesh holds every rank: the default group is the mesh
    if mesh.ndim == 1:
        return mesh.get_group(0)  # type: ignore[no-any-return]
    return _group_of_ranks(mesh_ranks(mesh))


class MeshGroup:
    """The reduction group of a set of meshes, and how many copies each mesh has in it.

    Attributes:
        group: the process group (``None``: the default group).
        size: its number of ranks.
        copies: per mesh, in the order given, how many slices of the group hold
            the same gradients as it (1 for a single mesh).
    """

    def __init__(self, group: ProcessGroup | None, size: int, copies: list[int]) -> None:
        self.group = group
        self.size = size
        self.copies = copies


def reduction_group(meshes: Sequence[Any], names: Sequence[str] = ()) -> MeshGroup:
    """The `MeshGroup` of gradients on ``meshes`` (distinct, in order of first use).

    Args:
        meshes: the gradients' device meshes, at least one.
        names: per mesh, a parameter on it, for error messages.

    Raises:
        NotImplementedError: meshes that neither nest nor divide the job's ranks.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    if len(meshes) == 1:
        return MeshGroup(_group_of_mesh(meshes[0], world), int(meshes[0].size()), [1])
    sizes = [int(m.size()) for m in meshes]
    largest = max(range(len(meshes)), key=lambda i: sizes[i])
    outer = set(mesh_ranks(meshes[largest]))
    if all(set(mesh_ranks(m)) <= outer and sizes[largest] % n == 0 for m, n in zip(meshes, sizes)):
        group = _group_of_mesh(meshes[largest], world)
        return MeshGroup(group, sizes[largest], [sizes[largest] // n for n in sizes])
    for i, n in enumerate(sizes):
        if world % n:
            name = names[i] if i < len(names) else f"mesh {i}"
            raise NotImplementedError(
                f"{name!r} is on a device mesh of {n} ranks, which does not divide the "
                f"{world} ranks of the job nor lies inside the largest mesh of its model: with "
                "parameters on several meshes (expert parallel) gradclip reduces over the "
                "largest mesh, or over every rank, and needs each mesh to be a slice of it"
            )
    return MeshGroup(None, world, [world // n for n in sizes])
