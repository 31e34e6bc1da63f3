"""The demo's figure: per task, the training loss and each run's per-layer gradient norms.

Needs matplotlib (the `plot` extra) and results recorded with `record_every > 0`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gradclip.commands.demo.results import DemoResults

__all__ = ["MATPLOTLIB_HINT", "plot"]

#: What to install for --plot (the package is not on an index: no `gradclip[plot]`).
MATPLOTLIB_HINT = "--plot needs matplotlib: pip install matplotlib"


def _smoothed(values: Sequence[float]) -> list[float]:
    # A running mean over up to 25 steps, so that the noisy per-step MSE reads as a curve.
    losses = torch.tensor(values, dtype=torch.float64)
    window = max(1, min(25, len(values) // 20))
    if window == 1 or len(values) < window:
        return losses.tolist()
    kernel = torch.ones(1, 1, window, dtype=torch.float64) / window
    padded = torch.cat([losses[:1].repeat(window - 1), losses])
    return nn.functional.conv1d(padded.view(1, 1, -1), kernel).view(-1).tolist()


def plot(results: Sequence[DemoResults] | DemoResults, path: str) -> None:
    """Draw one row per task: the training loss of every run, then each run's layer norms.

    Args:
        results: what `run_demo` returned, for one task or several (one seed each).
        path: the image file to write (the format follows the extension).

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: no results, or results recorded without per-layer norms.
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [results] if isinstance(results, DemoResults) else list(results)
    if not tasks:
        raise ValueError("nothing to plot")
    if any(not r.norm_steps for res in tasks for r in res.runs if r.steps_run > 0):
        raise ValueError("plot needs per-layer norms: run the demo with record_every > 0")
    columns = 1 + max(len(res.runs) for res in tasks)
    fig, axes = plt.subplots(
        len(tasks),
        columns,
        figsize=(4.2 * columns, 3.6 * len(tasks)),
        constrained_layout=True,
        squeeze=False,
    )
    for row, res in zip(axes, tasks):
        cfg = res.config
        loss_ax = row[0]
        for r in res.runs:
            loss_ax.plot(range(len(r.losses)), _smoothed(r.losses), label=r.label, linewidth=1)
            if r.diverged_step is not None:
                loss_ax.axvline(r.diverged_step, color="red", linestyle=":", linewidth=1)
        loss_ax.axhline(res.baseline, color="gray", linestyle="--", label="baseline (mean)")
        loss_ax.set_yscale("log")
        loss_ax.set_ylim(top=max(10.0, res.baseline * 10))
        loss_ax.set_xlabel("step")
        loss_ax.set_ylabel("training MSE")
        loss_ax.set_title(f"{res.task.title}: loss", fontsize=10)
        loss_ax.legend(fontsize=7)
        for ax, r in zip(row[1:], res.runs):
            few = len(r.norm_steps) < 100
            for layer, values in r.layer_norms.items():
                ax.plot(
                    r.norm_steps,
                    [math.nan if v is None else v for v in values],
                    label=f"layer {layer!r}",
                    linewidth=1.0 if few else 0.6,
                    marker="o" if few else None,
                    markersize=3,
                )
            if r.key != "none":
                ax.axhline(cfg.threshold, color="black", linestyle="--", label="threshold")
            title = r.label
            if r.diverged_step is not None:
                ax.axvline(r.diverged_step, color="red", linestyle=":", label="diverged")
                title += f"\ndiverged at step {r.diverged_step}, stopped"
                # A run that stopped early gets its own x range, or it would be a dot at 0.
                ax.set_xlim(0, max(r.steps_run, 2))
            else:
                ax.set_xlim(0, cfg.steps)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("layer gradient norm before clipping")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        for ax in row[1 + len(res.runs) :]:
            ax.axis("off")
    fig.suptitle("per-layer gradient norms and training loss (python -m gradclip demo --plot)")
    fig.savefig(path, dpi=80)
    plt.close(fig)
