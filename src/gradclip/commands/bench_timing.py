"""How ``python -m gradclip bench`` times a method: wall, host and device time, launches.

For each repetition of a method:

* *wall* ms: from the call to the end of its device work (``torch.cuda.synchronize``);
* *host* ms: from the call to its return, the time the host spends issuing the
  work; on the CPU, where the work is done during the call, the same as wall;
* *GPU* ms (CUDA): the span between two CUDA events recorded on the current
  stream before and after the call: the device's time for the call, including
  any wait for the host to launch the next kernel.

One further call runs under ``torch.profiler`` to count what a step launches:
on CUDA the device kernels (memsets and memcpys counted apart, host→device
copies among them), on the CPU the top-level aten ops (each one pass of the
CPU over its operands, the CPU's equivalent of a launch).

Inside `cpu_time` (``python -m gradclip bench --cpu-time``) CPU methods run on
one thread and are timed by that thread's CPU time (``time.thread_time``)
instead of the wall clock: on a machine shared with other jobs, a wall-clock
median swings with whatever else runs (a thread pool's barrier waits for the
thread the scheduler parked), while the CPU time of one thread counts only the
work it did, so ratios measured in one run hold. Memory bandwidth is still
shared.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch._C._autograd import DeviceType

__all__ = [
    "Launches",
    "Timing",
    "count_launches",
    "cpu_time",
    "peak_extra_bytes",
    "quiet_profiler",
    "sync",
    "time_methods",
]

Method = Callable[[], object]


@dataclass(frozen=True)
class Timing:
    """Medians over the repetitions of one method, in milliseconds."""

    wall_ms: float
    host_ms: float
    gpu_ms: float | None  # CUDA events; None on other devices


@dataclass(frozen=True)
class Launches:
    """What one call launches, from the profiler."""

    kernels: int  # CUDA: device kernels; CPU: top-level aten ops
    copies_to_device: int  # CUDA: host → device memcpys; CPU: 0
    kernel_ms: float | None  # CUDA: the kernels' summed durations


class _Clock:
    """The clock `time_methods` reads: the wall clock, or one thread's CPU time in `cpu_time`."""

    now: Callable[[], float] = time.perf_counter


@contextlib.contextmanager
def cpu_time(device: torch.device | None = None) -> Iterator[None]:
    """Inside the block, time CPU methods on one thread by its CPU time (see the module).

    Args:
        device: where the methods run; the block says so on stdout when given.

    Raises:
        ValueError: ``device`` is not the CPU.

    Examples:
        >>> import time
        >>> with cpu_time():
        ...     timing = time_methods({"sleep": lambda: time.sleep(0.02)}, torch.device("cpu"), 1)
        >>> timing["sleep"].wall_ms < 10   # sleeping takes no CPU time
        True
    """
    if device is not None:
        if device.type != "cpu":
            raise ValueError(f"--cpu-time times the CPU, not {device}: pass --device cpu")
        print("timing: CPU time of 1 thread (time.thread_time), not the wall clock")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _Clock.now = time.thread_time
    try:
        yield
    finally:
        _Clock.now = time.perf_counter
        torch.set_num_threads(threads)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(
    methods: Mapping[str, Method], device: torch.device, reps: int
) -> dict[str, Timing]:
    """`Timing` of each method, interleaved repetition by repetition.

    Interleaving makes a slow moment of the machine hurt every method alike.
    Each method runs twice first (plans, caches, the allocator, compilation of
    Triton kernels). Inside `cpu_time`, wall and host time are one thread's CPU
    time.
    """
    cuda = device.type == "cuda"
    if cuda and _Clock.now is not time.perf_counter:
        raise ValueError("CPU time (--cpu-time) times CPU methods only; drop it for --device cuda")
    now = _Clock.now
    wall: dict[str, list[float]] = {name: [] for name in methods}
    host: dict[str, list[float]] = {name: [] for name in methods}
    gpu: dict[str, list[float]] = {name: [] for name in methods}
    for method in methods.values():
        method()
        method()
    sync(device)
    for _ in range(reps):
        for name, method in methods.items():
            if cuda:
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
            t0 = now()
            method()
            t1 = now()
            if cuda:
                end.record()
            sync(device)
            t2 = now()
            wall[name].append((t2 - t0) * 1e3)
            host[name].append((t1 - t0) * 1e3)
            if cuda:
                gpu[name].append(start.elapsed_time(end))
    return {
        name: Timing(
            statistics.median(wall[name]),
            statistics.median(host[name]),
            statistics.median(gpu[name]) if cuda else None,
        )
        for name in methods
    }


# What the profiler's C++ side (Kineto) writes to stderr on every start and stop,
# and its note on blocks allocated before it started: noise for a bench's reader.
_PROFILER_NOISE = re.compile(
    r"^(USDT:|STAGE:|\[W\d+ [^\]]*CPUAllocator\.cpp:\d+\] Memory block of unknown size)"
)


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Drop the profiler's own stderr lines written inside the block; pass on the rest.

    Kineto writes straight to file descriptor 2, so the descriptor is pointed at
    a temporary file for the block and what it caught, less the noise, is
    written back to stderr afterwards.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not _PROFILER_NOISE.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def count_launches(method: Method, device: torch.device, steps: int = 3) -> Launches:
    """Launches per call of ``method`` (already warmed up), averaged over ``steps`` calls."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(device)
    with quiet_profiler(), torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            method()
        sync(device)
    events = prof.profiler.kineto_results.events()
    if device.type != "cuda":
        # top-level aten ops: those not inside another aten op (by time; one thread)
        ops = sorted(  # an op before the ops it calls, which start when it does or later
            (e.start_ns(), -e.end_ns())
            for e in events
            if e.device_type() == DeviceType.CPU and e.name().startswith("aten::")
        )
        top, end = 0, -1
        for start, neg_stop in ops:
            if start >= end:
                top, end = top + 1, -neg_stop
        return Launches(round(top / steps), 0, None)
    kernels = copies = 0
    busy_ns = 0
    for event in events:
        if event.device_type() != DeviceType.CUDA:
            continue
        name = event.name()
        if name.startswith("Memcpy HtoD"):
            copies += 1
        elif not name.startswith(("Memcpy", "Memset")):
            kernels += 1
            busy_ns += event.duration_ns()
    return Launches(round(kernels / steps), round(copies / steps), busy_ns / steps / 1e6)


def peak_extra_bytes(method: Method, device: torch.device) -> int:
    """Peak bytes allocated during one call of ``method`` beyond what was live before."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        method()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with (
        quiet_profiler(),
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof,
    ):
        method()
    # Each op's own allocations (and frees) in time order; "self" so that an op's
    # children are not counted twice.
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)
