"""Record the run of the README's figure: a 12-layer tanh MLP with faults at known steps.

SGD on a noisy regression, per-layer clipping at 1.0 with ``nonfinite="zero"``;
layer ``layers.1`` is frozen, ``layers.9``'s gradient is scaled by 1e-9 (it
vanishes), ``layers.6``'s gradient spikes 1000x at steps 400 and 1100, and a
NaN enters the backward pass at ``layers.3``'s output at step 800.

    python tools/record_example.py run.gcrec
    gradclip report run.gcrec --plot docs/img/gradients.png
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import gradclip


def main(path: str, steps: int = 1500) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(12)])
    model.layers[1].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", 1.0, nonfinite="zero", record=path
    )
    normalizer.attach(optimizer)
    data = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(64, 16, generator=data)
        h = x
        for i, layer in enumerate(model.layers):
            h = torch.tanh(layer(h))
            if i == 3 and step == 800:
                h.register_hook(lambda g: g * float("nan"))
        loss = (h - x.flip(1).sin()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        for p in model.layers[9].parameters():
            p.grad.mul_(1e-9)  # type: ignore[union-attr]
        if step in (400, 1100):
            for p in model.layers[6].parameters():
                p.grad.mul_(1e3)  # type: ignore[union-attr]
        optimizer.step()
    normalizer.close()


if __name__ == "__main__":
    main(sys.argv[1])
