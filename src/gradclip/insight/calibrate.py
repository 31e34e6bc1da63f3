"""Thresholds from a recording: each layer's P-th percentile of its observed norms.

AutoClip (Seetharaman et al., 2020) sets a clipping threshold at a percentile
of the gradient norms observed so far: the threshold then has the model's own
scale, and the percentile says how often it clips. gradclip applies the
argument per layer, offline: a layer's threshold is the P-th percentile of
that layer's finite recorded norms (linear interpolation between order
statistics, as ``numpy.percentile``), so with P = 95 each layer would have
been clipped on about 5% of the recorded steps: its largest ones, where
spikes live, while its bulk is untouched. A layer that never had a finite,
non-zero gradient is left alone (``None``).

Scopes: ``"layer"`` (per-layer `ClipL2PerLayer` thresholds, the default),
``"network"`` (one `ClipL2PerLayer` threshold, the percentile of all layers'
norms together) and ``"param-type"`` (per-layer `ClipL2PerParamType`
thresholds, each the largest of the layer's parameters' P-th percentiles, so
that no parameter type is clipped more often than P says; from per-parameter
norms: record with ``record_tensors=True``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradclip.insight.reader import RecordedRun

__all__ = ["DEFAULT_PERCENTILE", "SCOPES", "Calibration", "calibrate", "percentiles"]

DEFAULT_PERCENTILE = 95.0
SCOPES = ("layer", "network", "param-type")
_COLUMNS_PER_PASS = 64


def percentiles(
    values: np.ndarray[Any, Any], valid: np.ndarray[Any, Any], qs: Sequence[float]
) -> np.ndarray[Any, Any]:
    """``(len(qs), C)`` percentiles of each column's valid values (NaN for none).

    Linear interpolation between order statistics, as ``numpy.percentile``.
    Columns are sorted a few dozen at a time, so memory stays bounded.
    """
    out = np.full((len(qs), values.shape[1]), np.nan)
    for start in range(0, values.shape[1], _COLUMNS_PER_PASS):
        stop = min(start + _COLUMNS_PER_PASS, values.shape[1])
        x = np.asarray(values[:, start:stop], dtype=np.float64)
        ok = np.asarray(valid[:, start:stop])
        ordered = np.sort(np.where(ok, x, np.inf), axis=0)
        counts = ok.sum(axis=0)
        for k, q in enumerate(qs):
            pos = (counts - 1) * (q / 100.0)
            lo = np.clip(np.floor(pos).astype(np.int64), 0, None)
            hi = np.clip(np.ceil(pos).astype(np.int64), 0, None)
            a = np.take_along_axis(ordered, lo[None, :], axis=0)[0]
            b = np.take_along_axis(ordered, hi[None, :], axis=0)[0]
            with np.errstate(invalid="ignore"):
                value = a + (b - a) * (pos - lo)
            out[k, start:stop] = np.where(counts > 0, np.where(a == b, a, value), np.nan)
    return out


@dataclass
class Calibration:
    """A calibrated configuration and what its thresholds would have clipped.

    Attributes:
        mode: the DL4J mode, ``"ClipL2PerLayer"`` or ``"ClipL2PerParamType"``.
        threshold: the network's threshold (every layer's norms together).
        layers: ``{layer: threshold or None}``; ``None`` leaves the layer alone.
        clipped: ``{layer: steps its threshold would have clipped}``.
        observed: ``{layer: steps with a finite norm}``.
        percentile: P.
        scope: one of `SCOPES`.
        steps: the recording's steps.
    """

    mode: str
    threshold: float
    layers: dict[str, float | None]
    clipped: dict[str, int]
    observed: dict[str, int]
    percentile: float
    scope: str
    steps: int
    notes: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        """The configuration, as `gradclip.config` reads it (DL4J names)."""
        layers: dict[str, Any] = {}
        for name, value in self.layers.items():
            if value is None:
                layers[name] = {"gradientNormalization": "None"}
            elif self.scope != "network":
                layers[name] = {"gradientNormalizationThreshold": value}
        out: dict[str, Any] = {
            "gradientNormalization": self.mode,
            "gradientNormalizationThreshold": self.threshold,
        }
        if layers:
            out["layers"] = layers
        return out

    def comment(self, name: str) -> str:
        """What the layer's threshold would have clipped, or why it is left alone."""
        if name in self.notes:
            return self.notes[name]
        n, total = self.clipped[name], self.observed[name]
        return f"would have clipped {n} of {total} steps ({100.0 * n / max(total, 1):.1f}%)"


