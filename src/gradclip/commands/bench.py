"""``python -m gradclip bench``: gradclip against torch's own functions, in the same run.

Each scenario builds gradients of a fixed shape, then times every method on
them, interleaving the methods repetition by repetition so that a slow moment
of the machine hurts all of them alike, and reports medians. Ratios are to the
scenario's reference, measured in the same run:

* ``gpt2`` — per-layer L2 clipping of GPT-2-small shaped gradients (12 blocks,
  768 wide, a 50257x768 embedding) against the *bandwidth floor*: one
  ``torch._foreach_norm`` plus one ``torch._foreach_mul_`` over all gradients,
  the least work any norm clipping can do.
* ``linear1000`` — 1000 x ``nn.Linear(64, 64)``: per-layer clipping against
  ``torch.nn.utils.clip_grad_norm_(foreach=True)`` (global) and against a loop
  of ``clip_grad_norm_`` over the modules (the per-layer equivalent in torch).
* ``value_large`` / ``value_small`` — ``ClipElementWiseAbsoluteValue`` against
  ``torch.nn.utils.clip_grad_value_(foreach=True)`` on 24 x ``nn.Linear(2048,
  2048)`` and on 1000 x ``nn.Linear(64, 64)``.
* ``strategies`` — each strategy beyond DL4J against ``clip_grad_norm_`` on the
  same gradients.
* ``small2000`` — 1000 x ``nn.Linear(8, 8)``, 2000 tensors of 8 or 64 elements:
  where the host's time per tensor is the whole cost. Per-layer and global
  clipping against ``clip_grad_norm_(foreach=True)``, element-wise against
  ``clip_grad_value_(foreach=True)``; on CUDA also the per-layer rule with the
  ``_foreach_mul_`` multiply (``GRADCLIP_KERNELS=foreach``) beside the Triton one.
* ``record`` — recording's cost: against ``measure_all=True`` (`bench_record`).
* ``train_step`` — a whole fused AdamW step on GPT-2-small shaped gradients:
  clipping folded into the optimizer, unfolded, and the AMP recipe without
  ``unscale_``, against torch's (`gradclip.commands.bench_step`).

Every scenario also times the *hardware floor*: a read pass and a read/write
pass over one flat buffer of the gradients' bytes (`bench_floor`), in the same
run; each row shows its time over that floor.

Besides the wall time of a call (``--cpu-time``: one thread's CPU time), each row
has its host time, on CUDA its GPU time, and what one call launches
(`bench_timing`). Extra memory is the peak of bytes allocated during one call
(CUDA: ``max_memory_allocated``; CPU: the profiler's allocation events).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

import gradclip
from gradclip.commands.bench_floor import READ, READ_WRITE, floor_methods, floor_ms
from gradclip.commands.bench_record import record_rows
from gradclip.commands.bench_rows import Row, format_table
from gradclip.commands.bench_step import train_step_rows
from gradclip.commands.bench_timing import (
    count_launches,
    cpu_time,
    peak_extra_bytes,
    time_methods,
)
from gradclip.commands.strategies import STRATEGY_FACTORIES, strategy_from_name
from gradclip.core.kernels import KERNELS_ENV, kernel_mode, kernel_path

__all__ = ["Row", "add_arguments", "run", "run_benchmarks"]

Method = Callable[[], object]


# -- gradients of fixed shapes --------------------------------------------------------


def _with_grads(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)  # weights matter to AGC
            p.requires_grad_(True)
            p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 3.0
    return model


def _linear_stack(count: int, width: int, device: torch.device) -> nn.Module:
    with torch.device("meta"):
        shapes = nn.Sequential(*[nn.Linear(width, width) for _ in range(count)])
    model = shapes.to_empty(device=device)
    return _with_grads(model)


class _GPT2Shapes(nn.Module):
    """Parameters with the shapes (and module names) of GPT-2 small; no forward."""

    def __init__(self, blocks: int = 12, width: int = 768, vocab: int = 50257) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(1024, width)
        self.h = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Module()
            block.ln_1 = nn.LayerNorm(width)
            block.c_attn = nn.Linear(width, 3 * width)
            block.attn_proj = nn.Linear(width, width)
            block.ln_2 = nn.LayerNorm(width)
            block.c_fc = nn.Linear(width, 4 * width)
            block.mlp_proj = nn.Linear(4 * width, width)
            self.h.append(block)
        self.ln_f = nn.LayerNorm(width)


def _gpt2(device: torch.device, blocks: int) -> nn.Module:
    with torch.device("meta"):
        shapes = _GPT2Shapes(blocks=blocks)
    return _with_grads(shapes.to_empty(device=device))


# -- scenarios --------------------------------------------------------------------------


def _floor(grads: list[torch.Tensor], device: torch.device) -> Method:
    one = torch.ones((), device=device)

    def floor() -> None:
        torch._foreach_norm(grads)
        torch._foreach_mul_(grads, one)

    return floor


def _params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _scenario(
    name: str,
    methods: Mapping[str, Method],
    reference: str,
    targets: dict[str, float],
    device: torch.device,
    reps: int,
    measure_memory: set[str],
    *,
    grads: list[torch.Tensor],
    passes: tuple[str, ...] = (READ, READ_WRITE),
    floor_targets: Mapping[str, float] | None = None,
) -> list[Row]:
    """Time ``methods`` and the hardware floor of ``grads`` (`bench_floor`), interleaved."""
    methods = {**methods, **floor_methods(grads, device)}
    timings = time_methods(methods, device, reps)
    floor = floor_ms(timings, passes)
    rows = []
    for method, timing in timings.items():
        extra = peak_extra_bytes(methods[method], device) if method in measure_memory else None
        ratio = None if method == reference else timing.wall_ms / timings[reference].wall_ms
        rows.append(
            Row(
                name,
                method,
                timing.wall_ms,
                ratio,
                reference,
                targets.get(method),
                extra,
                timing.host_ms,
                timing.gpu_ms,
                count_launches(methods[method], device),
                timing.wall_ms / floor,
                (floor_targets or {}).get(method),
            )
        )
    return rows


def _gpt2_rows(device: torch.device, reps: int, blocks: int) -> list[Row]:
    model = _gpt2(device, blocks)
    params = _params(model)
    grads = [p.grad for p in params if p.grad is not None]
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1.0)
    methods = {
        "floor: _foreach_norm + _foreach_mul_": _floor(grads, device),
        "gradclip ClipL2PerLayer": normalizer.apply,
        "torch clip_grad_norm_ (global)": lambda: nn.utils.clip_grad_norm_(
            params, 1.0, foreach=True
        ),
    }
    return _scenario(
        "gpt2",
        methods,
        "floor: _foreach_norm + _foreach_mul_",
        {"gradclip ClipL2PerLayer": 1.10},
        device,
        reps,
        {"gradclip ClipL2PerLayer"},
        grads=grads,
        floor_targets={"gradclip ClipL2PerLayer": 1.15},
    )


def _linear1000_rows(device: torch.device, reps: int) -> list[Row]:
    model = _linear_stack(1000, 64, device)
    params = _params(model)
    modules = list(model.children())
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1.0)

    def per_module_loop() -> None:
        for module in modules:
            nn.utils.clip_grad_norm_(module.parameters(), 1.0, foreach=True)

    methods = {
        "torch clip_grad_norm_ (global)": lambda: nn.utils.clip_grad_norm_(
            params, 1.0, foreach=True
        ),
        "gradclip ClipL2PerLayer": normalizer.apply,
        "gradclip normalize_ ClipL2PerLayer": lambda: gradclip.normalize_(
            model, "ClipL2PerLayer", 1.0
        ),
        "torch clip_grad_norm_ per module (loop)": per_module_loop,
    }
    return _scenario(
        "linear1000",
        methods,
        "torch clip_grad_norm_ (global)",
        {"gradclip ClipL2PerLayer": 0.8},
        device,
        reps,
        {"gradclip ClipL2PerLayer"},
        grads=_grads(params),
    )


def _value_rows(
    name: str, model: nn.Module, target: float, device: torch.device, reps: int
) -> list[Row]:
    params = _params(model)
    normalizer = gradclip.GradientNormalizer(model, "ClipElementWiseAbsoluteValue", 1.0)
    methods = {
        "torch clip_grad_value_": lambda: nn.utils.clip_grad_value_(params, 1.0, foreach=True),
        "gradclip ClipElementWiseAbsoluteValue": normalizer.apply,
    }
    return _scenario(
        name,
        methods,
        "torch clip_grad_value_",
        {"gradclip ClipElementWiseAbsoluteValue": target},
        device,
        reps,
        {"gradclip ClipElementWiseAbsoluteValue"},
        grads=_grads(params),
        passes=(READ_WRITE,),  # one pass: clamp in place
    )


def _strategy_rows(device: torch.device, reps: int) -> list[Row]:
    model = _linear_stack(24, 1024, device)
    params = _params(model)
    methods: dict[str, Method] = {
        "torch clip_grad_norm_ (global)": lambda: nn.utils.clip_grad_norm_(
            params, 1.0, foreach=True
        ),
        "gradclip ClipL2PerLayer": gradclip.GradientNormalizer(model, "ClipL2PerLayer").apply,
    }
    for name in STRATEGY_FACTORIES:
        strategy = strategy_from_name(name, 1.0)
        methods[f"gradclip {strategy.describe()}"] = gradclip.GradientNormalizer(
            model, strategy
        ).apply
    return _scenario(
        "strategies",
        methods,
        "torch clip_grad_norm_ (global)",
        {},
        device,
        reps,
        set(),
        grads=_grads(params),
    )


@contextlib.contextmanager
def _kernels(value: str) -> Iterator[None]:
    """``GRADCLIP_KERNELS=value`` while normalizers are built (their plans read it)."""
    old = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[KERNELS_ENV]
        else:
            os.environ[KERNELS_ENV] = old


def _small2000_rows(device: torch.device, reps: int) -> list[Row]:
    model = _linear_stack(1000, 8, device)
    params = _params(model)
    methods: dict[str, Method] = {
        "torch clip_grad_norm_ (global)": lambda: nn.utils.clip_grad_norm_(
            params, 1.0, foreach=True
        ),
        "gradclip ClipGlobalNorm": gradclip.GradientNormalizer(
            model, gradclip.ClipGlobalNorm(1.0)
        ).apply,
        "gradclip ClipL2PerLayer": gradclip.GradientNormalizer(model, "ClipL2PerLayer").apply,
    }
    if kernel_path(device, torch.float32) == "triton":
        with _kernels("foreach"):
            methods["gradclip ClipL2PerLayer (foreach multiply)"] = gradclip.GradientNormalizer(
                model, "ClipL2PerLayer"
            ).apply
    methods["torch clip_grad_value_"] = lambda: nn.utils.clip_grad_value_(params, 1.0, foreach=True)
    methods["gradclip ClipElementWiseAbsoluteValue"] = gradclip.GradientNormalizer(
        model, "ClipElementWiseAbsoluteValue"
    ).apply
    return _scenario(
        "small2000",
        methods,
        "torch clip_grad_norm_ (global)",
        {"gradclip ClipL2PerLayer": 1.0, "gradclip ClipGlobalNorm": 1.0},
        device,
        reps,
        set(),
        grads=_grads(params),
    )


SCENARIOS = (
    "gpt2",
    "linear1000",
    "value_large",
    "value_small",
    "strategies",
    "small2000",
    "train_step",
    "record",
)


def run_benchmarks(
    scenarios: tuple[str, ...] = SCENARIOS,
    *,
    device: torch.device | None = None,
    reps: int = 20,
    gpt2_blocks: int = 12,
) -> Iterator[Row]:
    """Yield the rows of the chosen scenarios (see the module docstring)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for scenario in scenarios:
        if scenario == "gpt2":
            yield from _gpt2_rows(device, reps, gpt2_blocks)
        elif scenario == "linear1000":
            yield from _linear1000_rows(device, reps * 5)
        elif scenario == "value_large":
            yield from _value_rows(
                "value_large", _linear_stack(24, 2048, device), 0.55, device, reps
            )
        elif scenario == "value_small":
            yield from _value_rows(
                "value_small", _linear_stack(1000, 64, device), 1.0, device, reps * 5
            )
        elif scenario == "strategies":
            yield from _strategy_rows(device, reps)
        elif scenario == "small2000":
            yield from _small2000_rows(device, reps * 5)
        elif scenario == "train_step":
            yield from train_step_rows(_gpt2(device, gpt2_blocks), device, reps)
        elif scenario == "record":
            yield from record_rows(_scenario, _linear_stack, _gpt2, device, reps, gpt2_blocks)
        else:
            raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m gradclip bench``."""
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable); default: all",
    )
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (default 20)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few repetitions and 2 GPT-2 blocks instead of 12: checks the bench runs, "
        "its figures are not the ones to quote",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU: time 1 thread by its CPU time, not the wall clock (for a busy machine)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="also time apply() on 2 gloo ranks against clip_grad_norm_ (FSDP2 shards), and "
        "on 2 pipeline stages x 2 data-parallel ranks against torchtitan's pipeline clip",
    )
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="the relative error of norms against float64, gradclip's and torch's, up to 1e8 "
        "values (1e6 with --quick); only this unless --scenario is given",
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table; returns 0."""
    device = torch.device(args.device) if args.device else None
    reps = 3 if args.quick else args.reps
    scenarios = tuple(args.scenario) if args.scenario else SCENARIOS
    threads = torch.get_num_threads()
    print(f"gradclip {gradclip.__version__}, torch {torch.__version__}, {threads} threads")
    where = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if where.type == "cuda":
        print(f"device {torch.cuda.get_device_name(where)}")
    multiply = kernel_path(where, torch.float32)
    print(f"multiply of float32 gradients: {multiply} ({KERNELS_ENV}={kernel_mode()})")
    if getattr(args, "accuracy", False):
        from gradclip.commands.bench_accuracy import SIZES, accuracy_rows, format_accuracy

        sizes = SIZES[:4] if args.quick else SIZES
        print(format_accuracy(accuracy_rows(where, sizes)))
        if not args.scenario:
            return 0
        print()
    rows = []
    with cpu_time(where) if getattr(args, "cpu_time", False) else contextlib.nullcontext():
        for row in run_benchmarks(
            scenarios, device=device, reps=reps, gpt2_blocks=2 if args.quick else 12
        ):
            rows.append(row)
            print(f"  {row.scenario:<12} {row.method:<45} {row.median_ms:9.3f} ms", flush=True)
    print()
    print(format_table(rows))
    if args.distributed:
        from gradclip.commands.bench_distributed import format_rows, run_distributed_bench

        print()
        print("distributed: FSDP2 on 2 gloo CPU ranks, medians of rank 0")
        print(format_rows(run_distributed_bench(repeats=5 if args.quick else 30)))
        from gradclip.commands import bench_pipeline

        print()
        print("pipeline: 2 stages x 2 data-parallel gloo CPU ranks, medians of rank 0")
        staged = bench_pipeline.run_pipeline_bench(repeats=5 if args.quick else 20)
        print(bench_pipeline.format_rows(staged))
    return 0
