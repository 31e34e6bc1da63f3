"""The benchmark's measuring parts, on the CPU (its CUDA parts need a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from gradclip.commands import bench
from gradclip.commands.bench_timing import Launches, count_launches, cpu_time, time_methods

CPU = torch.device("cpu")


def test_count_launches_counts_top_level_ops_on_the_cpu() -> None:
    x = torch.ones(4)

    def three_ops() -> None:
        (x + 1).sum().neg()  # aten::add, aten::sum, aten::neg; nested ops not counted

    launches = count_launches(three_ops, CPU, steps=2)
    assert launches == Launches(kernels=3, copies_to_device=0, kernel_ms=None)


def test_time_methods_reports_host_time_and_no_gpu_time_on_the_cpu() -> None:
    x = torch.ones(1000)
    timings = time_methods({"a": lambda: x.mul(2), "b": lambda: x.add(1)}, CPU, reps=3)
    assert set(timings) == {"a", "b"}
    for timing in timings.values():
        assert timing.gpu_ms is None
        assert 0 < timing.host_ms <= timing.wall_ms


def test_small2000_compares_gradclip_with_torch_on_2000_tensors() -> None:
    rows = bench._small2000_rows(CPU, reps=1)
    methods = {row.method: row for row in rows}
    assert set(methods) >= {
        "torch clip_grad_norm_ (global)",
        "gradclip ClipL2PerLayer",
        "gradclip ClipGlobalNorm",
        "torch clip_grad_value_",
        "gradclip ClipElementWiseAbsoluteValue",
    }
    for row in rows:
        assert row.host_ms is not None and row.launches is not None and row.gpu_ms is None
    # gradclip's per-layer step: a few dozen ops however many tensors
    assert methods["gradclip ClipL2PerLayer"].launches.kernels < 60  # type: ignore[union-attr]
    table = bench.format_table(rows)
    assert "| host ms | GPU ms | launches |" in table and table.count("| small2000 |") == len(rows)


def test_the_bench_keeps_the_profilers_own_lines_off_stderr() -> None:
    """Kineto writes a USDT line to file descriptor 2 on every profiler start and stop."""
    code = (
        "import sys, torch\n"
        "from gradclip.commands.bench_timing import count_launches, peak_extra_bytes\n"
        "x = torch.ones(4)\n"
        "count_launches(lambda: x + 1, torch.device('cpu'), steps=1)\n"
        "peak_extra_bytes(lambda: x + 1, torch.device('cpu'))\n"
        "print('mine', file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stderr == "mine\n"
    # what the profiler's block writes that is not its noise still reaches stderr
    code = (
        "import os\n"
        "from gradclip.commands.bench_timing import quiet_profiler\n"
        "with quiet_profiler():\n"
        "    os.write(2, b'USDT: noise\\nkept\\n')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stderr == "kept\n"


def test_cpu_time_counts_one_threads_work_not_the_wall_clock() -> None:
    threads = torch.get_num_threads()
    x = torch.ones(1 << 16)
    methods = {"sleep": lambda: time.sleep(0.05), "work": lambda: [x.sum() for _ in range(200)]}
    with cpu_time(CPU):
        assert torch.get_num_threads() == 1
        timings = time_methods(methods, CPU, reps=2)
    assert torch.get_num_threads() == threads  # restored
    assert timings["sleep"].wall_ms < 25  # a sleep costs no CPU time; the wall clock says 50
    assert timings["work"].wall_ms > 0
    assert time_methods(methods, CPU, reps=1)["sleep"].wall_ms >= 50  # the wall clock again


def test_cpu_time_refuses_a_gpu_before_changing_anything() -> None:
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="--device cpu"), cpu_time(torch.device("cuda")):
        pass
    assert torch.get_num_threads() == threads
