"""Which rows of the full tensor a rank holds, for weights split on dim 0 and another dim.

Under FSDP2 with row-wise tensor parallel a weight is split on dim 0 (FSDP) and
on dim 1 (tensor parallel): each rank holds some rows, and of each only some
columns, and different ranks hold different rows. A quantity per row (AGC's
unit norms) is then summed over ranks at the row's place in the *full* tensor:
each rank writes its rows' partial sums at their global indices of a vector as
long as the full tensor's dim 0, zeros elsewhere, and the sum over ranks holds
every row's total. The global index of each local row comes from the
gradient's own placements, applied to ``arange(rows)`` on this rank alone
(``distribute_tensor(..., src_data_rank=None)``: no communication), so strided
shards (``_StridedShard``, FSDP2 over tensor parallel) are followed exactly.
Computed once per plan.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SplitRows", "split_rows_of"]


class SplitRows:
    """The rows of the full tensor this rank holds.

    Attributes:
        index: ``(local rows,)`` int64: the global row of each local row.
        rows: the number of rows of the full tensor.
    """

    def __init__(self, index: torch.Tensor, rows: int) -> None:
        self.index = index
        self.rows = rows


def split_rows_of(grad: Any, split_dims: tuple[int, ...], device: torch.device) -> SplitRows | None:
    """The `SplitRows` of a ``DTensor`` split on dim 0 and another dim, else ``None``.

    Args:
        grad: the gradient (a ``DTensor``).
        split_dims: the dims of it split across ranks.
        device: where the index is used (the plan's device).

    ``None`` too on a torch whose ``distribute_tensor`` cannot split without
    communicating (before ``src_data_rank``): such weights are then refused by
    the rules that need their rows.
    """
    if grad.dim() < 2 or 0 not in split_dims or len(split_dims) < 2:
        return None
    from torch.distributed.tensor import Replicate, distribute_tensor

    ndim = grad.dim()
    # only the placements on dim 0 decide which rows a rank holds
    placements = [
        p if not p.is_shard() or p.dim % ndim == 0 else Replicate() for p in grad.placements
    ]
    rows = int(grad.shape[0])
    index = torch.arange(rows, dtype=torch.long, device=grad.device)
    try:
        local = distribute_tensor(index, grad.device_mesh, placements, src_data_rank=None)
    except TypeError:  # torch without src_data_rank: it would scatter, a collective
        return None
    return SplitRows(local.to_local().to(device), rows)
