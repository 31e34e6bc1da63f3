"""Grouped tensor kernels: the few launches a step is made of.

A step's tensors are split into *runs* of one device and dtype (`Runs`); each
function here issues one grouped launch per run, so the number of launches
depends on how many devices and dtypes the model mixes, never on how many
tensors or layers it has. The one deliberate exception, large tensors clamped
one by one, is explained in `clamp_abs_`.

The multiply of `Runs.scale_` has two implementations, chosen per run when the
`Runs` is built (see `kernel_path`): ``_foreach_mul_`` by 0-d coefficients
(``"foreach"``), which PyTorch runs as one loop on the CPU but as one kernel per
tensor on CUDA, and the Triton kernel of `gradclip.core.triton_scale`
(``"triton"``), one launch per run on CUDA whatever the number of tensors.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING

import torch

from gradclip.core.row_norms import RowNorms, by_rows, row_width

if TYPE_CHECKING:
    from gradclip.core.triton_scale import TritonScale

__all__ = [
    "KERNELS_ENV",
    "ClampPlan",
    "Runs",
    "accumulation_dtype",
    "add_at_",
    "clamp_abs_",
    "foreach_norms",
    "kernel_mode",
    "kernel_path",
    "large_tensor_elements",
    "plan_clamp",
]

#: Environment variable choosing the multiply of `Runs.scale_`: ``auto`` (default),
#: ``triton`` or ``foreach``; read when a `Runs` is built (once per plan).
KERNELS_ENV = "GRADCLIP_KERNELS"
_MODES = ("auto", "triton", "foreach")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRUE = ("1", "true", "yes", "on", "y")

# A tensor this large is clamped on its own with one `clamp_` (one pass over its
# memory) rather than with the two `_foreach_clamp_{min,max}_` launches (two
# passes): at this size a second pass costs more than one extra launch. On a GPU
# (~3 TB/s, ~5 us per launch) that break-even is around 2M elements; on a CPU
# (~10 GB/s, ~1.5 us per op) around 16K. The number of such tensors is bounded by
# memory / size, not by the number of layers.
_LARGE_TENSOR_ELEMENTS = {"cpu": 1 << 14}
_LARGE_TENSOR_ELEMENTS_DEFAULT = 1 << 21


def large_tensor_elements(device: torch.device) -> int:
    """Element count from which `clamp_abs_` clamps a tensor on its own."""
    return _LARGE_TENSOR_ELEMENTS.get(device.type, _LARGE_TENSOR_ELEMENTS_DEFAULT)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 tensors, float32 for every other floating dtype.

    The dtype in which a tensor's norm is accumulated (half types are read as
    they are and summed in float32, without a widened copy) and in which its
    scale factors are kept: a multiply whose factor shares the gradient's dtype
    skips a cast and runs ~1.5x faster on the CPU, and a float32 0-d factor is
    applied to half-precision gradients in float32.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_mode() -> str:
    """``GRADCLIP_KERNELS``: ``"auto"`` (also when unset or empty), ``"triton"`` or ``"foreach"``.

    Raises:
        ValueError: any other value.
    """
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{KERNELS_ENV}={mode!r}; expected one of {', '.join(_MODES)}")
    return mode


def _triton_unusable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernel cannot scale tensors of this device and dtype, or ``None``."""
    if dtype not in _TRITON_DTYPES:
        return f"it has no kernel for {dtype}"
    if device.type == "cpu":
        # the values Triton itself reads as true
        if os.environ.get("TRITON_INTERPRET", "").strip().lower() not in _TRUE:
            return "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
    elif device.type != "cuda":
        return f"it runs on CUDA devices, not {device.type}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def kernel_path(device: torch.device, dtype: torch.dtype, mode: str | None = None) -> str:
    """``"triton"`` or ``"foreach"``: how `Runs.scale_` multiplies a run of this device and dtype.

    ``mode`` (default: `kernel_mode`) ``"auto"`` picks the Triton kernel for
    CUDA tensors when Triton is installed, ``_foreach_mul_`` otherwise;
    ``"foreach"`` always picks ``_foreach_mul_``; ``"triton"`` always the kernel,
    on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, slow: for
    tests).

    Raises:
        RuntimeError: ``"triton"`` was asked for where the kernel cannot run.

    Examples:
        >>> kernel_path(torch.device("cpu"), torch.float32, "auto")
        'foreach'
        >>> kernel_path(torch.device("cpu"), torch.float16, "foreach")
        'foreach'
    """
    mode = kernel_mode() if mode is None else mode
    if mode == "foreach":
        return "foreach"
    if mode == "auto":
        if device.type != "cuda":
            return "foreach"
        return "foreach" if _triton_unusable(device, dtype) else "triton"
    reason = _triton_unusable(device, dtype)
    if reason is not None:
        raise RuntimeError(
            f"{KERNELS_ENV}=triton, but the Triton kernel cannot scale {dtype} tensors on "
            f"{device}: {reason}. Unset {KERNELS_ENV} (or set it to auto) to use it where "
            "it can run."
        )
    return "triton"


