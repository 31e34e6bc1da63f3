"""Benchmark: per-layer normalization of FSDP2-sharded gradients vs ``clip_grad_norm_``.

Starts ``world_size`` processes on the CPU (gloo, loopback only), shards an MLP
with ``fully_shard`` (one FSDP group per layer, as a transformer is usually
sharded), runs one backward pass, then times on every rank, with the ranks
lined up by a barrier before each call (the barrier is not timed):

* ``gradclip`` — ``GradientNormalizer(model, mode).apply()``: per-layer norms, one
  ``all_reduce`` of one float per gradient tensor, after the ranks' agreement
  fingerprint (one float per parameter, and one more);
* ``torch.nn.utils.clip_grad_norm_`` on the same sharded parameters: one global
  norm (torch's DTensor path);
* the naive per-layer alternative, ``clip_grad_norm_`` called once per layer,
  which costs one collective per layer;
* ``gradclip`` on the same layers wrapped in DDP instead, whose gradients are
  already averaged: no collective.

The collectives of one steady call of each, and the elements they send, are
counted with `CollectiveCounter`. Medians over ``repeats`` calls, from rank 0.
The first call of each method is not counted or timed (it builds the cached
plan and, for gradclip, compares the ranks' configurations).

Command line: `python -m gradclip bench --distributed` or
`python -m gradclip.commands.bench_distributed [--layers N] [--width W]`; from
Python, `run_distributed_bench(layers=32, width=256, repeats=30)` returns the
rows that `format_rows` prints.

Examples:
    >>> rows = [
    ...     {"method": "gradclip ClipL2PerLayer", "world_size": 2, "layers": 32, "tensors": 64,
    ...      "median_ms": 1.61, "collectives": 1, "floats_sent": 129,
    ...      "ratio_vs_clip_grad_norm_": 0.69},
    ... ]
    >>> print(format_rows(rows))
    method                   ranks  layers  tensors  median ms  collectives  sent  ratio
    gradclip ClipL2PerLayer  2      32      64       1.610      1            129   0.69
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from gradclip.commands.bench_timing import quiet_profiler

__all__ = ["CollectiveCounter", "format_rows", "main", "run_distributed_bench"]

# The profiler names every collective a process group runs "<backend>:<op>"
# (``gloo:all_reduce``, ``nccl:all_reduce``), including those DTensor issues from
# inside its own dispatch, which a TorchDispatchMode cannot see.
_COLLECTIVE_EVENT = re.compile(r"^(gloo|nccl|ucc|mpi|xccl):")


class CollectiveCounter:
    """Counts the collectives run by this process's process groups while active.

    Uses ``torch.profiler`` (CPU activity), so it sees every collective that
    reaches a backend, whoever issues it (``dist.all_reduce``, DTensor
    redistributions, FSDP). Costs profiler overhead: do not time inside it.

    Attributes:
        ops: names of the collectives, in order (e.g. ``["gloo:all_reduce"]``).
        elements: the number of elements each one sent from this rank (its inputs'
            total, as the profiler recorded their shapes; 0 where it did not).

    Examples:
        Without a process group nothing is communicated, so nothing is counted:

        >>> with CollectiveCounter() as counter:
        ...     report = gradclip.normalize_(model, "ClipL2PerLayer")
        >>> counter.ops
        []

        Under FSDP2 on two ranks, the same call counts `["gloo:all_reduce"]`.
    """

    def __init__(self) -> None:
        self.ops: list[str] = []
        self.elements: list[int] = []
        self._profile: Any = None
        self._quiet: Any = None

    def __enter__(self) -> CollectiveCounter:
        from torch.profiler import ProfilerActivity, profile

        self._quiet = quiet_profiler()  # no start/stop lines of the profiler on stderr
        self._quiet.__enter__()
        self._profile = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        self._profile.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._profile.__exit__(exc_type, exc, tb)
        finally:
            self._quiet.__exit__(None, None, None)
        events = [e for e in self._profile.events() if _COLLECTIVE_EVENT.match(e.name)]
        self.ops = [e.name for e in events]
        self.elements = [sum(math.prod(s) for s in e.input_shapes if s) for e in events]


def _mlp(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods)


def _median_ms(
    fn: Callable[[], object], repeats: int, warmup: int, barrier: Callable[[], object]
) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@contextlib.contextmanager
def gloo_rank(
    rank: int, world_size: int, init_method: str, timeout_s: float = 120.0
) -> Iterator[None]:
    """This process as rank ``rank`` of a gloo group for the block, then gone.

    After the block every rank meets the others before the group goes (gloo may
    abort a rank whose peer tears the group down while it still talks to it),
    and the process leaves without the interpreter's teardown, which gloo on the
    CPU can abort (std::terminate from a thread it still holds). An exception
    from the block propagates, so that `spawn` sees the rank fail.
    """
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world_size: int, init_method: str, config: dict[str, Any]) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import gradclip

    torch.set_num_threads(config["threads"])
    with gloo_rank(rank, world_size, init_method):
        model = _mlp(config["layers"], config["width"])
        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module)
        fully_shard(model)
        model(torch.randn(8, config["width"])).square().sum().backward()
        normalizer = gradclip.GradientNormalizer(model, config["mode"], config["threshold"])
        params = list(model.parameters())
        linears = [m for m in model if isinstance(m, nn.Linear)]
        threshold = config["threshold"]

        def naive() -> None:
            for layer in linears:
                torch.nn.utils.clip_grad_norm_(layer.parameters(), threshold)

        methods: list[tuple[str, Callable[[], object]]] = [
            (f"gradclip {config['mode']} apply()", normalizer.apply),
            (
                "torch clip_grad_norm_ (global)",
                lambda: torch.nn.utils.clip_grad_norm_(params, threshold),
            ),
            ("torch clip_grad_norm_ per layer", naive),
        ]
        # the same layers under DDP: plain, already averaged gradients, no collective
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(_mlp(config["layers"], config["width"]))
        ddp(torch.randn(8, config["width"])).square().sum().backward()
        ddp_normalizer = gradclip.GradientNormalizer(ddp, config["mode"], config["threshold"])
        methods.append((f"gradclip {config['mode']} apply() under DDP", ddp_normalizer.apply))
        rows: list[dict[str, Any]] = []
        for name, fn in methods:
            fn()  # builds caches (gradclip's plan); its collectives are counted next
            with CollectiveCounter() as counter:
                fn()
            median = _median_ms(fn, config["repeats"], config["warmup"], dist.barrier)
            rows.append(
                {
                    "method": name,
                    "world_size": world_size,
                    "layers": len(linears),
                    "tensors": len(params),
                    "parameters": sum(p.numel() for p in params),
                    "median_ms": round(median, 4),
                    "collectives": len(counter.ops),
                    "floats_sent": sum(counter.elements),
                }
            )
        base = rows[1]["median_ms"]
        for row in rows:
            row["ratio_vs_clip_grad_norm_"] = round(row["median_ms"] / base, 3)
        if rank == 0:
            Path(config["out"]).write_text(json.dumps(rows))


def spawn(worker: Any, args: tuple[Any, ...], nprocs: int, timeout_s: float) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` fresh processes; kill them after ``timeout_s``.

    Raises:
        TimeoutError: the processes did not finish in time (a hung collective).
    """
    import torch.multiprocessing as mp

    start: Any = mp.start_processes  # type: ignore[attr-defined]  # untyped in torch
    context = start(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"the {nprocs} processes did not finish in {timeout_s} s")


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_distributed_bench(
    *,
    world_size: int = 2,
    layers: int = 32,
    width: int = 256,
    repeats: int = 30,
    warmup: int = 3,
    mode: str = "ClipL2PerLayer",
    threshold: float = 1.0,
    threads: int = 1,
    timeout_s: float = 300.0,
) -> list[dict[str, Any]]:
    """Time ``apply()`` on ``world_size`` CPU ranks against ``clip_grad_norm_`` (FSDP2, gloo).

    Args:
        world_size: number of processes (ranks), each on the CPU.
        layers: number of ``Linear(width, width)`` layers, each its own FSDP group.
        width: their width.
        repeats: timed calls per method (the median is reported).
        warmup: untimed calls per method before timing.
        mode: the gradclip mode to time.
        threshold: threshold of both gradclip and ``clip_grad_norm_``.
        threads: torch threads per rank.
        timeout_s: the processes are killed after this many seconds.

    Returns:
        One row per method: ``method``, ``world_size``, ``layers``, ``tensors``,
        ``parameters``, ``median_ms`` (rank 0), ``collectives`` (per call, counted
        on rank 0), ``floats_sent`` (elements those collectives sent from rank 0)
        and ``ratio_vs_clip_grad_norm_`` (median over the median of the global
        ``clip_grad_norm_``).

    Raises:
        RuntimeError: the worker processes failed or timed out.
    """
    config = {
        "layers": layers,
        "width": width,
        "repeats": repeats,
        "warmup": warmup,
        "mode": mode,
        "threshold": threshold,
        "threads": threads,
    }
    return run_ranks(
        _worker,
        lambda address, cfg: (world_size, address, cfg),
        config,
        world_size,
        timeout_s,
        "the distributed benchmark",
    )


