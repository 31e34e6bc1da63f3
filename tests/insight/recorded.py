"""Recorded training runs with faults injected at known steps, for the insight tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import gradclip

# layer names of `net()`: "0", "2", "4", "6", "8" (Tanh between them)
LAYERS = ["0", "2", "4", "6", "8"]


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 1),
    )


def train(
    path: Path,
    steps: int,
    *,
    mode: gradclip.Mode = None,
    seed: int = 0,
    model: nn.Sequential | None = None,
    before_backward: Callable[[int, nn.Sequential, list[torch.Tensor]], None] | None = None,
    after_backward: Callable[[int, nn.Sequential], None] | None = None,
    loss_scale: Callable[[int], float] | None = None,
    **record: object,
) -> gradclip.GradientNormalizer:
    """SGD on noisy random batches, recorded; the hooks inject faults by step."""
    model = model if model is not None else net(seed)
    normalizer = gradclip.GradientNormalizer(model, mode, record=path, **record)  # type: ignore[arg-type]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        x = torch.randn(32, 6, generator=gen) * (1 + torch.rand(1, generator=gen))
        y = x.sum(dim=1, keepdim=True).sin()
        acts: list[torch.Tensor] = []
        h = x
        for module in model:
            h = module(h)
            acts.append(h)
        if before_backward is not None:
            before_backward(step, model, acts)
        loss = (h - y).pow(2).mean() * (1.0 if loss_scale is None else loss_scale(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(step, model)
        normalizer.apply()
        optimizer.step()
    normalizer.close()
    return normalizer
