"""Norms of large tensors: within 1e-6 of float64 at every size, in every floating dtype.

PyTorch's own CPU norm is off by more than 1e-6 from 2^18 float32 values (2^13
in half precision); each case here at such sizes fails with ``_foreach_norm``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.kernels import Runs
from gradclip.core.row_norms import HALF_CHUNK, LARGE_VALUES, ROW_VALUES

CPU = torch.device("cpu")
HALVES = (torch.bfloat16, torch.float16)


def _data(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=gen)
    elif kind == "positive":  # every rounding error has the same sign: the worst case
        x = torch.rand(shape, generator=gen)
    else:  # values over many binades
        x = torch.randn(shape, generator=gen) * torch.exp(4 * torch.randn(shape, generator=gen))
    return x.to(dtype)


def _exact(t: torch.Tensor, p: float) -> float:
    return float(torch.linalg.vector_norm(t.double(), p))


def _runs_norms(tensors: list[torch.Tensor], p: float) -> torch.Tensor:
    runs = Runs(
        range(len(tensors)),
        [(t.device, t.dtype) for t in tensors],
        [t.numel() == 0 for t in tensors],
        numels=[t.numel() for t in tensors],
    )
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    return runs.norms(tensors, p, CPU, acc)


SIZES = (
    LARGE_VALUES - 1,
    LARGE_VALUES,
    ROW_VALUES[torch.float32] * 7 + 1,
    HALF_CHUNK + 3,
    (1 << 18) + 5,
    1_000_003,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "positive", "wide"])
def test_norms_are_within_1e_6_of_float64_at_every_size(dtype: torch.dtype, kind: str) -> None:
    if kind == "wide" and dtype == torch.float16:
        pytest.skip("float16 cannot hold values over that many binades")
    tensors = [_data(kind, (n,), dtype, seed=n) for n in SIZES]
    for p in (1.0, 2.0, 3.0):
        got = _runs_norms(tensors, p)
        for t, value in zip(tensors, got.tolist(), strict=True):
            if p != 2.0 and t.numel() < LARGE_VALUES:
                continue  # PyTorch's own accuracy: ~1e-5 for L1 of a few thousand values
            want = _exact(t, p)
            assert abs(value - want) <= 1e-6 * want, (dtype, kind, p, t.numel())


def test_the_largest_half_precision_tensors_take_the_chunked_path_exactly() -> None:
    # more than one chunk, and a last chunk with a partial row
    n = 3 * HALF_CHUNK + ROW_VALUES[torch.bfloat16] // 2 + 1
    for dtype in HALVES:
        t = _data("positive", (n,), dtype, seed=3)
        got = float(_runs_norms([t], 2.0)[0])
        assert abs(got - _exact(t, 2.0)) <= 1e-6 * _exact(t, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dense_tensors_in_any_layout_and_sliced_views_are_measured_exactly(
    dtype: torch.dtype,
) -> None:
    base = _data("positive", (600, 2000), dtype, seed=5)
    tensors = [
        base.t(),  # transposed
        _data("positive", (4, 64, 40, 40), dtype, seed=6).to(memory_format=torch.channels_last),
        base[:, ::2],  # not dense: measured whole, in float64
        base,
    ]
    got = _runs_norms(tensors, 2.0)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    for t, value in zip(tensors, got.tolist(), strict=True):
        assert abs(value - _exact(t, 2.0)) <= tolerance * _exact(t, 2.0)


def test_non_finite_values_read_as_the_reference_does() -> None:
    t = torch.ones(50_000)
    t[7] = math.inf
    assert math.isinf(float(_runs_norms([t], 2.0)[0]))
    t[9] = math.nan
    assert math.isnan(float(_runs_norms([t], 2.0)[0]))


def test_small_and_large_tensors_of_one_run_keep_their_order() -> None:
    sizes = [5, 100_000, 7, 0, 9_000, 3]
    tensors = [_data("normal", (n,), torch.float32, seed=i) for i, n in enumerate(sizes)]
    for p in (1.0, 2.0, math.inf):
        got = _runs_norms(tensors, p)
        want = [_exact(t, p) if t.numel() else 0.0 for t in tensors]
        assert got.tolist() == pytest.approx(want, rel=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# 2.0514135... is the worst of 10^5 constants for rows of 1024 values (1.05e-6 off),
# 5.0228786... the worst for rows of 768 (8.2e-7)
@pytest.mark.parametrize("value", [0.1, 0.7, 2.0514135360717773, 5.022878646850586])
def test_constant_data_the_worst_case_is_within_1e_6_of_float64(
    dtype: torch.dtype, value: float
) -> None:
    # every square equal: every rounding of every row's sum goes the same way
    for n in (LARGE_VALUES, 1 << 20, 1_000_000, 3 * HALF_CHUNK + 5):
        t = torch.full((n,), value, dtype=dtype)
        want = math.sqrt(n) * abs(float(t[0].double()))
        got = float(_runs_norms([t], 2.0)[0])
        assert abs(got - want) <= 1e-6 * want, (dtype, value, n, got / want - 1)


def test_1e8_float32_values_are_within_1e_6_of_float64() -> None:
    # one size at 1e8 (400 MB), all positive: torch's own norm is off by ~1e-2 here
    n = 10**8
    t = torch.empty(n).uniform_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    want = math.sqrt(sum(float(c.double().square().sum()) for c in t.split(1 << 24)))
    got = float(_runs_norms([t], 2.0)[0])
    assert abs(got - want) <= 1e-6 * want


def test_rules_and_the_report_read_the_exact_norms() -> None:
    model = nn.Linear(1000, 600)  # a 600,000-value weight: torch's norm is ~1e-5 off
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.rand(p.shape, generator=gen) + 0.5
    assert model.weight.grad is not None
    weight = model.weight.grad.clone()
    whole = math.sqrt(
        sum(_exact(p.grad, 2.0) ** 2 for p in model.parameters() if p.grad is not None)
    )
    normalizer = gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(1.0))
    report = normalizer.apply()
    (layer,) = report.layer_norms.values()
    assert abs(float(layer) - whole) <= 1e-6 * whole
    assert abs(float(report.total_norm()) - whole) <= 1e-6 * whole
    weight_norm = float(report.param_norms[next(iter(report.param_norms))])
    assert abs(weight_norm - _exact(weight, 2.0)) <= 1e-6 * _exact(weight, 2.0)
    # the rule clipped with the exact norm: the result has norm 1 to float32 rounding
    clipped = math.sqrt(
        sum(_exact(p.grad, 2.0) ** 2 for p in model.parameters() if p.grad is not None)
    )
    assert clipped == pytest.approx(1.0, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_norms_are_within_1e_6_of_float64(dtype: torch.dtype) -> None:
    sizes = (1000, 100_000, 10_000_000) + ((10**8,) if dtype == torch.float32 else ())
    tensors = [torch.rand(n, device="cuda", generator=None).to(dtype) for n in sizes]
    runs = Runs(
        range(len(tensors)),
        [(t.device, t.dtype) for t in tensors],
        [False] * len(tensors),
        numels=list(sizes),
    )
    got = runs.norms(tensors, 2.0, tensors[0].device, torch.float32).tolist()
    for t, value in zip(tensors, got, strict=True):
        want = _exact(t, 2.0)
        assert abs(value - want) <= 1e-6 * want, (dtype, t.numel())


def test_each_step_returns_new_norms_that_later_steps_leave_alone() -> None:
    # reports keep the norms tensor of their step: it must not be a reused buffer
    tensors = [torch.ones(100_000), torch.ones(10)]
    runs = Runs(range(2), [(CPU, torch.float32)] * 2, [False, False], numels=[100_000, 10])
    first = runs.norms(tensors, 2.0, CPU, torch.float32)
    kept = first.clone()
    for t in tensors:
        t.mul_(3.0)
    second = runs.norms(tensors, 2.0, CPU, torch.float32)
    assert torch.equal(first, kept)
    assert second.tolist() == pytest.approx([3 * x for x in kept.tolist()], rel=1e-6)
