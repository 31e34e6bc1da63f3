"""``python -m gradclip bench --accuracy``: norms against float64, gradclip's and torch's.

For each size and dtype, one tensor of uniform values in ``[0, 1)`` (all of one
sign: every rounding error of a sum has the same sign, the hard case for
accuracy) is measured three ways: exactly, in float64 chunk by chunk;
by gradclip's engine (`gradclip.core.kernels.Runs`, which measures large CPU
tensors by rows); and by ``torch._foreach_norm`` (what ``clip_grad_norm_``
uses). The table gives both relative errors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from gradclip.core.kernels import Runs

__all__ = ["SIZES", "accuracy_rows", "format_accuracy"]

SIZES = (10**3, 10**4, 10**5, 10**6, 10**7, 10**8)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _exact(x: torch.Tensor) -> float:
    chunks = torch.split(x.reshape(-1), 1 << 22)
    return math.sqrt(math.fsum(float(c.double().square().sum()) for c in chunks))


def accuracy_rows(
    device: torch.device, sizes: tuple[int, ...] = SIZES
) -> Iterator[tuple[int, torch.dtype, float, float]]:
    """``(size, dtype, gradclip's relative error, torch's)``; 10^8 values in float32 only."""
    gen = torch.Generator(device=device).manual_seed(0)
    for n in sizes:
        for dtype in DTYPES if n < 10**8 else (torch.float32,):
            x = torch.rand(n, generator=gen, device=device).to(dtype)
            exact = _exact(x)
            runs = Runs([0], [(x.device, x.dtype)], [False], numels=[n])
            ours = float(runs.norms([x], 2.0, device, torch.float32)[0])
            theirs = float(torch._foreach_norm([x], 2.0, dtype=torch.float32)[0])
            yield n, dtype, abs(ours - exact) / exact, abs(theirs - exact) / exact
            del x


def format_accuracy(rows: Iterator[tuple[int, torch.dtype, float, float]]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| values | dtype | gradclip rel. error | torch _foreach_norm rel. error |",
        "|---:|---|---:|---:|",
    ]
    for n, dtype, ours, theirs in rows:
        name = str(dtype).removeprefix("torch.")
        lines.append(f"| {n:.0e} | {name} | {ours:.1e} | {theirs:.1e} |")
    return "\n".join(lines)
