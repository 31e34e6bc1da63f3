"""Norms of large CPU tensors by rows: float64-exact combination, at about the cost of one read.

PyTorch's CPU norm kernels (``vector_norm``, ``_foreach_norm``) sum a whole
tensor into a few float32 accumulators, so their relative error grows with the
tensor's size: about 1e-6 at 2^18 float32 values and 3e-3 at 4·10^7, and half
precision reaches 1e-6 already at 2^13 values. Their reduction along the last
dimension of a 2-D view, one short row per output, is both accurate (a row of
``C`` values carries an error of order ``C·eps``) and fast (the inner loop is the
vectorized one). So a tensor of ``n >= LARGE_VALUES`` values is measured as

    ‖g‖_p = ( Σ_rows ‖row‖_p^p )^(1/p),   rows of C values, combined in float64,

with ``C = row_width(dtype, p)`` values per row; a last partial row is measured
on its own. The relative error is then that of one row, whatever ``n`` is. Its
worst case is constant data, where every rounding of a row's sum goes the same
way: PyTorch's row kernel adds ``C / 16`` squares one after the other in each
of 16 float32 lanes, which over 10^5 constants reaches 1.05e-6 for rows of 1024
values and 8.2e-7 for rows of 768, the width used (uniform data: ~1e-8). Each
row also costs a fixed ~12 ns (the kernel's sum across lanes and its square
root), so rows are no shorter than that bound needs. Sums of ``|x|^p`` other
than squares lose more per row (1024 values over many binades: 2e-6 for
``p = 1``), so their rows are four times shorter.

Half-precision rows are not reduced in place: PyTorch's CPU reductions that
widen bfloat16/float16 to float32 on the fly take ~30x a read, and its fast
bfloat16 row norm rounds each row's norm to bfloat16 (2^-9). They are widened
instead chunk by chunk (``HALF_CHUNK`` values) into one float32 scratch buffer
that stays in cache, then reduced like float32: a widening copy and a float32
norm, each about as long as a read, so half precision costs ~3 reads. That is
one op pair per chunk: the number of launches grows with the bytes of
half-precision tensors, never with the number of layers.

On CUDA, and under ``torch.compile``, none of this is used: their reductions are
trees (accurate), and there the number of launches matters.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["HALF_CHUNK", "LARGE_VALUES", "ROW_VALUES", "RowNorms", "by_rows", "row_width"]

#: From this many values a CPU tensor is measured by rows.
LARGE_VALUES = 1 << 12
#: Values per row of an L2 norm: short enough that a row's float32 sum of squares
#: stays within 1e-6 relative error even for constant data (8.2e-7).
ROW_VALUES = {
    torch.float32: 768,
    torch.float64: 4096,
    torch.bfloat16: 768,  # widened to float32 first: the same rows as float32
    torch.float16: 768,
}
#: Values of a half-precision tensor widened to float32 at once (4 MiB of scratch),
#: rounded down to whole rows.
HALF_CHUNK = 1 << 20
_HALF = (torch.bfloat16, torch.float16)


def by_rows(device: torch.device, dtype: torch.dtype, numel: int) -> bool:
    """Whether a tensor of this device, dtype and size is measured by rows.

    Examples:
        >>> by_rows(torch.device("cpu"), torch.float32, 1 << 20)
        True
        >>> by_rows(torch.device("cpu"), torch.float32, 100)
        False
    """
    return device.type == "cpu" and dtype in ROW_VALUES and numel >= LARGE_VALUES


def row_width(dtype: torch.dtype, p: float) -> int:
    """Values per row for a p-norm of this dtype (`ROW_VALUES`, a quarter of it for ``p != 2``).

    Examples:
        >>> row_width(torch.float32, 2.0), row_width(torch.float32, 1.0)
        (768, 192)
    """
    width = ROW_VALUES[dtype]
    return width if p == 2.0 or dtype == torch.float64 else width // 4


def _row_count(dtype: torch.dtype, width: int, numel: int) -> int:
    """Rows a tensor fills in the row buffer (a partial row counts as one)."""
    if dtype in _HALF:
        full, rest = divmod(numel, _chunk(width))
        return full * (_chunk(width) // width) + math.ceil(rest / width)
    return math.ceil(numel / (_exact_width(numel, width) or width))


def _chunk(width: int) -> int:
    """Values of a half-precision tensor widened at once: whole rows of ``width``."""
    return HALF_CHUNK // width * width


def _exact_width(numel: int, width: int) -> int:
    """The largest row length in ``[width / 4, width]`` dividing ``numel``, or 0.

    Rows that divide a tensor exactly make it one ``(rows, width)`` view and one
    reduction, without a last partial row reduced apart.
    """
    for w in range(width, width // 4 - 1, -1):
        if numel % w == 0:
            return w
    return 0


def _flat(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of all of ``tensor``'s values in memory order, or ``None`` if it has none.

    A p-norm does not depend on the order of the values, so a dense tensor in
    any dimension order (transposed, channels-last) is read as it lies.
    """
    if tensor.is_contiguous():
        return tensor.view(-1)
    strides = tensor.stride()
    order = sorted(range(tensor.dim()), key=lambda d: -strides[d])
    permuted = tensor.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


