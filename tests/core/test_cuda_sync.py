"""Every rule's steady step on CUDA under ``torch.cuda.set_sync_debug_mode("error")``.

The CPU tests count host reads with a dispatch mode; a read that happens inside
an aten kernel (a check with ``.item()`` in C++) is seen only by CUDA's own sync
debug mode. Each rule runs three steps on a GPU model of float32 or bfloat16
layers, the last two in "error" mode, and gives the CPU's gradients. Skipped
without CUDA (run by ``tools/gpu_check.sh`` on a GPU machine).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import gradclip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

RULES: dict[str, Any] = {
    "None": "None",
    "RenormalizeL2PerLayer": "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType": "RenormalizeL2PerParamType",
    "ClipElementWiseAbsoluteValue": "ClipElementWiseAbsoluteValue",
    "ClipL2PerLayer": "ClipL2PerLayer",
    "ClipL2PerParamType": "ClipL2PerParamType",
    "ClipGlobalNorm(2)": gradclip.ClipGlobalNorm(1.0),
    "ClipGlobalNorm(inf)": gradclip.ClipGlobalNorm(1.0, norm_type="inf"),
    "AdaptiveGradClip": gradclip.AdaptiveGradClip(0.01),
    "AutoClip(global)": gradclip.AutoClip(),
    "AutoClip(layer)": gradclip.AutoClip(scope="layer"),
    "ZClip(global)": gradclip.ZClip(),
    "ZClip(layer)": gradclip.ZClip(scope="layer"),
    "chain": gradclip.chain(gradclip.ClipL2PerLayer(1.0), gradclip.ClipGlobalNorm(2.0)),
}


def _model(device: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(24)]).to(device=device, dtype=dtype)


def _set_grads(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for i, p in enumerate(model.parameters()):
        scale = 10.0 if (i + step) % 3 else 0.01
        p.grad = (scale * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype)


def _steps(device: str, rule: Any, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    model = _model(device, dtype)
    normalizer = gradclip.GradientNormalizer(model, rule, threshold=1.0)
    grads = []
    for step in range(3):
        _set_grads(model, step)
        if device == "cuda" and step > 0:  # step 0 builds the plan and the kernel's table
            torch.cuda.set_sync_debug_mode("error")
        try:
            normalizer.apply()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        grads.append([p.grad.detach().float().cpu() for p in model.parameters()])
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(RULES))
def test_a_steady_step_never_synchronizes_and_gives_the_cpu_gradients(
    name: str, dtype: torch.dtype
) -> None:
    on_gpu = _steps("cuda", RULES[name], dtype)
    on_cpu = _steps("cpu", RULES[name], dtype)
    # float32: rounding of differently ordered sums; bfloat16: one ulp of the gradient
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    for gpu_step, cpu_step in zip(on_gpu, on_cpu):
        for a, b in zip(gpu_step, cpu_step):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7)
