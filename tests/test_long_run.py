"""A long, spiky, interrupted run: what AutoClip and ZClip exist for.

2,000 steps of a small two-headed model, attached to its optimizer, with a loss
spike every 97 steps, a NaN step, an inf step, a head that trains every other
step only, and a trunk layer frozen until step 500. Half-way the run is saved,
and a fresh interpreter resumes it from the saved files: the resumed weights
equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.state import unpack_tensor

STEPS = 2000
HALF = 1000
SPIKE_EVERY = 97
NAN_STEP, INF_STEP, UNFREEZE = 700, 1300, 500
RULES: dict[str, tuple[gradclip.Rule, str]] = {
    "zclip-global": (gradclip.ZClip(warmup_steps=25), "zero"),
    "zclip-layer": (gradclip.ZClip(warmup_steps=25, scope="layer"), "skip"),
    "autoclip-global": (gradclip.AutoClip(10.0), "skip"),
    "autoclip-layer": (gradclip.AutoClip(10.0, history_size=300, scope="layer"), "zero"),
}


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 12)
        self.trunk = nn.Linear(12, 12)
        self.head_a = nn.Linear(12, 2)
        self.head_b = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.trunk(torch.tanh(self.embed(x))))
        return self.head_a(h), self.head_b(h)


def build(name: str) -> tuple[TwoHeads, torch.optim.Optimizer, gradclip.GradientNormalizer]:
    rule, nonfinite = RULES[name]
    model = TwoHeads()
    model.embed.requires_grad_(False)  # unfrozen at step UNFREEZE
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    normalizer = gradclip.GradientNormalizer(model, rule, nonfinite=nonfinite)
    normalizer.attach(optimizer)
    return model, optimizer, normalizer


def step(model: TwoHeads, optimizer: torch.optim.Optimizer, i: int) -> float:
    """One training step; returns the loss scale (the spike factor)."""
    if i == UNFREEZE:
        model.embed.requires_grad_(True)
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(8, 6, generator=gen)
    out_a, out_b = model(x)
    loss = out_a.pow(2).mean()
    if i % 2:  # head_b trains on every other step only
        loss = loss + (out_b - 1).pow(2).mean()
    spike = 1000.0 if i % SPIKE_EVERY == SPIKE_EVERY - 1 else 1.0
    optimizer.zero_grad(set_to_none=True)
    (spike * loss).backward()
    if i in (NAN_STEP, INF_STEP):
        model.trunk.weight.grad[0, 0] = math.nan if i == NAN_STEP else math.inf
    optimizer.step()
    return spike


def run(name: str, start: int, stop: int, folder: Path | None = None) -> dict[str, Any]:
    """Steps [start, stop) of run ``name``; loads from / saves to ``folder`` at ``HALF``."""
    model, optimizer, normalizer = build(name)
    if start > 0:
        assert folder is not None
        saved = torch.load(folder / f"{name}.pt", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        normalizer.load_state_dict(saved["normalizer"])
        model.embed.requires_grad_(start >= UNFREEZE)
    unclipped: list[int] = []
    for i in range(start, stop):
        spike = step(model, optimizer, i)
        report = normalizer.last_report
        assert report is not None
        if spike > 1 and not report.changed_layers():
            unclipped.append(i)
        if folder is not None and i + 1 == HALF and start == 0:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "normalizer": normalizer.state_dict(),
                },
                folder / f"{name}.pt",
            )
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "unclipped_spikes": unclipped,
        "state": normalizer.state_dict(),
    }


def _resume_in_fresh_process(folder: Path) -> None:
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import test_long_run as t; "
        "out = {n: t.run(n, t.HALF, t.STEPS, __import__('pathlib').Path(sys.argv[2]))['weights'] "
        "for n in t.RULES}; torch.save(out, sys.argv[2] + '/resumed.pt')"
    )
    here = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", code, here, str(folder)], check=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("long_run")
    full = {name: run(name, 0, STEPS, folder) for name in RULES}
    _resume_in_fresh_process(folder)
    resumed = torch.load(folder / "resumed.pt", weights_only=True)
    return {"full": full, "resumed": resumed}


@pytest.mark.parametrize("name", list(RULES))
def test_long_run_ends_finite_with_every_spike_clipped(runs: dict[str, Any], name: str) -> None:
    result = runs["full"][name]
    assert all(torch.isfinite(w).all() for w in result["weights"])
    assert result["unclipped_spikes"] == []
    for slot in result["state"]["rules"].values():  # the statistics never took in NaN or inf
        for row in slot["rows"].values():
            for value in row.values():
                tensor = unpack_tensor(value) if isinstance(value, dict) else value
                assert torch.isfinite(tensor.double()).all()


@pytest.mark.parametrize("name", list(RULES))
def test_resume_in_a_fresh_process_is_bit_identical(runs: dict[str, Any], name: str) -> None:
    full, resumed = runs["full"][name]["weights"], runs["resumed"][name]
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))


def test_per_layer_statistics_follow_each_layer_by_name(runs: dict[str, Any]) -> None:
    (slot,) = runs["full"]["zclip-layer"]["state"]["rules"].values()
    counts = {layer: int(row["count"]) for layer, row in slot["rows"].items()}
    # embed: from step 500 on; head_b: every other step; one step skipped for inf/NaN
    assert counts["trunk"] == STEPS - 2 and counts["head_a"] == STEPS - 2
    assert counts["embed"] == STEPS - UNFREEZE - 2
    assert counts["head_b"] == STEPS // 2  # its steps are odd: neither bad step is one
