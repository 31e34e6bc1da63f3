"""Benchmark: a model split into 2 pipeline stages x 2 data-parallel ranks (4 gloo CPU ranks).

Each stage holds half of ``layers`` ``Linear(width, width)`` layers under their
global names (``layers.0`` … on stage 0, the rest on stage 1). Data parallel is
FSDP2 (``fully_shard`` of each layer over the stage's dp mesh, after one real
backward pass) or DDP (replicated plain gradients). Timed on every rank, lined
up by a barrier before each call, medians of rank 0:

* ``gradclip`` — ``GradientNormalizer(stage, mode, pp_mesh=mesh["pp"]).apply()``;
* torchtitan's pipeline clip (its ``clip_grad_norm_(..., pp_mesh=...)``):
  ``get_total_norm`` of the stage's gradients (under FSDP2 a ``DTensor``,
  made whole with one ``all_reduce`` over dp), one more ``all_reduce`` of its
  p-th power over the pipeline group, then ``clip_grads_with_norm_``.

The collectives of one steady call of each, and the floats they send from rank 0,
are counted with `CollectiveCounter`.

Command line: ``python -m gradclip bench --distributed`` prints this table after
the FSDP2 one; ``python -m gradclip.commands.bench_pipeline [--layers N]`` alone.

Examples:
    >>> rows = [
    ...     {"method": "gradclip ClipGlobalNorm", "dp": "fsdp2", "ranks": "2x2",
    ...      "tensors": 16, "median_ms": 0.9, "collectives": 1, "floats_sent": 27,
    ...      "ratio": 0.8},
    ... ]
    >>> print(format_rows(rows))
    method                   dp     pp x dp  tensors/stage  median ms  collectives  sent  ratio
    gradclip ClipGlobalNorm  fsdp2  2x2      16             0.900      1            27    0.80
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradclip.commands.bench_distributed import (
    CollectiveCounter,
    _median_ms,
    gloo_rank,
    run_ranks,
)

__all__ = ["format_rows", "main", "run_pipeline_bench"]

_WORLD = 4
_RULES = ("ClipL2PerLayer", "ClipGlobalNorm")


def run_pipeline_bench(
    *, layers: int = 16, width: int = 128, repeats: int = 20, timeout_s: float = 300.0
) -> list[dict[str, Any]]:
    """Time gradclip against torchtitan's pipeline clip on 2 stages x 2 dp ranks.

    Returns:
        One row per (data parallel, method): ``method``, ``dp``, ``ranks``,
        ``tensors`` (per stage), ``median_ms`` (rank 0), ``collectives`` and
        ``floats_sent`` (one steady call, rank 0), ``ratio`` (over torchtitan's
        clip with the same data parallel).

    Raises:
        RuntimeError: the worker processes failed or timed out.
    """
    config = {"layers": layers, "width": width, "repeats": repeats}
    return run_ranks(
        _worker,
        lambda address, cfg: (address, cfg),
        config,
        _WORLD,
        timeout_s,
        "the pipeline benchmark",
    )


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table."""
    header = (
        "method",
        "dp",
        "pp x dp",
        "tensors/stage",
        "median ms",
        "collectives",
        "sent",
        "ratio",
    )
    lines = [
        (
            str(r["method"]),
            str(r["dp"]),
            str(r["ranks"]),
            str(r["tensors"]),
            f"{r['median_ms']:.3f}",
            str(r["collectives"]),
            str(r["floats_sent"]),
            f"{r['ratio']:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
        for line in [header, *lines]
    )


class _Stage(nn.Module):
    def __init__(self, layers: int, width: int, stage: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        mine = range(stage * layers // 2, (stage + 1) * layers // 2)
        self.layers = nn.ModuleDict({str(i): nn.Linear(width, width) for i in mine})


def _titan_clip(params: list[nn.Parameter], max_norm: float, pp_group: Any) -> None:
    """torchtitan's ``clip_grad_norm_`` with ``pp_mesh``: two collectives under FSDP2."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the dp reduction
    total = total**2
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pp_group)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total.sqrt())


def _rows(mesh: Any, dp: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import gradclip

    model = _Stage(config["layers"], config["width"], mesh.get_local_rank("pp"))
    if dp == "fsdp2":
        for layer in model.layers.values():
            fully_shard(layer, mesh=mesh["dp"])
    x = torch.randn(8, config["width"])
    for layer in model.layers.values():
        x = torch.tanh(layer(x))
    x.square().sum().backward()  # type: ignore[no-untyped-call]
    params = list(model.parameters())
    pp_group = mesh["pp"].get_group()
    methods: list[tuple[str, Callable[[], object]]] = [
        ("torchtitan clip_grad_norm_(pp_mesh)", lambda: _titan_clip(params, 1.0, pp_group))
    ]
    for rule in _RULES:
        mode: Any = gradclip.ClipGlobalNorm(1.0) if rule == "ClipGlobalNorm" else rule
        normalizer = gradclip.GradientNormalizer(model, mode, 1.0, pp_mesh=mesh["pp"])
        methods.append((f"gradclip {rule}", normalizer.apply))
    rows: list[dict[str, Any]] = []
    for name, fn in methods:
        fn()  # the first call builds the plan and learns the stages' block lengths
        with CollectiveCounter() as counter:
            fn()
        median = _median_ms(fn, config["repeats"], 3, dist.barrier)
        rows.append(
            {
                "method": name,
                "dp": dp,
                "ranks": "2x2",
                "tensors": len(params),
                "median_ms": round(median, 4),
                "collectives": len(counter.ops),
                "floats_sent": sum(counter.elements),
            }
        )
    for row in rows:
        row["ratio"] = round(row["median_ms"] / rows[0]["median_ms"], 3)
    return rows


def _worker(rank: int, init_method: str, config: dict[str, Any]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    with gloo_rank(rank, _WORLD, init_method):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        rows = _rows(mesh, "fsdp2", config) + _rows(mesh, "ddp", config)
        if rank == 0:
            Path(config["out"]).write_text(json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    """``python -m gradclip.commands.bench_pipeline``: run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    rows = run_pipeline_bench(layers=args.layers, width=args.width, repeats=args.repeats)
    print(format_rows(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
