"""A picture of a recording: log-norm heatmap (layers × steps) and each layer's distribution.

Left, the heatmap of ``log10`` gradient norms, one row per layer in model
order, with spikes circled, non-finite steps marked in red above it and, below
it, the share of layers the rule clipped at each step. Right, each row's
distribution of norms (5th–95th percentile bar, quartile box, median tick)
with its calibrated threshold as a red mark (the P-th percentile of the row's
norms, `gradclip.insight.calibrate`'s rule).
With more than ``max_rows`` layers, rows are consecutive groups of layers
(the group's norm is the root of the sum of their squared norms), and with
more than ``max_columns`` steps, columns are consecutive steps (their
largest norm): the figure says so in its title. Needs matplotlib (the
``plot`` extra).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from gradclip.insight.calibrate import DEFAULT_PERCENTILE, percentiles
from gradclip.insight.findings import findings
from gradclip.insight.reader import RecordedRun

__all__ = ["plot_run"]


def _groups(count: int, max_rows: int) -> list[list[int]]:
    size = -(-count // max_rows) if count > max_rows else 1
    return [list(range(i, min(i + size, count))) for i in range(0, count, size)]


def _bin(values: np.ndarray[Any, Any], size: int, how: str) -> np.ndarray[Any, Any]:
    """Columns combined ``size`` at a time: their largest finite value, or their mean."""
    if size == 1:
        return values
    pad = -values.shape[1] % size
    padded = np.pad(values, ((0, 0), (0, pad)), constant_values=np.nan)
    shaped = padded.reshape(values.shape[0], -1, size)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN bin stays NaN
        out: np.ndarray[Any, Any] = (
            np.nanmax(shaped, axis=2) if how == "max" else np.nanmean(shaped, axis=2)
        )
        return out


def plot_run(
    run: RecordedRun,
    out: str | os.PathLike[str],
    *,
    found: dict[str, Any] | None = None,
    percentile: float = DEFAULT_PERCENTILE,
    max_rows: int = 60,
    max_columns: int = 1000,
    title: str | None = None,
) -> None:
    """Draw ``run`` into the image file ``out`` (PNG, SVG, PDF: by its suffix).

    Args:
        run: the recording, from `gradclip.insight.load`.
        out: the image file.
        found: its findings, if already computed (`gradclip.insight.findings`).
        percentile: the calibration whose thresholds are drawn.
        max_rows: layers drawn one per row up to this many; beyond, groups.
        max_columns: steps drawn one per column up to this many; beyond, bins.
        title: the figure's title (default: the recording's file name).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = found if found is not None else findings(run)
    layers, steps = run.layers, run.steps
    if not len(steps) or not layers:
        raise ValueError(f"{str(run.path)!r} holds no step to draw")
    norms = np.asarray(run.norms, dtype=np.float64)
    has = run.has_gradient()
    valid = has & np.isfinite(norms)
    groups = _groups(len(layers), max_rows)
    squares = np.where(valid, norms * norms, 0.0)
    rows = np.stack([np.sqrt(squares[:, g].sum(axis=1)) for g in groups], axis=1)
    row_valid = np.stack([valid[:, g].any(axis=1) for g in groups], axis=1)
    rows = np.where(row_valid, rows, np.nan)
    with np.errstate(divide="ignore"):
        logs = np.where(row_valid & (rows > 0), np.log10(np.where(rows > 0, rows, 1.0)), np.nan)
    size = -(-len(steps) // max_columns)
    image = _bin(logs.T, size, "max")
    clipped = (run.changed() & has).sum(axis=1) / np.maximum(has.sum(axis=1), 1)
    clipped_binned = _bin(clipped[None, :].astype(np.float64), size, "mean")[0]

    height = max(3.0, min(0.14 * len(groups) + 1.6, 12.0))
    fig = plt.figure(figsize=(12, height + 1.2), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1.2), height_ratios=(height, 0.9))
    heat = fig.add_subplot(grid[0, 0])
    dist = fig.add_subplot(grid[0, 1], sharey=heat)
    strip = fig.add_subplot(grid[1, 0], sharex=heat)
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(groups) - 0.5, -0.5)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    shown = heat.imshow(image, aspect="auto", interpolation="nearest", extent=extent, cmap=cmap)
    fig.colorbar(shown, ax=dist, label="log10 gradient norm", fraction=0.12)
    labels = [
        (layers[g[0]] or "(root)") if len(g) == 1 else f"{layers[g[0]]} … {layers[g[-1]]}"
        for g in groups
    ]
    heat.set_yticks(range(len(groups)), labels, fontsize=7 if len(groups) > 20 else 9)
    row_of = {lid: r for r, g in enumerate(groups) for lid in g}
    index = {name: i for i, name in enumerate(layers)}
    spikes = found["spikes"]
    if spikes:
        heat.scatter(
            [s["step"] for s in spikes],
            [row_of[index[s["layer"]]] for s in spikes],
            s=40,
            facecolors="none",
            edgecolors="red",
            linewidths=1.2,
            label="spike",
        )
    bad_steps = steps[(has & ~np.isfinite(norms)).any(axis=1)]
    if len(bad_steps):
        heat.scatter(
            bad_steps,
            np.full(len(bad_steps), -0.5),
            marker="v",
            color="red",
            s=30,
            clip_on=False,
            label="non-finite step",
        )
    if spikes or len(bad_steps):
        heat.legend(loc="upper right", fontsize=8, framealpha=0.8)
    heat.set_ylabel("layer (model order)")
    strip.fill_between(
        np.linspace(float(steps[0]), float(steps[-1]), len(clipped_binned)),
        clipped_binned,
        step="mid",
        color="tab:orange",
    )
    strip.set_ylim(0, 1)
    strip.set_ylabel("clipped", fontsize=8)
    strip.set_xlabel("step")

    # the calibration's rule on each row: a layer's own threshold, or its group's
    stats = percentiles(rows, row_valid & (rows > 0), [5, 25, 50, 75, 95, percentile])
    y = np.arange(len(groups))
    dist.hlines(y, stats[0], stats[4], color="0.5", linewidth=1)
    dist.hlines(y, stats[1], stats[3], color="tab:blue", linewidth=5)
    dist.scatter(stats[2], y, marker="|", color="white", s=30, zorder=3)
    if np.isfinite(stats[5]).any():
        dist.scatter(
            stats[5],
            y,
            marker="|",
            color="red",
            s=80,
            zorder=4,
            label=f"threshold (p{percentile:g})",
        )
        dist.legend(loc="best", fontsize=8)
    dist.set_xscale("log")
    dist.set_xlabel("norm: 5–95% and quartiles")
    dist.tick_params(labelleft=False)
    note = (
        f"; rows: {len(layers)} layers in {len(groups)} groups of ≤ {len(groups[0])}"
        if len(groups[0]) > 1
        else ""
    )
    note += f"; columns: bins of {size} steps (largest norm)" if size > 1 else ""
    fig.suptitle((title or run.path.name) + note, fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)
