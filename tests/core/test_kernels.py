"""The multiply of a step: path selection, and the Triton kernel against ``_foreach_mul_``.

The kernel tests run on CUDA where it exists, otherwise on CPU tensors through
Triton's interpreter; they skip where Triton is not installed.
"""

from __future__ import annotations

import doctest

import pytest
import torch
from helpers import fill_grads, mlp
from kernel_models import (
    CUDA,
    DTYPES,
    assert_matches,
    kernel_device,
    kernels_env,
    mixed_model,
    needs_triton,
    scaling_rules,
    set_grads,
)

import gradclip
from gradclip.core import kernels

__all__ = ["kernel_device"]  # a fixture, imported to be found by pytest


# -- choosing the path (no Triton needed) -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, "auto"), ("", "auto"), ("Foreach", "foreach"), (" triton ", "triton")],
)
def test_kernel_mode_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, mode: str
) -> None:
    if value is None:
        monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.KERNELS_ENV, value)
    assert kernels.kernel_mode() == mode


def test_auto_and_foreach_pick_foreach_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is never picked by auto
    for dtype in DTYPES:
        assert kernels.kernel_path(torch.device("cpu"), dtype, "auto") == "foreach"
        assert kernels.kernel_path(torch.device("cpu"), dtype, "foreach") == "foreach"
    assert kernels.kernel_path(torch.device("meta"), torch.float32, "auto") == "foreach"


def test_an_unknown_mode_is_refused_before_any_gradient_is_touched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = mlp(3)
    before = fill_grads(model)
    monkeypatch.setenv(kernels.KERNELS_ENV, "cuda-graphs")
    with pytest.raises(ValueError, match="GRADCLIP_KERNELS='cuda-graphs'"):
        gradclip.normalize_(model, "ClipL2PerLayer", 0.1)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("interpret", [False, True])
def test_forced_triton_where_it_cannot_run_is_refused(
    monkeypatch: pytest.MonkeyPatch, interpret: bool
) -> None:
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    if interpret:  # the interpreter is there, but Triton is not installed
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
        match = "triton is not installed"
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        match = "TRITON_INTERPRET=1"
    model = mlp(3)
    before = fill_grads(model)
    with pytest.raises(RuntimeError, match=match):
        gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.1).apply()
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_forced_triton_refuses_other_devices_and_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="not meta"):
        kernels.kernel_path(torch.device("meta"), torch.float32, "triton")
    with pytest.raises(RuntimeError, match=r"no kernel for torch\.float8_e4m3fn"):
        kernels.kernel_path(torch.device("cpu"), torch.float8_e4m3fn, "triton")


def test_a_kernel_that_cannot_be_built_is_refused_or_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    if not CUDA:  # a first import under the interpreter would stay interpreted on CUDA
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from gradclip.core import triton_scale

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    monkeypatch.setattr(triton_scale, "compile_error", lambda device, dtype: "no toolchain")
    cpu = torch.device("cpu")
    keys = [(cpu, torch.float32)] * 3
    monkeypatch.setenv(kernels.KERNELS_ENV, "triton")
    with pytest.raises(RuntimeError, match=r"could not be built for torch\.float32 .*no toolchain"):
        kernels.Runs([0, 1, 2], keys, [False] * 3, scaled=True)
    # under auto (here: as if the tensors were on CUDA) the run keeps _foreach_mul_
    monkeypatch.setenv(kernels.KERNELS_ENV, "auto")
    monkeypatch.setattr(kernels, "kernel_path", lambda device, dtype, mode=None: "triton")
    with pytest.warns(RuntimeWarning, match="multiplying with _foreach_mul_"):
        runs = kernels.Runs([0, 1, 2], keys, [False] * 3, scaled=True)
    assert runs.runs[0].kernel is None
    tensors = [torch.ones(2) for _ in range(3)]
    runs.scale_(tensors, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert [t.tolist() for t in tensors] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]


def test_docstring_examples_run() -> None:
    assert doctest.testmod(kernels, raise_on_error=True).attempted > 0


@needs_triton
def test_kernel_docstring_examples_run(kernel_device: torch.device) -> None:
    from gradclip.core import triton_scale

    assert doctest.testmod(triton_scale, raise_on_error=True).attempted > 0


# -- the kernel ------------------------------------------------------------------------------