def run_ranks(
    worker: Callable[..., None],
    arguments: Callable[[str, dict[str, Any]], tuple[Any, ...]],
    config: dict[str, Any],
    world_size: int,
    timeout_s: float,
    what: str,
) -> list[dict[str, Any]]:
    """Run ``worker`` on ``world_size`` gloo ranks on loopback; the rows its rank 0 wrote.

    ``arguments(address, config)`` gives the worker's arguments; ``config``
    gains ``"out"``, the JSON file rank 0 writes its rows to.

    Raises:
        RuntimeError: no gloo here, or the workers failed or timed out.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        raise RuntimeError(f"{what} needs torch.distributed with gloo")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "rows.json")
        address = f"tcp://127.0.0.1:{free_port()}"
        spawn(worker, arguments(address, {**config, "out": str(out)}), world_size, timeout_s)
        rows: list[dict[str, Any]] = json.loads(out.read_text())
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table."""
    header = ("method", "ranks", "layers", "tensors", "median ms", "collectives", "sent", "ratio")
    lines = [
        (
            str(r["method"]),
            str(r["world_size"]),
            str(r["layers"]),
            str(r["tensors"]),
            f"{r['median_ms']:.3f}",
            str(r["collectives"]),
            str(r.get("floats_sent", "-")),
            f"{r['ratio_vs_clip_grad_norm_']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [header, *lines]
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m gradclip.commands.bench_distributed``: run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--mode", default="ClipL2PerLayer")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = run_distributed_bench(
        world_size=args.world_size,
        layers=args.layers,
        width=args.width,
        repeats=args.repeats,
        mode=args.mode,
    )
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