def _triton_kernel(device: torch.device, dtype: torch.dtype, mode: str) -> TritonScale | None:
    """The Triton multiply for a run, compiled now; ``None`` (and a warning) if it cannot be
    built under ``auto``, an error under ``triton``."""
    try:
        from gradclip.core import triton_scale

        error = triton_scale.compile_error(device, dtype)
    except Exception as failure:  # a broken Triton installation
        error = f"{type(failure).__name__}: {failure}"
    if error is None:
        return triton_scale.TritonScale(device, dtype)
    message = f"the Triton multiply could not be built for {dtype} tensors on {device}: {error}"
    if mode == "triton":
        raise RuntimeError(f"{KERNELS_ENV}=triton, but {message}")
    warnings.warn(f"gradclip: {message}; multiplying with _foreach_mul_", RuntimeWarning, 2)
    return None


def add_at_(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[index[i]] += values[i]`` for every ``i`` (``index_add_`` along dim 0); returns ``out``.

    Into a one-element ``out`` it is a plain sum: torch 2.13's CPU Inductor fails
    to generate code for ``index_add_`` into a one-element buffer (an
    ``AssertionError`` without a message), which a one-layer grouping such as a
    bare ``nn.Linear`` or ``model.parameters()`` would compile.

    Examples:
        >>> add_at_(torch.zeros(2), torch.tensor([1, 0, 1]), torch.tensor([1.0, 2.0, 3.0]))
        tensor([2., 4.])
        >>> add_at_(torch.zeros(1), torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        tensor([3.])
    """
    if out.shape[0] == 1:
        return out.add_(values.sum(0, keepdim=True).to(out.dtype))
    return out.index_add_(0, index, values)


def foreach_norms(tensors: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """``(n,)`` p-norm of each tensor of one (device, dtype) run: one ``_foreach_norm``.

    Half-precision inputs are accumulated in float32 without a widened copy.
    Empty tensors must not be passed with ``norm_type=inf`` (a maximum over
    nothing); `Runs.norms` substitutes them.
    """
    norms = torch._foreach_norm(tensors, norm_type, dtype=accumulation_dtype(tensors[0].dtype))
    return torch.stack(norms)


def _picker(positions: Sequence[int]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """A function taking a step's tensor list to the tensors at ``positions``."""
    first = positions[0]
    if list(positions) == list(range(first, first + len(positions))):
        stop = first + len(positions)
        return lambda tensors: tensors[first:stop]
    if len(positions) == 1:
        return lambda tensors: [tensors[first]]
    get = itemgetter(*positions)
    chosen = list(positions)

    def pick(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if torch.compiler.is_compiling():  # Dynamo cannot trace itemgetter
            return [tensors[i] for i in chosen]
        return list(get(tensors))

    return pick


@dataclass(eq=False)
class _Run:
    start: int  # index into Runs.positions
    stop: int
    device: torch.device
    dtype: torch.dtype
    pick: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    empty: tuple[int, ...]  # run-local indices of empty tensors
    coefficients: torch.Tensor | None = None  # reused buffer of the multiply
    views: tuple[torch.Tensor, ...] = ()  # its 0-d views, made once
    kernel: TritonScale | None = None  # the Triton multiply, where chosen
    numels: tuple[int, ...] = ()  # set where its large CPU tensors are measured by rows
    rows: dict[int, RowNorms] | None = None  # their row layouts, by row width
    pick_small: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None


class Runs:
    """A fixed selection of a step's tensors, split into maximal (device, dtype) runs.

    Built once per layout; `norms` and `scale_` then cost one grouped launch per
    run. ``positions`` index the step's tensor list, which the engine orders by
    device and dtype, so the runs are few.

    Args:
        positions: the selected tensors, in order.
        keys: ``(device, dtype)`` of every tensor of the step.
        empty: whether each tensor of the step has no elements.
        scaled: prepare `scale_`: a coefficient buffer per run, and the Triton
            kernel for the runs `kernel_path` gives it (``GRADCLIP_KERNELS`` is read
            here, once).
        numels: the size of every tensor of the step; where given, `norms`
            measures large CPU tensors by rows (`gradclip.core.row_norms`).

    Raises:
        ValueError, RuntimeError: from `kernel_mode` and `kernel_path`, when
            ``scaled``: an unknown ``GRADCLIP_KERNELS`` value, or ``triton`` forced
            where it cannot run or its kernel cannot be compiled (under ``auto``
            such a run keeps ``_foreach_mul_``, with a warning).
    """

    def __init__(
        self,
        positions: Sequence[int],
        keys: Sequence[tuple[torch.device, torch.dtype]],
        empty: Sequence[bool],
        *,
        scaled: bool = False,
        numels: Sequence[int] | None = None,
    ) -> None:
        self.positions = list(positions)
        self.runs: list[_Run] = []
        mode = kernel_mode() if scaled else "foreach"
        start = 0
        while start < len(self.positions):
            key = keys[self.positions[start]]
            stop = start + 1
            while stop < len(self.positions) and keys[self.positions[stop]] == key:
                stop += 1
            chosen = self.positions[start:stop]
            run = _Run(
                start,
                stop,
                key[0],
                key[1],
                _picker(chosen),
                tuple(i for i, p in enumerate(chosen) if empty[p]),
            )
            if scaled:
                run.coefficients = torch.ones(
                    stop - start, dtype=accumulation_dtype(key[1]), device=key[0]
                )
                run.views = run.coefficients.unbind(0)
                if kernel_path(key[0], key[1], mode) == "triton":
                    run.kernel = _triton_kernel(key[0], key[1], mode)
            if numels is not None and any(by_rows(key[0], key[1], numels[p]) for p in chosen):
                run.numels = tuple(numels[p] for p in chosen)
                run.rows = {}
                width = row_width(key[1], 2.0)
                run.rows[width] = RowNorms(key[1], run.numels, width)
                small = [chosen[i] for i in run.rows[width].small]
                run.pick_small = _picker(small) if small else None
            self.runs.append(run)
            start = stop

    def __len__(self) -> int:
        return len(self.positions)

    def norms(
        self,
        tensors: list[torch.Tensor],
        norm_type: float,
        device: torch.device,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``(len(self),)`` p-norm of each selected tensor, on ``device`` in ``dtype``.

        Empty tensors read 0 for every order (``_foreach_norm`` has no identity
        for the maximum, so they are replaced by a one-element zero). Large CPU
        tensors are measured by rows for finite orders (exact to float32
        rounding, see `gradclip.core.row_norms`), except under ``torch.compile``.
        """
        parts = []
        by_rows = 0.0 < norm_type < math.inf and not torch.compiler.is_compiling()
        for run in self.runs:
            if run.rows is not None and by_rows:
                small = None
                if run.pick_small is not None:  # one launch for them all, copied into their slots
                    small = torch._foreach_norm(
                        run.pick_small(tensors), norm_type, dtype=accumulation_dtype(run.dtype)
                    )
                width = row_width(run.dtype, norm_type)
                layout = run.rows.get(width)
                if layout is None:  # another order: its rows, made on the first step
                    layout = run.rows[width] = RowNorms(run.dtype, run.numels, width)
                measured = layout.norms(run.pick(tensors), norm_type, small, dtype)
                parts.append(measured.to(device, non_blocking=True))
                continue
            chunk = run.pick(tensors)
            if run.empty and norm_type == math.inf:
                chunk = list(chunk)
                for i in run.empty:
                    chunk[i] = chunk[i].new_zeros(1)
            parts.append(foreach_norms(chunk, norm_type).to(device, dtype, non_blocking=True))
        if not parts:
            return torch.zeros(0, dtype=dtype, device=device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def scale_(self, tensors: list[torch.Tensor], coefficients: torch.Tensor) -> None:
        """``tensors[p] *= coefficients[i]`` for the ``i``-th selected position ``p``.

        Per run, either one launch of the Triton kernel, reading the coefficients
        where they are (tensors that are not dense, if any, then take the path
        below), or a copy of the coefficients into a buffer kept per run whose
        0-d views were made once, and one ``_foreach_mul_``. Both compute in
        float32 (float64 for float64 tensors) and round to nearest-even; a
        coefficient of exactly 1.0 leaves its tensor bit-for-bit unchanged. Under
        ``torch.compile`` the ``_foreach_mul_`` path is traced, with the views
        made in the graph (the compiler fuses it itself).
        """
        compiling = torch.compiler.is_compiling()
        for run in self.runs:
            assert run.coefficients is not None, "Runs built without scaled=True"
            chunk = run.pick(tensors)
            if compiling:
                # views made in the graph: views made once would be graph inputs that
                # alias each other, which AOTAutograd cannot check under dynamic shapes
                mine = coefficients[run.start : run.stop].to(run.coefficients.dtype)
                torch._foreach_mul_(chunk, mine.unbind(0))
                continue
            if run.kernel is None:
                run.coefficients.copy_(coefficients[run.start : run.stop], non_blocking=True)
                torch._foreach_mul_(chunk, run.views)
                continue
            copied = coefficients.device != run.device  # a model over several devices
            if copied:
                run.coefficients.copy_(coefficients[run.start : run.stop], non_blocking=True)
                rest = run.kernel.scale_(chunk, run.coefficients, 0)
            else:
                rest = run.kernel.scale_(chunk, coefficients, run.start)
            if rest:  # tensors the kernel cannot address (not dense): their own multiply
                if not copied:
                    run.coefficients.copy_(coefficients[run.start : run.stop], non_blocking=True)
                torch._foreach_mul_([chunk[i] for i in rest], [run.views[i] for i in rest])


@dataclass(frozen=True)
class ClampPlan:
    """How `clamp_abs_` splits a list of tensors; depends only on the layout.

    Attributes:
        groups: for each (device, dtype, threshold): the threshold, the positions
            of its small tensors (clamped with two ``_foreach`` launches) and of its
            large ones (clamped one by one with a single pass each). Tensors whose
            dtype cannot hold the threshold are in no group: clamping them to
            ``±threshold`` would change no finite value.
    """

    groups: tuple[tuple[float, tuple[int, ...], tuple[int, ...]], ...]


def plan_clamp(
    devices: Sequence[torch.device],
    dtypes: Sequence[torch.dtype],
    numels: Sequence[int],
    thresholds: Sequence[float],
) -> ClampPlan:
    """Split tensors of these devices, dtypes and sizes for `clamp_abs_` (once per layout)."""
    groups: dict[tuple[torch.device, torch.dtype, float], list[int]] = {}
    for i, (device, dtype, thr) in enumerate(zip(devices, dtypes, thresholds, strict=True)):
        if thr >= torch.finfo(dtype).max:
            continue  # every finite value already lies in [-thr, thr]
        groups.setdefault((device, dtype, float(thr)), []).append(i)
    planned = []
    for (device, _, thr), positions in groups.items():
        limit = large_tensor_elements(device)
        small = tuple(i for i in positions if numels[i] < limit)
        large = tuple(i for i in positions if numels[i] >= limit)
        planned.append((thr, small, large))
    return ClampPlan(tuple(planned))


def clamp_abs_(tensors: list[torch.Tensor], plan: ClampPlan) -> None:
    """Clamp every element of the tensors to ``[-threshold, threshold]`` in place, per `plan`.

    In each group of the plan, the small tensors are clamped with
    ``_foreach_clamp_min_`` then ``_foreach_clamp_max_`` (two launches for the
    whole group) and each large one with a single ``clamp_`` (one pass over its
    memory instead of two; see `large_tensor_elements`).
    """
    for thr, small, large in plan.groups:
        for i in large:
            tensors[i].clamp_(-thr, thr)
        if small:
            selected = tensors if len(small) == len(tensors) else [tensors[i] for i in small]
            torch._foreach_clamp_min_(selected, -thr)
            torch._foreach_clamp_max_(selected, thr)
