"""A step launch by launch: nothing per tensor, nothing new after the first step, capturable.

Counted on the CPU with the Triton kernel through its interpreter: the aten ops
of a step (each is one launch, or a bounded number of multi-tensor launches, on
CUDA; see docs/gpu.md) and the launches of the Triton kernel.
"""

from __future__ import annotations

import gc
from collections import Counter
from typing import Any

import pytest
import torch
from helpers import SYNC_OPS, OpCounter, fill_grads, mlp
from kernel_models import (
    CUDA,
    HAS_TRITON,
    CountingLaunches,
    fill_dense_grads,
    kernel_device,
    kernels_env,
    mixed_model,
    needs_triton,
    scaling_rules,
    set_grads,
)
from torch.utils._python_dispatch import TorchDispatchMode

import gradclip

__all__ = ["kernel_device"]  # a fixture, imported to be found by pytest

COUNTED_RULES = ("ClipL2PerLayer", "ClipGlobalNorm", "ZClip", "chain", "overrides")


def _kernels(normalizer: gradclip.GradientNormalizer) -> list[Any]:
    plan = normalizer._engine._plan
    assert plan is not None
    return [r.kernel for rd in plan.rounds if rd.scaled for r in rd.scaled.runs if r.kernel]


def _counted_step(
    normalizer: gradclip.GradientNormalizer, monkeypatch: pytest.MonkeyPatch, execute: bool
) -> tuple[Counter[str], int]:
    from gradclip.core import triton_scale

    launcher = CountingLaunches(triton_scale._scale_kernel, execute=execute)
    with monkeypatch.context() as mp:
        mp.setattr(triton_scale, "_scale_kernel", launcher)
        with OpCounter() as counter:
            normalizer.apply()
    return counter.ops, launcher.launches


