"""Per-tensor L2 norms on the CPU: time over one read of the same bytes, and accuracy.

    python tools/norm_ratios.py [repetitions] [sizes] [dtypes]
    python tools/norm_ratios.py --worst

For each size (default 1e6, 1e7, 1e8 values) and dtype (float32, bfloat16,
float16), one tensor of uniform values in ``[-1, 1)`` is measured on one thread,
in CPU time (``time.thread_time``: robust on a shared machine), interleaved:

* ``read``: ``flat.sum()`` over a float32 buffer of the tensor's bytes;
* ``gradclip``: the engine's norms (`gradclip.core.kernels.Runs`);
* ``torch``: ``torch._foreach_norm`` accumulating in float32 (what
  ``clip_grad_norm_`` uses).

``hot`` times repeat on data already in the caches; ``cold`` times take each
call's tensor from a rotation of copies larger than the caches together (at
least 192 MiB), as a training step finds gradients that backward wrote long
before, while the code stays warm. Then the relative error of both norms against float64, for
the uniform data and for constant data (every value 0.1: every rounding error
of a sum has the same sign, the worst case).

``--worst`` prints, for rows of 768 values (gradclip's) and of 1024, the worst
relative error of PyTorch's float32 row norm over 10^5 constants in
``[0.001, 8)``: the error of gradclip's norm of constant data at any size.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

from gradclip.core.kernels import Runs
from gradclip.core.row_norms import ROW_VALUES

CPU = torch.device("cpu")
COLD_BYTES = 192 << 20  # more than any cache of the machine


def _medians(
    methods: dict[str, Callable[[torch.Tensor], object]],
    data: dict[str, list[torch.Tensor]],
    reps: int,
) -> dict[str, float]:
    """Median CPU ms of each method, interleaved, each call on the next of its ``data``."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for name, method in methods.items():
        method(data[name][0])
    for k in range(reps):
        for name, method in methods.items():
            copies = data[name]
            start = time.thread_time()
            method(copies[(k + 1) % len(copies)])
            times[name].append((time.thread_time() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _exact(x: torch.Tensor) -> float:
    chunks = torch.split(x.reshape(-1), 1 << 22)
    return math.sqrt(math.fsum(float(c.double().square().sum()) for c in chunks))


def _errors(x: torch.Tensor, runs: Runs) -> tuple[float, float]:
    exact = _exact(x)
    ours = float(runs.norms([x], 2.0, CPU, torch.float32)[0])
    theirs = float(torch._foreach_norm([x], 2.0, dtype=torch.float32)[0])
    return abs(ours - exact) / exact, abs(theirs - exact) / exact


def main(reps: int, sizes: list[int], dtypes: list[torch.dtype]) -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU time, medians of {reps}; ratios to read")
    print(
        "| values | dtype | read hot ms | gradclip hot | torch hot | read cold ms"
        " | gradclip cold | torch cold | gradclip error (uniform / constant)"
        " | torch error (uniform / constant) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        for dtype in dtypes:
            x = torch.empty(n).uniform_(-1.0, 1.0).to(dtype)
            flat = torch.empty(-(-n * x.element_size() // 4)).uniform_(-1.0, 1.0)
            runs = Runs([0], [(CPU, dtype)], [False], numels=[n])
            methods: dict[str, Callable[[torch.Tensor], object]] = {
                "read": torch.sum,
                "gradclip": lambda t: runs.norms([t], 2.0, CPU, torch.float32),  # noqa: B023
                "torch": lambda t: torch._foreach_norm([t], 2.0, dtype=torch.float32),
            }
            hot = _medians(methods, {"read": [flat], "gradclip": [x], "torch": [x]}, reps)
            # each method its own copies, none read by another method just before
            many = -(-COLD_BYTES // (n * x.element_size()))
            copies = {
                name: [t] if many == 1 else [t.clone() for _ in range(many)]
                for name, t in (("read", flat), ("gradclip", x), ("torch", x))
            }
            cold = _medians(methods, copies, reps)
            del copies
            uniform = _errors(x, runs)
            constant = _errors(x.fill_(0.1), runs)
            name = str(dtype).removeprefix("torch.")
            print(
                f"| {n:.0e} | {name} | {hot['read']:.2f} | {hot['gradclip'] / hot['read']:.2f}x"
                f" | {hot['torch'] / hot['read']:.2f}x | {cold['read']:.2f}"
                f" | {cold['gradclip'] / cold['read']:.2f}x | {cold['torch'] / cold['read']:.2f}x"
                f" | {uniform[0]:.0e} / {constant[0]:.0e} | {uniform[1]:.0e} / {constant[1]:.0e} |",
                flush=True,
            )
            del x, flat


def worst(count: int = 100_000) -> None:
    """The worst relative error of a float32 row norm of constant data, per row width."""
    constants = torch.rand(count, generator=torch.Generator().manual_seed(1)) * 8 + 1e-3
    for width in (ROW_VALUES[torch.float32], 1024):
        rows = constants[:, None].expand(-1, width).contiguous()
        got = torch.linalg.vector_norm(rows, dim=1).double()
        errors = (got / (constants.double() * math.sqrt(width)) - 1).abs()
        at = int(errors.argmax())
        print(
            f"rows of {width}: worst {float(errors[at]):.2e} (constant {float(constants[at])!r}),"
            f" mean {float(errors.mean()):.1e}"
        )


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--worst"]:
        worst()
        sys.exit()
    main(
        int(args[0]) if args else 9,
        [int(float(s)) for s in (args[1] if len(args) > 1 else "1e6,1e7,1e8").split(",")],
        [
            getattr(torch, d)
            for d in (args[2] if len(args) > 2 else "float32,bfloat16,float16").split(",")
        ],
    )