@dataclass(eq=False)
class RowNorms:
    """The tensors of one CPU (dtype) run and where their rows go.

    Args:
        dtype: the run's dtype.
        numels: the size of each tensor of the run.
        width: values per row (`row_width`).

    ``small``/``large`` are run-local indices. Every tensor owns a segment of the
    row buffer, in run order: a large tensor its row norms, a small one a single
    slot for its whole norm (measured with one ``_foreach_norm`` for all of them),
    so that one segmented sum gives every tensor's norm in order.
    """

    dtype: torch.dtype
    numels: Sequence[int]
    width: int

    def __post_init__(self) -> None:
        self.large = [i for i, n in enumerate(self.numels) if n >= LARGE_VALUES]
        self.small = [i for i, n in enumerate(self.numels) if n < LARGE_VALUES]
        counts = [
            _row_count(self.dtype, self.width, n) if n >= LARGE_VALUES else 1 for n in self.numels
        ]
        starts = [0, *itertools.accumulate(counts)]
        wide = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.rows = torch.zeros(starts[-1], dtype=wide)
        # the rows' p-th powers, summed in float64 whatever the dtype
        self.powered = torch.zeros(starts[-1], dtype=torch.float64)
        self.offsets = torch.tensor(starts, dtype=torch.long)
        half = self.dtype in _HALF
        self.scratch = torch.zeros(_chunk(self.width) if half else 0, dtype=torch.float32)
        # made once: each large tensor's slice of the row buffer, and its exact row length
        self.outs = [self.rows[starts[i] : starts[i + 1]] for i in self.large]
        self.slots = [self.rows[starts[i]] for i in self.small]
        self.exact = [
            0 if self.dtype in _HALF else _exact_width(self.numels[i], self.width)
            for i in self.large
        ]

    def norms(
        self,
        tensors: list[torch.Tensor],
        p: float,
        small: tuple[torch.Tensor, ...] | list[torch.Tensor] | None,
        dtype: torch.dtype = torch.float64,
    ) -> torch.Tensor:
        """``(len(tensors),)`` p-norms in ``dtype``, ``small`` those of the small tensors (0-d).

        ``p`` is finite and positive. The rows' p-th powers are taken in their
        own precision (a relative error of 2^-24 in float32, and no overflow:
        each is about the row's own finite accumulator), and summed in float64.
        """
        for i, out, width in zip(self.large, self.outs, self.exact, strict=True):
            tensor = tensors[i]
            if width and tensor.is_contiguous():  # the usual case: one view, one reduction
                torch.linalg.vector_norm(tensor.view(-1, width), p, dim=1, out=out)
            else:
                self._rows(tensor, p, out, width or self.width)
        if small is not None:
            torch._foreach_copy_(self.slots, small)
        if p == 2.0:
            torch.mul(self.rows, self.rows, out=self.powered)
        else:
            torch.pow(self.rows, p, out=self.powered)
        # one sum per tensor (segment_reduce: ~5x faster than index_add_ on the CPU)
        sums = torch.segment_reduce(self.powered, "sum", offsets=self.offsets)
        out = torch.empty(len(self.numels), dtype=dtype)  # new each step: reports keep it
        return torch.sqrt(sums, out=out) if p == 2.0 else torch.pow(sums, 1.0 / p, out=out)

    def _rows(self, tensor: torch.Tensor, p: float, out: torch.Tensor, width: int) -> None:
        """Write the p-norms of ``tensor``'s rows of ``width`` values into ``out``."""
        flat = _flat(tensor)
        if flat is None:
            # an overlapping or sliced view (rare): its whole norm, accumulated in
            # float64 (slow, exact), in the first row
            out[0] = torch.linalg.vector_norm(tensor, p, dtype=torch.float64)
            out[1:].zero_()
            return
        if self.dtype not in _HALF:
            full = flat.numel() // width
            if full:
                torch.linalg.vector_norm(
                    flat[: full * width].view(full, width), p, dim=1, out=out[:full]
                )
            if full < out.numel():
                torch.linalg.vector_norm(flat[full * width :], p, out=out[full])
            return
        at = 0
        for chunk in torch.split(flat, self.scratch.numel()):
            n = chunk.numel()
            rows = -(-n // width)
            scratch = self.scratch[: rows * width]
            scratch[:n].copy_(chunk)
            if rows * width > n:
                scratch[n:].zero_()  # zeros add nothing to a p-norm
            torch.linalg.vector_norm(scratch.view(rows, width), p, dim=1, out=out[at : at + rows])
            at += rows
