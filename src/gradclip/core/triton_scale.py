"""One Triton launch multiplying every tensor of a (device, dtype) run by its own coefficient.

``torch._foreach_mul_(tensors, list_of_0d_coefficients)`` leaves PyTorch's
multi-tensor fast path on CUDA (a 0-d coefficient does not share its gradient's
sizes, a float32 one not a half gradient's dtype) and launches one kernel per
tensor. The kernel here reads tensor ``i``'s coefficient ``c[i]`` on the device
and covers any number of tensors in one launch::

    program p ──► block_tensor[p], block_chunk[p] ──► tensor t, elements
    [chunk * CHUNK, chunk * CHUNK + CHUNK)  ──►  x = x * c[t]   (in place)

It addresses the tensors through a table of their ``data_ptr()`` s, as apex's
``multi_tensor_apply`` and Triton's grouped GEMM do. The table (pointers,
element counts, coefficient indices, block → tensor and block → chunk maps) is
built on the host when the tensors' data pointers, sizes or layouts change, sent with one
non-blocking host → device copy from pinned memory, and reused by every step
until they change again: a steady step costs one launch and no copy.

Arithmetic: ``x`` is widened to float32 (float64 for float64 tensors), multiplied
by the coefficient rounded to that type, and rounded to nearest-even back into
the tensor's dtype, as the eager ``mul_`` by a float32 (float64) 0-d tensor
does on the CPU (on CUDA the eager ``mul_`` first rounds such a coefficient to a
float16 or bfloat16 gradient's dtype). A coefficient equal to 1 after that
rounding leaves its tensor untouched: the program loads and stores nothing.

Only dense tensors (contiguous in some order of their dimensions, without
overlap) are addressed this way; `TritonScale.scale_` returns the positions of
the others so that the caller multiplies them by other means.

This module imports Triton; `gradclip.core.kernels` imports it only for a run
that uses the kernel. Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors
through Triton's interpreter (slowly; used by the tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK", "CHUNK", "TritonScale", "compile_error", "is_dense"]

BLOCK = 1024  # elements per tile of a program
CHUNK = 16 * BLOCK  # elements per program: 64 KiB of float32

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@triton.jit  # type: ignore[untyped-decorator]
def _scale_kernel(  # type: ignore[no-untyped-def]
    meta_ptr,  # int64: ptrs (k), numels (k), coefficient index (k), block tensor (nb), chunk (nb)
    c_ptr,  # the coefficients, any float dtype
    c_start,  # index of this run's first coefficient
    c_stride,
    k,  # tensors addressed by the table
    DTYPE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    nb = tl.num_programs(0)
    t = tl.load(meta_ptr + 3 * k + pid)
    chunk = tl.load(meta_ptr + 3 * k + nb + pid)
    x_ptr = tl.load(meta_ptr + t).to(tl.pointer_type(DTYPE))
    n = tl.load(meta_ptr + k + t)
    ci = tl.load(meta_ptr + 2 * k + t)
    c = tl.load(c_ptr + (c_start + ci) * c_stride).to(COMPUTE)
    start = chunk * CHUNK
    # a coefficient of exactly 1 changes nothing: its programs touch no memory
    stop = tl.where(c != 1.0, tl.minimum(n - start, CHUNK), 0)
    for offset in range(0, stop, BLOCK):
        offsets = start + offset + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        tl.store(x_ptr + offsets, (x.to(COMPUTE) * c).to(DTYPE), mask=mask)


_compiled: dict[tuple[torch.device, torch.dtype], str | None] = {}


def compile_error(device: torch.device, dtype: torch.dtype) -> str | None:
    """Compile the kernel for ``device`` and ``dtype`` without launching it: the error, or None.

    Once per process and (device, dtype): called when a plan is built, so that a
    kernel that cannot be built here is found before any gradient is touched. On
    CPU tensors (Triton's interpreter) there is nothing to compile.
    """
    key = (device, dtype)
    if key not in _compiled:
        try:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    table = torch.zeros(5, dtype=torch.int64, device=device)
                    c = torch.ones(1, dtype=torch.float64, device=device)
                    _scale_kernel.warmup(
                        table,
                        c,
                        0,
                        1,
                        1,
                        DTYPE=_TL_DTYPES[dtype],
                        COMPUTE=tl.float64 if dtype == torch.float64 else tl.float32,
                        BLOCK=BLOCK,
                        CHUNK=CHUNK,
                        num_warps=4,
                        grid=(1,),
                    )
            _compiled[key] = None
        except Exception as error:  # any failure of the toolchain: reported, not raised
            _compiled[key] = f"{type(error).__name__}: {error}"
    return _compiled[key]


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``[data_ptr, data_ptr + numel)`` exactly once.

    True for contiguous tensors in any order of their dimensions (row-major,
    transposed, channels-last); false for overlapping (expanded) or gapped
    (sliced) views. Strides are never negative in PyTorch, so ``data_ptr()`` is
    the lowest address of a dense tensor.
    """
    if t.is_contiguous():
        return True
    dims = sorted((stride, size) for stride, size in zip(t.stride(), t.shape) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


_nothing = contextlib.nullcontext()


class TritonScale:
    """The kernel and its cached table for one (device, dtype) run of tensors.

    Args:
        device: the run's device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        dtype: the run's dtype: float32, float16, bfloat16 or float64.

    Examples:
        >>> import os
        >>> cpu = torch.device("cpu")  # on the CPU through Triton's interpreter only
        >>> if os.environ.get("TRITON_INTERPRET") == "1":
        ...     xs = [torch.ones(3), torch.ones(2, 2).t(), torch.ones(4)[::2]]
        ...     rest = TritonScale(cpu, torch.float32).scale_(xs, torch.tensor([0.5, 2.0, 3.0]), 0)
        ...     assert rest == (2,)  # not dense: left to the caller
        ...     assert xs[0].tolist() == [0.5] * 3 and xs[1].sum() == 8 and xs[2].sum() == 2
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        if dtype not in _TL_DTYPES:
            raise TypeError(f"no multi-tensor scaling kernel for {dtype}")
        self.device = device
        self.dtype = dtype
        self._tl_dtype = _TL_DTYPES[dtype]
        self._compute = tl.float64 if dtype == torch.float64 else tl.float32
        #: times the table was (re)built: once, plus once per change of the data pointers
        self.refreshes = 0
        self._ptrs: tuple[int, ...] | None = None
        self._numels: tuple[int, ...] = ()
        self._contiguous: tuple[bool, ...] = ()
        self._strided: tuple[int, ...] = ()  # dense but not contiguous: strides re-checked
        self._strides: tuple[tuple[int, ...], ...] = ()
        self._meta: torch.Tensor | None = None
        self._host: torch.Tensor | None = None  # pinned source of the last copy, kept alive
        self._k = 0
        self._blocks = 0
        self.rest: tuple[int, ...] = ()

    def scale_(
        self, tensors: Sequence[torch.Tensor], c: torch.Tensor, start: int
    ) -> tuple[int, ...]:
        """``tensors[i] *= c[start + i]`` for every dense tensor, in one launch.

        Args:
            tensors: the run's tensors, on ``device`` in ``dtype``.
            c: coefficients on ``device`` (any float dtype, any 1-d stride).
            start: the index in ``c`` of the first tensor's coefficient.

        Returns:
            The positions in ``tensors`` of the non-empty tensors that are not
            dense, which this call left unchanged.
        """
        self._refresh_if_changed(tensors)
        if not self._blocks:
            return self.rest
        # Triton launches on the current device: make it the tensors'
        guard = torch.cuda.device(self.device) if self.device.type == "cuda" else _nothing
        with guard:
            _scale_kernel[(self._blocks,)](
                self._meta,
                c,
                start,
                c.stride(0),
                self._k,
                DTYPE=self._tl_dtype,
                COMPUTE=self._compute,
                BLOCK=BLOCK,
                CHUNK=CHUNK,
                num_warps=4,
            )
        return self.rest

    # -- the table -----------------------------------------------------------------------
    def _refresh_if_changed(self, tensors: Sequence[torch.Tensor]) -> None:
        # The cheap test every step: the data pointers, element counts and
        # contiguity of the tensors (~0.1 us each), and the strides of those few
        # that are dense without being contiguous. Any change rebuilds the table:
        # a stale one would write outside a tensor.
        ptrs = tuple(map(torch.Tensor.data_ptr, tensors))
        numels = tuple(map(torch.Tensor.numel, tensors))
        contiguous = tuple(map(torch.Tensor.is_contiguous, tensors))
        if (
            ptrs == self._ptrs
            and numels == self._numels
            and contiguous == self._contiguous
            and all(tensors[i].stride() == s for i, s in zip(self._strided, self._strides))
        ):
            return
        self._build(tensors, ptrs, numels, contiguous)

    def _build(
        self,
        tensors: Sequence[torch.Tensor],
        ptrs: tuple[int, ...],
        numels: tuple[int, ...],
        contiguous: tuple[bool, ...],
    ) -> None:
        dense = [c or is_dense(t) for t, c in zip(tensors, contiguous)]
        chosen = [i for i, n in enumerate(numels) if n and dense[i]]
        counts = [-(-numels[i] // CHUNK) for i in chosen]
        block_tensor: list[int] = []
        block_chunk: list[int] = []
        for j, count in enumerate(counts):
            block_tensor += [j] * count
            block_chunk += range(count)
        table = (
            [ptrs[i] for i in chosen]
            + [numels[i] for i in chosen]
            + chosen
            + block_tensor
            + block_chunk
        )
        cuda = self.device.type == "cuda"
        host = torch.tensor(table, dtype=torch.int64, pin_memory=cuda)
        # one copy, queued on the current stream: no host sync; the pinned source
        # is kept until the next rebuild (the host allocator also waits for the copy)
        self._meta = host.to(self.device, non_blocking=True) if cuda else host
        self._host = host if cuda else None
        self._k = len(chosen)
        self._blocks = len(block_tensor)
        self.rest = tuple(i for i, n in enumerate(numels) if n and not dense[i])
        self._ptrs, self._numels, self._contiguous = ptrs, numels, contiguous
        self._strided = tuple(i for i in chosen if not contiguous[i])
        self._strides = tuple(tensors[i].stride() for i in self._strided)
        self.refreshes += 1