@needs_triton
def test_is_dense_tells_apart_the_layouts_the_kernel_can_address(
    kernel_device: torch.device,
) -> None:
    from gradclip.core.triton_scale import is_dense

    x = torch.zeros(4, 6)
    assert is_dense(x) and is_dense(x.t()) and is_dense(torch.zeros(()))
    assert is_dense(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert is_dense(x[:, None, :].transpose(0, 1))  # a size-1 dim's stride is free
    assert not is_dense(x[:, ::2]) and not is_dense(x[1:3, 1:3])
    assert not is_dense(torch.zeros(3).expand(4, 3))  # overlapping


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_the_foreach_multiply(
    kernel_device: torch.device, dtype: torch.dtype
) -> None:
    from gradclip.core.triton_scale import CHUNK, TritonScale

    gen = torch.Generator().manual_seed(1)
    shapes = [(), (1,), (0, 3), (7, 5), (CHUNK + 3,), (3, 4)] * 40  # 240 tensors
    tensors = [(torch.randn(s, generator=gen) * 5).to(kernel_device, dtype) for s in shapes]
    tensors[9] = tensors[9].t()  # dense, not contiguous
    tensors[15] = torch.randn(3, 8, generator=gen).to(kernel_device, dtype)[:, ::2]  # not dense
    coefficients = torch.rand(len(tensors), generator=gen, dtype=torch.float64)
    coefficients[::3] = 1.0
    coefficients = coefficients.to(kernel_device)
    acc = kernels.accumulation_dtype(dtype)
    buffer = coefficients.to(acc)
    # the kernel's arithmetic: widened, multiplied, rounded to nearest-even
    expected = [(t.to(acc) * c).to(dtype) for t, c in zip(tensors, buffer)]
    if kernel_device.type == "cpu":  # where it is also the foreach path's, bit for bit
        foreach = [t.clone() for t in tensors]
        torch._foreach_mul_(foreach, list(buffer.unbind(0)))
        assert all(torch.equal(a, b) for a, b in zip(foreach, expected))
    before = [t.clone() for t in tensors]

    interpreted = kernel_device.type == "cpu"
    kernel = TritonScale(kernel_device, dtype)
    rest = kernel.scale_(tensors, coefficients, 0)
    assert rest == (15,)
    for i in rest:
        tensors[i].mul_(buffer[i])
    for i, (got, want, old) in enumerate(zip(tensors, expected, before)):
        if coefficients[i] == 1:
            assert torch.equal(got, old), i  # untouched
        else:  # the interpreter truncates to bfloat16
            assert_matches(got, want, exact=not (interpreted and dtype == torch.bfloat16))


@needs_triton
def test_table_is_rebuilt_only_when_the_tensors_move(kernel_device: torch.device) -> None:
    from gradclip.core.triton_scale import TritonScale

    tensors = [torch.ones(5, device=kernel_device) for _ in range(4)]
    c = torch.full((4,), 2.0, device=kernel_device)
    kernel = TritonScale(kernel_device, torch.float32)
    for _ in range(3):
        kernel.scale_(tensors, c, 0)
    assert kernel.refreshes == 1 and all(t.eq(8.0).all() for t in tensors)
    tensors[2] = torch.ones(5, device=kernel_device)  # new storage
    kernel.scale_(tensors, c, 0)
    assert kernel.refreshes == 2 and tensors[2].eq(2.0).all() and tensors[1].eq(16.0).all()
    storage = torch.ones(12, device=kernel_device)
    tensors[3] = storage[:5]
    kernel.scale_(tensors, c, 0)
    tensors[3] = storage[:4].view(2, 2).t()  # same pointer, other extent and strides
    kernel.scale_(tensors, c, 0)
    assert kernel.refreshes == 4
    assert storage.tolist() == [4.0] * 4 + [2.0] + [1.0] * 7


@needs_triton
@pytest.mark.parametrize("rule", sorted(scaling_rules()))
def test_every_scaling_rule_gives_the_foreach_results(
    kernel_device: torch.device, rule: str
) -> None:
    """Hundreds of tensors of every dtype, 0-d, empty, transposed and strided, over 2-3 steps.

    A chain measures its later rules' norms on what the earlier ones left, so a
    1-ulp difference in a 16-bit tensor moves every later coefficient: on the
    interpreter (which truncates to bfloat16) chains run without bfloat16 and are
    compared bit for bit; on CUDA they are compared within rounding.
    """
    kwargs = scaling_rules()[rule]()
    interpreted = kernel_device.type == "cpu"
    rounds = 2 if "chain" in rule else 1
    dtypes = tuple(d for d in DTYPES if not (interpreted and rounds > 1 and d == torch.bfloat16))
    models = {path: mixed_model(72, kernel_device, dtypes) for path in ("foreach", "triton")}
    assert sum(1 for _ in models["triton"].parameters()) >= 200
    normalizers = {}
    for path, model in models.items():
        with kernels_env(path):
            normalizers[path] = gradclip.GradientNormalizer(model, **kwargs)
    changed = 0
    for step in range(3 if rule in ("AutoClip", "ZClip") else 2):  # stateful rules: a history
        for model in models.values():
            set_grads(model, seed=step)
        before = [p.grad.clone() for p in models["foreach"].parameters()]
        for path, normalizer in normalizers.items():
            with kernels_env(path):
                normalizer.apply()
        reference = [p.grad for p in models["foreach"].parameters()]
        results = [p.grad for p in models["triton"].parameters()]
        for old, want, got in zip(before, reference, results):
            assert got.dtype == want.dtype and got.shape == want.shape
            if torch.equal(want, old):
                assert torch.equal(got, old)  # unchanged, in every dtype
                continue
            changed += 1
            if rounds > 1 and not interpreted:
                torch.testing.assert_close(got, want)
            else:
                assert_matches(got, want, exact=interpreted and got.dtype != torch.bfloat16)
    assert changed > 0
    assert kernel_runs(normalizers["triton"]) and not kernel_runs(normalizers["foreach"])


def kernel_runs(normalizer: gradclip.GradientNormalizer) -> list[object]:
    """The Triton kernels of the normalizer's current plan."""
    plan = normalizer._engine._plan
    assert plan is not None
    return [r.kernel for rd in plan.rounds if rd.scaled for r in rd.scaled.runs if r.kernel]
