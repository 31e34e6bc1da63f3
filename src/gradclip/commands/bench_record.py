"""The ``record`` scenario of `gradclip bench`: what recording costs `apply()`.

The same configuration with ``measure_all=True`` (every layer measured, as a
recording needs) is the reference, so the ratio is the recording's own cost:
its per-step device writes and, every ``record_every`` (100) steps, the copy
to the host and the write to a temporary file. On 1000 ``nn.Linear(64, 64)``
layers and on GPT-2-small shaped gradients.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradclip

__all__ = ["MEASURE_ALL", "RECORD", "record_rows"]

MEASURE_ALL = "gradclip ClipL2PerLayer measure_all"
RECORD = "gradclip ClipL2PerLayer record"
TARGET = 1.03  # at most 3% over the same normalizer without the recording


def record_rows(
    scenario: Callable[..., list[Any]],
    linear_stack: Callable[[int, int, torch.device], nn.Module],
    gpt2: Callable[[torch.device, int], nn.Module],
    device: torch.device,
    reps: int,
    blocks: int,
) -> list[Any]:
    """Rows of ``scenario`` (bench's table builder) on both models."""
    models: dict[str, Callable[[], nn.Module]] = {
        "linear1000": lambda: linear_stack(1000, 64, device),
        "gpt2": lambda: gpt2(device, blocks),
    }
    rows: list[Any] = []
    with tempfile.TemporaryDirectory() as directory:
        for name, build in models.items():
            model = build()
            plain = gradclip.GradientNormalizer(model, "ClipL2PerLayer", measure_all=True)
            recording = gradclip.GradientNormalizer(
                model, "ClipL2PerLayer", record=Path(directory) / f"{name}.gcrec"
            )
            methods = {MEASURE_ALL: plain.apply, RECORD: recording.apply}
            # linear1000 is quick: more repetitions, as the linear1000 scenario does
            count = reps * 5 if name == "linear1000" else reps
            targets = {RECORD: TARGET}
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            rows += scenario(
                f"record {name}", methods, MEASURE_ALL, targets, device, count, set(), grads=grads
            )
            recording.close()
    return rows
