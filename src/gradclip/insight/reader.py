"""Reading a recording (see `gradclip.core.record` for the format) into numpy arrays.

The records are memory-mapped, not loaded: a 500 MB recording opens at once,
and the findings walk it in blocks of steps.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradclip.core.record import CHANGE_UNKNOWN, CHANGED, FORMAT, HAS_GRADIENT, VERSION

__all__ = ["RecordedRun", "load"]


@dataclass(eq=False)
class RecordedRun:
    """A recording, opened.

    Attributes:
        path: the file.
        header: the header, as written.
        records: the records, a structured array (memory-mapped).
        layers: layer names, in model order.
    """

    path: Path
    header: dict[str, Any]
    records: np.ndarray[Any, Any]

    @property
    def layers(self) -> list[str]:
        """The layers, in model order."""
        return list(self.header["layers"])

    @property
    def steps(self) -> np.ndarray[Any, Any]:
        """``(S,)`` int64: each record's step."""
        out: np.ndarray[Any, Any] = np.asarray(self.records["step"])
        return out

    @property
    def norms(self) -> np.ndarray[Any, Any]:
        """``(S, L)`` float32: each layer's gradient norm before normalization (NaN: none)."""
        out: np.ndarray[Any, Any] = np.asarray(self.records["norm"])
        return out

    @property
    def tensor_norms(self) -> np.ndarray[Any, Any] | None:
        """``(S, T)`` float32 per-parameter norms, when recorded (``record_tensors``)."""
        names = self.records.dtype.names or ()
        return np.asarray(self.records["tensor_norm"]) if "tensor_norm" in names else None

    @property
    def flags(self) -> np.ndarray[Any, Any]:
        """``(S, L)`` uint8 bit flags (see `gradclip.core.record`)."""
        out: np.ndarray[Any, Any] = np.asarray(self.records["flags"])
        return out

    def has_gradient(self, flags: np.ndarray[Any, Any] | None = None) -> np.ndarray[Any, Any]:
        """``(S, L)`` bool: the layer had a gradient at that step."""
        out: np.ndarray[Any, Any] = ((self.flags if flags is None else flags) & HAS_GRADIENT) != 0
        return out

    def changed(self, flags: np.ndarray[Any, Any] | None = None) -> np.ndarray[Any, Any]:
        """``(S, L)`` bool: the rule changed (clipped) the layer at that step."""
        out: np.ndarray[Any, Any] = ((self.flags if flags is None else flags) & CHANGED) != 0
        return out

    def unknown(self, flags: np.ndarray[Any, Any] | None = None) -> np.ndarray[Any, Any]:
        """``(S, L)`` bool: the rule cannot tell whether it changed the layer."""
        out: np.ndarray[Any, Any] = ((self.flags if flags is None else flags) & CHANGE_UNKNOWN) != 0
        return out

    def nonfinite(self) -> np.ndarray[Any, Any]:
        """``(S, L)`` bool: the layer had a gradient and its norm was inf or NaN."""
        out: np.ndarray[Any, Any] = self.has_gradient() & ~np.isfinite(self.norms)
        return out

    def backward_order(self) -> tuple[list[int], bool]:
        """Layer indices nearest the loss first, and whether that order was observed.

        When no backward pass was observed (the normalizer was built after the
        last backward, or a wrapper wrote the gradients), the reverse of the
        model order stands in and the second value is ``False``.
        """
        order = self.header.get("backward_order")
        count = len(self.layers)
        if not order:
            return list(range(count - 1, -1, -1)), False
        seen = set(order)
        return list(order) + [i for i in range(count - 1, -1, -1) if i not in seen], True

    def to_pandas(self) -> Any:
        """The norms as a ``pandas.DataFrame``, one column per layer, indexed by step."""
        import pandas as pd  # type: ignore[import-untyped, unused-ignore]

        return pd.DataFrame(self.norms, index=self.steps, columns=self.layers)


def load(path: str | os.PathLike[str]) -> RecordedRun:
    """Open a recording written by ``GradientNormalizer(..., record=path)``.

    A file cut off mid-run (a killed process) opens with every whole record;
    a torn last record is left out.

    Args:
        path: the recording.

    Returns:
        The `RecordedRun`.

    Raises:
        ValueError: not a gradclip recording, or one of a newer version.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "run.gcrec"
        >>> monitor = gradclip.GradientNormalizer(model, None, record=path)
        >>> for _ in range(3):
        ...     _ = monitor.apply()
        >>> monitor.close()
        >>> run = load(path)
        >>> run.layers, run.norms.shape, run.steps.tolist()
        (['encoder', 'blocks.0', 'blocks.2', 'head'], (3, 4), [0, 1, 2])
    """
    p = Path(path)
    with p.open("rb") as f:
        first = f.readline(1 << 24)
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(
            f"{str(p)!r} is not a gradclip recording (record it with "
            "GradientNormalizer(model, mode, record=PATH))"
        )
    if header.get("version") != VERSION:
        raise ValueError(
            f"{str(p)!r} is a recording of format version {header.get('version')!r}; this "
            f"gradclip reads version {VERSION}: upgrade gradclip"
        )
    dtype = np.dtype([tuple(field) for field in header["record_dtype"]])
    start = int(header["header_bytes"])
    count = max(0, (p.stat().st_size - start) // dtype.itemsize)
    if count == 0:
        records = np.zeros(0, dtype=dtype)
    else:
        records = np.memmap(p, dtype=dtype, mode="r", offset=start, shape=(count,))
    return RecordedRun(p, header, records)