def _round(value: float) -> float:
    """``value`` to 4 significant digits, rounded up: a threshold needs no more (and reads
    the same on any CPU), and rounding up never clips more than the percentile says."""
    if value <= 0 or not math.isfinite(value):
        return value
    unit = 10.0 ** (math.floor(math.log10(value)) - 3)
    return float(f"{math.ceil(value / unit - 1e-9) * unit:.4g}")


def calibrate(
    run: RecordedRun, percentile: float = DEFAULT_PERCENTILE, scope: str = "layer"
) -> Calibration:
    """Per-layer (or network-wide) thresholds at the ``percentile`` of the recorded norms.

    Args:
        run: the recording, from `gradclip.insight.load`.
        percentile: P, in (0, 100].
        scope: ``"layer"``, ``"network"`` or ``"param-type"`` (see the module).

    Returns:
        The `Calibration`; ``.config()`` is what `gradclip calibrate` writes.

    Raises:
        ValueError: a percentile outside (0, 100], an unknown scope, a
            ``"param-type"`` calibration of a recording without per-parameter
            norms, or a recording without any finite norm.

    Examples:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.gcrec"
        >>> monitor = gradclip.GradientNormalizer(model, None, record=path)
        >>> for _ in range(4):
        ...     _ = monitor.apply()
        >>> monitor.close()
        >>> result = calibrate(gradclip.insight.load(path), percentile=50)
        >>> result.mode, list(result.layers)
        ('ClipL2PerLayer', ['encoder', 'blocks.0', 'blocks.2', 'head'])
    """
    if not (0.0 < float(percentile) <= 100.0):
        raise ValueError(f"the percentile must be in (0, 100], got {percentile}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    layers = run.layers
    if scope == "param-type":
        values, valid, owner = _tensor_values(run)
    else:
        values = run.norms
        valid = run.has_gradient() & np.isfinite(values)
        owner = list(range(len(layers)))
    pooled = np.asarray(values, np.float64)[np.asarray(valid)]
    pooled = pooled[pooled > 0]
    if pooled.size == 0:
        raise ValueError(
            f"{str(run.path)!r} holds no finite, non-zero gradient norm to calibrate on"
        )
    network = _round(float(np.percentile(pooled, percentile)))
    if scope == "network":
        per_column = np.full(values.shape[1], network)
    else:
        per_column = percentiles(values, valid & (np.asarray(values) > 0), [percentile])[0]
    thresholds: dict[str, float | None] = {}
    clipped: dict[str, int] = {}
    observed: dict[str, int] = {}
    notes: dict[str, str] = {}
    for lid, name in enumerate(layers):
        cols = [c for c, o in enumerate(owner) if o == lid]
        positive = np.asarray(valid[:, cols]) & (np.asarray(values[:, cols]) > 0)
        observed[name] = int(positive.any(axis=1).sum()) if cols else 0
        finite = [per_column[c] for c in cols if math.isfinite(per_column[c])]
        if not observed[name] or not finite or max(finite) <= 0:
            thresholds[name] = None
            clipped[name] = 0
            notes[name] = "left alone: no finite, non-zero gradient was recorded"
            continue
        t = network if scope == "network" else _round(max(finite))
        thresholds[name] = t
        over = np.asarray(valid[:, cols]) & (np.asarray(values[:, cols], np.float64) > t)
        clipped[name] = int(over.any(axis=1).sum())
    mode = "ClipL2PerParamType" if scope == "param-type" else "ClipL2PerLayer"
    return Calibration(
        mode,
        network,
        thresholds,
        clipped,
        observed,
        float(percentile),
        scope,
        len(run.steps),
        notes,
    )


def _tensor_values(run: RecordedRun) -> tuple[Any, Any, list[int]]:
    tensors = run.tensor_norms
    if tensors is None:
        raise ValueError(
            "a param-type calibration needs per-parameter norms: record with "
            "GradientNormalizer(..., record=PATH, record_tensors=True)"
        )
    layers = run.layers
    names = run.header["params"]
    layer_params = run.header["layer_params"]
    index = {
        (f"{layer}.{p}" if layer else p): lid
        for lid, (layer, params) in enumerate(zip(layers, layer_params))
        for p in params
    }
    owner = [index[name] for name in names]
    valid = np.isfinite(tensors) & run.has_gradient()[:, owner]
    return tensors, valid, owner
