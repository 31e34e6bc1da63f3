"""The machine's floor for a benchmark scenario: passes over a flat buffer of the same bytes.

Any clipping by norm must read every gradient once (the norm) and read and
write it once (the multiply); element-wise clipping must read and write it
once. The least time those passes can take on this machine is measured on one
flat, contiguous buffer of as many bytes as the scenario's gradients, in the
same run and interleaved with the methods it is compared to:

* ``hardware: read`` is ``flat.sum()``;
* ``hardware: read/write`` is ``flat.mul_(1.0)``.

A scenario's floor is the sum of the passes its kind of clipping needs; each
method's time over it is printed beside the ratio to torch's own functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from gradclip.commands.bench_timing import Timing

__all__ = ["READ", "READ_WRITE", "floor_methods", "floor_ms", "gradient_bytes"]

Method = Callable[[], object]
READ = "hardware: read (flat.sum)"
READ_WRITE = "hardware: read/write (flat.mul_)"


def gradient_bytes(grads: list[torch.Tensor]) -> int:
    """Bytes of the gradients' values."""
    return sum(g.numel() * g.element_size() for g in grads)


def floor_methods(grads: list[torch.Tensor], device: torch.device) -> dict[str, Method]:
    """The two passes over a float32 buffer of the gradients' bytes (rounded up to 4)."""
    flat = torch.empty(-(-gradient_bytes(grads) // 4), dtype=torch.float32, device=device)
    flat.uniform_(-1.0, 1.0)  # real values: no denormals, no zeros the CPU could skip
    one = torch.ones((), dtype=torch.float32, device=device)

    def read() -> object:
        return flat.sum()

    def read_write() -> object:
        return flat.mul_(one)

    return {READ: read, READ_WRITE: read_write}


def floor_ms(timings: Mapping[str, Timing], passes: tuple[str, ...]) -> float:
    """The scenario's floor: the summed median wall times of its passes."""
    return sum(timings[name].wall_ms for name in passes)
