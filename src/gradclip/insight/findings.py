"""What a recording shows: the first non-finite gradient, spikes, vanishing and dominant layers.

The rules, with their defaults (`Rules`):

* **first non-finite** — the first step at which a layer with a gradient had
  an inf or NaN norm; within it, of those layers, the one that received its
  gradient first in the backward pass (observed when the recording started,
  see `gradclip.core.record.BackwardOrder`): the layer nearest the loss,
  where a NaN born in the backward pass enters before it spreads to every
  layer below. When *every* layer with a gradient is non-finite, the step's
  loss or forward pass was already non-finite and no layer is named.
* **spikes** — a finite norm more than ``spike_factor`` (10) times the median
  of the same layer's finite norms over the previous block of
  ``spike_window`` (50) steps. The median ignores a few outliers, and
  comparing with the previous block lets the reference follow slow drifts; the
  first block, with no reference, is the warm-up and reports nothing.
* **vanishing** — layers whose finite norm stayed below ``vanishing_floor``
  (1e-8) on at least ``vanishing_share`` (90%) of the steps they had a gradient.
* **no gradient** — layers that had no gradient at any recorded step.
* **dominant** — the ``dominant_count`` (3) layers with the largest mean share
  of the squared global norm, ``‖g_l‖² / Σ_k ‖g_k‖²``, over the steps where
  every norm was finite.

The recording is read in blocks of steps, so memory stays bounded whatever
its length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gradclip.insight.reader import RecordedRun

__all__ = ["Rules", "findings"]

_BLOCKS_PER_CHUNK = 64  # spike windows read at once: ~64 × 50 steps × L × 4 bytes


@dataclass(frozen=True)
class Rules:
    """The findings' parameters (see the module's description)."""

    spike_factor: float = 10.0
    spike_window: int = 50
    vanishing_floor: float = 1e-8
    vanishing_share: float = 0.9
    dominant_count: int = 3

    def __post_init__(self) -> None:
        if not (self.spike_factor > 1.0 and math.isfinite(self.spike_factor)):
            raise ValueError(f"spike_factor must be a finite number > 1, got {self.spike_factor}")
        if self.spike_window < 2:
            raise ValueError(f"spike_window must be at least 2 steps, got {self.spike_window}")
        if not 0.0 < self.vanishing_share <= 1.0:
            raise ValueError(f"vanishing_share must be in (0, 1], got {self.vanishing_share}")


def _block_medians(x: np.ndarray[Any, Any], valid: np.ndarray[Any, Any], window: int) -> Any:
    """``(B, L)`` median of each block's valid values; NaN with fewer than half valid."""
    blocks = -(-x.shape[0] // window)
    pad = blocks * window - x.shape[0]
    filled = np.where(valid, x, np.inf)
    if pad:
        filled = np.concatenate([filled, np.full((pad, x.shape[1]), np.inf, filled.dtype)])
    shaped = np.sort(filled.reshape(blocks, window, x.shape[1]), axis=1)
    counts = np.count_nonzero(np.isfinite(shaped), axis=1)
    lower = np.take_along_axis(shaped, np.maximum(counts - 1, 0)[:, None, :] // 2, axis=1)[:, 0]
    upper = np.take_along_axis(shaped, (counts // 2)[:, None, :], axis=1)[:, 0]
    median = np.where(counts % 2 == 1, lower, (lower + upper) / 2)
    return np.where(counts * 2 >= window, median, np.nan)


def findings(run: RecordedRun, rules: Rules | None = None) -> dict[str, Any]:
    """The findings of a recording (see the module's description for the rules).

    Args:
        run: the recording, from `gradclip.insight.load`.
        rules: the rules' parameters; `Rules()` by default.

    Returns:
        ``{"steps", "first_step", "last_step", "layers", "first_nonfinite",
        "nonfinite_steps", "spikes", "vanishing", "no_gradient", "dominant",
        "clipped", "rules"}``: ``first_nonfinite`` is ``None`` or ``{"step",
        "layer", "parameters", "reason"}``; ``spikes`` a list of ``{"step",
        "layer", "norm", "ratio"}``; ``dominant`` a list of ``{"layer", "share"}``;
        ``clipped`` each layer's share of its steps that the rule changed.

    Examples:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.gcrec"
        >>> monitor = gradclip.GradientNormalizer(model, None, record=path)
        >>> for _ in range(3):
        ...     _ = monitor.apply()
        >>> monitor.close()
        >>> result = findings(gradclip.insight.load(path))
        >>> result["steps"], result["first_nonfinite"], result["spikes"], result["no_gradient"]
        (3, None, [], [])
    """
    rules = rules or Rules()
    layers = run.layers
    n_layers = len(layers)
    steps = run.steps
    window = rules.spike_window
    chunk = window * _BLOCKS_PER_CHUNK
    reference = np.full(n_layers, np.nan)
    got = np.zeros(n_layers, np.int64)
    clipped = np.zeros(n_layers, np.int64)
    low = np.zeros(n_layers, np.int64)
    share_sum = np.zeros(n_layers)
    share_rows = 0
    nonfinite_steps = 0
    first: dict[str, Any] | None = None
    spikes: list[dict[str, Any]] = []
    for start in range(0, len(steps), chunk):
        x = np.asarray(run.records["norm"][start : start + chunk], dtype=np.float64)
        flags = np.asarray(run.records["flags"][start : start + chunk])
        has = run.has_gradient(flags)
        finite = np.isfinite(x)
        valid = has & finite
        bad = has & ~finite
        got += has.sum(axis=0)
        clipped += (run.changed(flags) & has).sum(axis=0)
        low += (valid & (x < rules.vanishing_floor)).sum(axis=0)
        bad_rows = bad.any(axis=1)
        nonfinite_steps += int(bad_rows.sum())
        if first is None and bad_rows.any():
            row = int(np.argmax(bad_rows))
            first = _origin(run, start + row, has[row], bad[row])
        clean = ~bad_rows & has.any(axis=1)
        squares = np.where(valid, x * x, 0.0)[clean]
        totals = squares.sum(axis=1)
        positive = totals > 0
        share_sum += (squares[positive] / totals[positive, None]).sum(axis=0)
        share_rows += int(positive.sum())
        # spikes: each block against the median of the block before it
        medians = _block_medians(x, valid, window)
        refs = np.vstack([reference[None, :], medians[:-1]])
        if x.shape[0] % window == 0:
            reference = medians[-1]
        per_step = np.repeat(refs, window, axis=0)[: x.shape[0]]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = x / per_step
        hits = valid & (per_step > 0) & (ratio > rules.spike_factor)
        for r, c in zip(*np.nonzero(hits)):
            spikes.append(
                {
                    "step": int(steps[start + r]),
                    "layer": layers[c],
                    "norm": float(x[r, c]),
                    "ratio": float(ratio[r, c]),
                }
            )
    vanishing = [
        name for name, g, n in zip(layers, got, low) if g and n >= rules.vanishing_share * g
    ]
    shares = share_sum / share_rows if share_rows else np.zeros(n_layers)
    top: list[int] = (
        np.argsort(-shares, kind="stable")[: rules.dominant_count].tolist() if share_rows else []
    )
    return {
        "steps": len(steps),
        "first_step": int(steps[0]) if len(steps) else None,
        "last_step": int(steps[-1]) if len(steps) else None,
        "layers": layers,
        "first_nonfinite": first,
        "nonfinite_steps": nonfinite_steps,
        "spikes": spikes,
        "vanishing": vanishing,
        "no_gradient": [name for name, g in zip(layers, got) if g == 0],
        "dominant": [{"layer": layers[i], "share": float(shares[i])} for i in top if shares[i]],
        "clipped": {
            name: (float(c / g) if g else None) for name, c, g in zip(layers, clipped, got)
        },
        "rules": asdict(rules),
    }


def _origin(run: RecordedRun, row: int, has: Any, bad: Any) -> dict[str, Any]:
    """Where the first non-finite gradient entered, at record ``row``."""
    step = int(run.records["step"][row])
    layers = run.layers
    if bad.sum() == has.sum():
        return {
            "step": step,
            "layer": None,
            "parameters": [],
            "reason": "every layer with a gradient is non-finite: the loss or the forward "
            "pass was not finite (or the NaN entered at the layer nearest the loss)",
        }
    order, observed = run.backward_order()
    layer = next(i for i in order if bad[i])
    names = run.header.get("layer_params") or [[] for _ in layers]
    qualified = [f"{layers[layer]}.{p}" if layers[layer] else p for p in names[layer]]
    tensors = run.tensor_norms
    if tensors is not None:
        params = run.header["params"]
        broken = {params[t] for t in np.nonzero(~np.isfinite(tensors[row]))[0]}
        qualified = [q for q in qualified if q in broken] or qualified
    how = "observed backward order" if observed else "reverse model order (backward not observed)"
    return {
        "step": step,
        "layer": layers[layer],
        "parameters": qualified,
        "reason": f"the non-finite layer nearest the loss, by the {how}",
    }
