"""Models, rules and fixtures shared by the tests of the multi-tensor scaling kernel.

The kernel runs on CUDA tensors where CUDA exists and otherwise on CPU tensors
through Triton's interpreter, which `interpreted` switches on for the tests that
ask for it (the kernel module must be imported while ``TRITON_INTERPRET=1`` is
set: Triton decides at decoration time whether a kernel is interpreted).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

import gradclip

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@pytest.fixture(scope="module")
def kernel_device() -> Iterator[torch.device]:
    """Where the kernel runs: CUDA, else the CPU through Triton's interpreter."""
    if CUDA:
        yield torch.device("cuda")
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        from gradclip.core import triton_scale

        if not type(triton_scale._scale_kernel).__name__.startswith("Interpreted"):
            # imported before without the interpreter: decorate the kernel again
            importlib.reload(triton_scale)
        yield torch.device("cpu")


def scaling_rules() -> dict[str, Callable[[], dict[str, Any]]]:
    """Every scaling rule (and mixes of them), as keyword arguments of a `GradientNormalizer`."""
    return {
        "ClipL2PerLayer": lambda: {"mode": "ClipL2PerLayer", "threshold": 1.0},
        "ClipL2PerParamType": lambda: {"mode": "ClipL2PerParamType", "threshold": 0.5},
        "RenormalizeL2PerLayer": lambda: {"mode": "RenormalizeL2PerLayer"},
        "RenormalizeL2PerParamType": lambda: {"mode": "RenormalizeL2PerParamType"},
        "ClipGlobalNorm": lambda: {"mode": gradclip.ClipGlobalNorm(2.0)},
        "ClipGlobalNorm(inf)": lambda: {"mode": gradclip.ClipGlobalNorm(0.5, norm_type="inf")},
        "AutoClip": lambda: {"mode": gradclip.AutoClip(percentile=50.0)},
        "ZClip": lambda: {"mode": gradclip.ZClip(alpha=0.5, z_thresh=0.1, warmup_steps=1)},
        "chain": lambda: {
            "mode": gradclip.chain("ClipL2PerLayer", gradclip.ClipGlobalNorm(3.0)),
        },
        "chain+elementwise": lambda: {
            "mode": gradclip.chain(("ClipElementWiseAbsoluteValue", 0.5), "ClipL2PerLayer"),
        },
        "overrides": lambda: {
            "mode": "ClipL2PerLayer",
            "overrides": {"l1": gradclip.ClipGlobalNorm(1.0), "l2": "RenormalizeL2PerLayer"},
        },
    }


class _Layer(nn.Module):
    def __init__(self, k: int, dtype: torch.dtype, big: bool) -> None:
        super().__init__()
        rows, cols = k % 5 + 1, k % 3 + 2
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(cols, dtype=dtype))
        if k % 2 == 0:
            self.scale = nn.Parameter(torch.zeros((), dtype=dtype))  # 0-d
        if k % 4 == 1:
            self.empty = nn.Parameter(torch.zeros(0, cols, dtype=dtype))
        if big:  # several programs of the kernel for one tensor
            self.table = nn.Parameter(torch.zeros(40_000, dtype=dtype))


def mixed_model(
    layers: int = 64,
    device: torch.device | str = "cpu",
    dtypes: tuple[torch.dtype, ...] = DTYPES,
) -> nn.Module:
    """``layers`` layers of 2 to 5 tensors each, of every dtype, 0-d and empty ones among them.

    Layer ``l{i}`` has dtype ``dtypes[i % len(dtypes)]``; the first layer of each
    dtype also has a 40,000-element tensor (several programs of the kernel).
    """
    model = nn.Module()
    for i in range(layers):
        model.add_module(f"l{i}", _Layer(i, dtypes[i % len(dtypes)], big=i < len(dtypes)))
    return model.to(device)


def set_grads(model: nn.Module, seed: int, *, in_place: bool = False) -> None:
    """Fresh gradients: some layers far above norm 1, others far below (left unchanged by clips);
    some transposed (dense, not contiguous) and some strided (not dense).

    ``in_place``: write the values into the gradients there are, at their addresses.
    """
    gen = torch.Generator().manual_seed(seed)
    for i, (_, layer) in enumerate(model.named_children()):
        scale = 10.0 if (i + seed) % 3 else 0.01
        for name, p in layer.named_parameters():
            device = p.device
            shape = tuple(p.shape)
            if name == "weight" and i % 7 == 3:
                g = torch.randn(shape[::-1], generator=gen).t()
            elif name == "weight" and i % 7 == 5:
                g = torch.randn(shape[0], 2 * shape[1], generator=gen)[:, ::2]
            else:
                g = torch.randn(shape, generator=gen)
            g = (g * scale).to(device=device, dtype=p.dtype)
            if in_place:
                p.grad.copy_(g)
            else:
                p.grad = g


def fill_dense_grads(model: nn.Module, seed: int, scale: float = 10.0) -> None:
    """Contiguous random gradients on each parameter's device and dtype.

    Written into the existing gradients where there are some, so that their
    addresses stay those of the previous step (as a training loop that zeroes its
    gradients in place, or a caching allocator replaying the same allocations).
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        g = (torch.randn(p.shape, generator=gen) * scale).to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)


def assert_matches(got: torch.Tensor, want: torch.Tensor, *, exact: bool) -> None:
    """``got`` equals ``want`` bit for bit, or (16-bit dtypes, ``exact=False``) within 1 ulp.

    Under Triton's interpreter a float32 → bfloat16 cast truncates where the GPU
    rounds to nearest-even; on CUDA, PyTorch's per-tensor ``mul_`` by a 0-d float32
    tensor rounds the coefficient to the gradient's 16-bit dtype before it
    multiplies (``BinaryFunctor<scalar_t, ...>`` in ``Loops.cuh``) where the kernel
    keeps it in float32. Either way the two results are at most 1 ulp apart.
    """
    assert got.dtype == want.dtype and got.shape == want.shape
    if exact or got.dtype not in (torch.float16, torch.bfloat16):
        assert torch.equal(got, want)
    else:
        assert ulp_distance(got, want) <= 1


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two tensors of one 16-bit dtype."""
    if a.numel() == 0:
        return 0
    ia = a.contiguous().view(torch.int16).to(torch.int32)
    ib = b.contiguous().view(torch.int16).to(torch.int32)
    return int((ia - ib).abs().max())


class CountingLaunches:
    """Stands in for the Triton kernel and counts its launches.

    The launch itself runs outside any dispatch mode: under ``TRITON_INTERPRET=1``
    Triton emulates the kernel with torch operations on the host, which a CUDA
    launch does not issue. With ``execute=False`` it is only counted: Triton's
    interpreter keeps the arguments of its last launch alive until the next one,
    which a CUDA launch does not, and which a test of what a step allocates must
    not mistake for gradclip's.
    """

    def __init__(self, kernel: Any, *, execute: bool = True) -> None:
        self.kernel = kernel
        self.execute = execute
        self.launches = 0

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = self.kernel[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            self.launches += 1
            if not self.execute:
                return None
            with _disable_current_modes():
                return launch(*args, **kwargs)

        return run


@contextlib.contextmanager
def kernels_env(value: str) -> Iterator[None]:
    """``GRADCLIP_KERNELS=value`` while active: plans built meanwhile use that multiply."""
    old = os.environ.get("GRADCLIP_KERNELS")
    os.environ["GRADCLIP_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ["GRADCLIP_KERNELS"]
        else:
            os.environ["GRADCLIP_KERNELS"] = old
