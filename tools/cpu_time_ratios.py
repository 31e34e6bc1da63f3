"""Ratios of CPU time on one thread: norms against a read, fused AdamW steps against torch's.

On a machine shared with other jobs, wall-clock medians swing by integer
factors (a thread pool's barrier waits for whichever thread the scheduler
parked). The CPU time of a single thread counts only the work it did, so the
ratios it gives hold on a busy machine; memory bandwidth is still shared.

    python tools/cpu_time_ratios.py [repetitions]

Prints, for GPT-2-small shaped float32 gradients (124.4M values, 148 tensors):
gradclip's per-tensor L2 norms and torch's ``_foreach_norm`` over one read
(``flat.sum()`` of a buffer of the same bytes), then the ``train_step``
methods of ``python -m gradclip bench`` over their references.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from gradclip.commands.bench import _gpt2
from gradclip.commands.bench_step import CLIP_STEP, step_methods
from gradclip.core.kernels import Runs


def _medians(methods: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():
        method()
        method()
    for _ in range(reps):  # interleaved
        for name, method in methods.items():
            start = time.thread_time()
            method()
            times[name].append((time.thread_time() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(reps: int) -> None:
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    model = _gpt2(cpu, 12)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    keys = [(g.device, g.dtype) for g in grads]
    everything = range(len(grads))
    ours = Runs(everything, keys, [False] * len(grads), numels=[g.numel() for g in grads])
    flat = torch.empty(sum(g.numel() for g in grads)).uniform_()
    norms = _medians(
        {
            "read (flat.sum)": flat.sum,
            "gradclip norms": lambda: ours.norms(grads, 2.0, cpu, torch.float32),
            "torch _foreach_norm": lambda: torch._foreach_norm(grads),
        },
        reps * 2,
    )
    print(f"torch {torch.__version__}, 1 thread, CPU time, medians of {reps * 2}")
    for name, ms in norms.items():
        print(f"  {name:<58} {ms:8.2f} ms  {ms / norms['read (flat.sum)']:.2f}x read")
    methods, targets = step_methods(model, cpu)
    steps = _medians(methods, reps)
    print(f"train_step, medians of {reps}")
    for name, ms in steps.items():
        reference, target = targets.get(name, (CLIP_STEP, None))
        ratio = "" if name == CLIP_STEP else f"  {ms / steps[reference]:.2f}x {reference}"
        goal = "" if target is None else f" (target <= {target:.2f}x)"
        print(f"  {name:<58} {ms:8.2f} ms{ratio}{goal}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
