"""`gradclip demo --calibrate`: on the mixed-scale task, record a run, read it, calibrate.

An unnormalized run of the mixed-scale regression is recorded
(``GradientNormalizer(model, None, record=...)``); its findings name the layer
that dominates the global norm; `gradclip.insight.calibrate` turns its norms
into thresholds, per layer and network-wide, at ``percentile``; and each
calibrated configuration is trained from the same weights and batches,
beside the demo's hand-set per-layer run (`ClipL2PerLayer`, threshold 1.0).

Examples:
    >>> print(calibrated_demo(seed=0, quick=True, steps=60))  # doctest: +ELLIPSIS
    recorded ...: the layer 'input' carries ... of the squared global norm
    ...
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradclip import insight
from gradclip.commands.demo.config import DemoConfig
from gradclip.commands.demo.task import TASKS
from gradclip.normalizer import GradientNormalizer

__all__ = ["calibrated_demo"]


def _train(cfg: DemoConfig, initial: nn.Module, eval_set: Any, build: Any) -> float:
    """The demo's SGD loop (same batches, same weights); returns the held-out MSE."""
    task = TASKS[cfg.task]
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    normalizer = build(model)
    normalizer.attach(optimizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        x, y = task.batch(cfg.batch, cfg, generator)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    normalizer.close()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(eval_set[0]), eval_set[1]))


def calibrated_demo(
    seed: int = 0, *, quick: bool = False, percentile: float = 10.0, **overrides: Any
) -> str:
    """Record, report and calibrate on the mixed-scale task; the comparison as text.

    Args:
        seed: the demo's seed.
        quick: the task's ``--quick`` settings.
        percentile: the calibration's percentile.
        **overrides: other `DemoConfig` fields (``steps``, ``lr``).
    """
    cfg = DemoConfig.for_task("scales", quick=quick, seed=seed, **overrides)
    task = TASKS["scales"]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            initial = task.model(cfg)
        eval_set = task.batch(cfg.eval_size, cfg, torch.Generator().manual_seed(seed + 1_000_003))
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "scales.gcrec"
            plain = _train(
                cfg, initial, eval_set, lambda m: GradientNormalizer(m, None, record=path)
            )
            run = insight.load(path)
            top = insight.findings(run)["dominant"][0]
            layer = insight.calibrate(run, percentile, "layer")
            network = insight.calibrate(run, percentile, "network")
        results = [
            ("no normalization (recorded)", plain),
            (
                "hand-set: ClipL2PerLayer(threshold=1.0)",
                _train(
                    cfg, initial, eval_set, lambda m: GradientNormalizer(m, "ClipL2PerLayer", 1.0)
                ),
            ),
        ]
        for name, cal in (("per-layer", layer), ("network-wide", network)):
            shown = ", ".join(f"{k} {v:.3g}" for k, v in cal.layers.items() if v is not None)
            config = cal.config()
            mse = _train(
                cfg, initial, eval_set, lambda m, c=config: GradientNormalizer.from_config(m, c)
            )  # type: ignore[misc]
            results.append((f"calibrated {name} p{percentile:g}: {shown}", mse))
    finally:
        torch.set_num_threads(saved)
    lines = [
        f"recorded {cfg.steps} steps: the layer {top['layer']!r} carries "
        f"{100 * top['share']:.0f}% of the squared global norm",
        f"{'run':<64}  test MSE",
    ]
    lines += [f"{name:<64}  {mse:8.4f}" for name, mse in results]
    lines.append(f"baseline (predict the mean){'':<37}  {task.baseline(eval_set[1]):8.4f}")
    return "\n".join(lines)