@needs_triton
@pytest.mark.parametrize("rule", COUNTED_RULES)
def test_launches_per_step_are_the_same_for_12_and_1200_tensors(
    kernel_device: torch.device, rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = scaling_rules()[rule]()
    if rule == "overrides":  # mlp's layers are "0", "1", ...
        kwargs["overrides"] = {"1": gradclip.ClipGlobalNorm(1.0), "2": "RenormalizeL2PerLayer"}
    counted = {}
    for layers in (6, 600):
        model = mlp(layers, width=2).to(kernel_device)
        assert sum(1 for _ in model.parameters()) == 2 * layers
        with kernels_env("triton"):
            normalizer = gradclip.GradientNormalizer(model, **kwargs)
            fill_dense_grads(model, seed=0)
            normalizer.apply()  # the first step builds the kernels' tables
            fill_dense_grads(model, seed=1)
            # the interpreter runs 1,200 programs slowly: the launches of the other
            # rules are counted, not run (their results are tested in test_kernels)
            execute = CUDA or layers < 100 or rule == "ClipL2PerLayer"
            counted[layers] = _counted_step(normalizer, monkeypatch, execute)
        assert [k.refreshes for k in _kernels(normalizer)] == [1] * len(_kernels(normalizer))
    (ops_small, launches_small), (ops_large, launches_large) = counted[6], counted[600]
    rounds = 2 if rule == "chain" else 1
    assert launches_small == launches_large == rounds  # one run (float32), one launch a round
    assert ops_small == ops_large  # the same aten ops, as many times: none per tensor
    assert "_foreach_mul_" not in ops_large  # the multiply is the kernel's
    assert not SYNC_OPS & set(ops_large)


# -- what a steady step creates ----------------------------------------------------------------

# Ops that make device data from host data: ``torch.tensor(python_values)`` (then a
# host -> device copy of pageable memory, which a CUDA graph cannot capture and
# whose data would be frozen into the graph if it could).
HOST_DATA_OPS = {"lift_fresh", "lift_fresh_copy"}


class DeviceDataWatch(TorchDispatchMode):
    """Records the ops of a step that bring host data to the device or read device data back.

    * ``host_data``: tensors made from Python values (`HOST_DATA_OPS`);
    * ``transfers``: copies between devices (``_to_copy``/``copy_`` whose input and
      output are on different devices): on CUDA, host <-> device transfers;
    * ``syncs``: reads of device values by the host (`helpers.SYNC_OPS`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.host_data: list[str] = []
        self.transfers: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        out = func(*args, **kwargs)
        if name in HOST_DATA_OPS:
            self.host_data.append(name)
        if name in SYNC_OPS:
            self.syncs.append(name)
        if name in ("_to_copy", "copy_", "to", "_copy_from"):
            devices = {
                t.device for t in [*args, *kwargs.values(), out] if isinstance(t, torch.Tensor)
            }
            if len(devices) > 1:
                self.transfers.append(f"{name} {sorted(map(str, devices))}")
        return out


def _net_host_bytes(step: Any) -> int:
    """Bytes allocated and not freed while ``step()`` runs (CPU tensors), from the profiler."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    return int(sum(e.self_cpu_memory_usage for e in prof.events()))


@needs_triton
@pytest.mark.parametrize("rule", ["ClipL2PerLayer", "ZClip", "chain"])
def test_a_steady_step_creates_no_device_data(
    kernel_device: torch.device, rule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the first step nothing persists that a step made, and nothing comes from the host.

    What a CUDA graph needs of a step, besides no host sync: every tensor the
    step keeps (rule state, coefficient buffers, the kernel's table) is written in
    place at the addresses of the first step, and no step copies host data in.
    Temporaries are allowed: a captured graph takes them from its private pool
    and reuses them at every replay. Measured on the CPU: the net bytes a step
    allocates with its report dropped (the profiler's allocation events) must be
    zero, and a dispatch mode must see no tensor made from Python data, no copy
    between devices and no host read. On the CPU the kernel's launch is counted
    but not run (see `CountingLaunches`); its results are tested elsewhere.
    """
    from gradclip.core import triton_scale

    model = mixed_model(24, kernel_device, (torch.float32, torch.float16))
    with kernels_env("triton"):
        normalizer = gradclip.GradientNormalizer(model, **scaling_rules()[rule]())
    for seed in range(2):  # the first steps build the plan, the tables and the state
        set_grads(model, seed, in_place=seed > 0)
        normalizer.apply()
    kernels = _kernels(normalizer)
    assert len(kernels) == 2 * (2 if rule == "chain" else 1)  # float32 and float16 runs
    set_grads(model, 5, in_place=True)
    launcher = CountingLaunches(triton_scale._scale_kernel, execute=CUDA)
    monkeypatch.setattr(triton_scale, "_scale_kernel", launcher)
    gc.collect()
    watch = DeviceDataWatch()

    def step() -> None:
        with watch:
            normalizer.apply()
        normalizer.last_report = None  # the report is the step's output

    if kernel_device.type == "cuda":
        normalizer.last_report = None  # the warm-up step's output, freed by the step below
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
    else:
        assert _net_host_bytes(step) == 0
    assert (watch.host_data, watch.transfers, watch.syncs) == ([], [], [])
    assert launcher.launches == len(kernels)
    assert [k.refreshes for k in kernels] == [1] * len(kernels)  # no new table, no copy


def test_a_steady_step_creates_no_device_data_on_the_foreach_path() -> None:
    model = mlp(8)
    with kernels_env("foreach"):
        normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.5)
    for seed in range(2):
        fill_grads(model, seed=seed)
        normalizer.apply()
    for p, g in zip(model.parameters(), fill_grads(mlp(8), seed=7)):
        p.grad.copy_(g)
    watch = DeviceDataWatch()

    def step() -> None:
        with watch:
            normalizer.apply()
        normalizer.last_report = None

    assert _net_host_bytes(step) == 0
    assert (watch.host_data, watch.transfers, watch.syncs) == ([], [], [])


def test_the_watch_sees_what_it_looks_for() -> None:
    keep = []
    watch = DeviceDataWatch()

    def leaky() -> None:
        with watch:
            keep.append(torch.tensor([1.0, 2.0]))  # host data, kept
            keep.append(torch.ones(3).to("meta"))  # a copy between devices
            keep.append(torch.ones(2).sum().item())  # a host read

    assert _net_host_bytes(leaky) > 0
    assert watch.host_data == ["lift_fresh"]
    assert len(watch.transfers) == 1 and watch.syncs == ["_local_scalar_dense"]


# -- CUDA graphs ---------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("path", ["foreach", "triton"])
@pytest.mark.parametrize("rule", ["ClipL2PerLayer", "ClipGlobalNorm", "ZClip"])
def test_a_step_captured_in_a_cuda_graph_replays_the_eager_step(path: str, rule: str) -> None:
    if path == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    kwargs = scaling_rules()[rule]()
    models = [mixed_model(24, "cuda", (torch.float32, torch.bfloat16)) for _ in range(2)]
    with kernels_env(path):
        eager, graphed = (gradclip.GradientNormalizer(m, **kwargs) for m in models)
    for model in models:
        set_grads(model, 0)  # gradients at fixed addresses: the graph reads them there
    static = [p.grad for p in models[1].parameters()]

    def load(seed: int) -> None:
        set_grads(models[0], seed)
        for p, g in zip(models[0].parameters(), static):
            g.copy_(p.grad)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for seed in range(3):  # warm-up: plans, tables, state, allocator
            load(seed)
            eager.apply()
            graphed.apply()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.apply()
    for seed in range(3, 6):
        load(seed)
        eager.apply()
        graph.replay()
        torch.cuda.synchronize()
        for p, g in zip(models[0].parameters(), static):
            # per-layer sums use atomics on CUDA: equal up to the order of additions
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=0)
