"""Per-layer gradient norms over time: to TensorBoard and to CSV.

Both writers read a `NormReport` from the device with one
transfer per step (``report.to_dict()``) and write the norms measured *before*
normalization, one value per layer. Layers whose norm was not measured (``None``
and element-wise clipping, unless the normalizer has ``measure_all=True``) are
left out of TensorBoard and written as empty cells in CSV.

Examples:
    >>> import os, tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> from gradclip.integrations.writers import CSVNormWriter, write_tensorboard
    >>> folder = tempfile.mkdtemp()
    >>> normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer")
    >>> writer = SummaryWriter(os.path.join(folder, "runs"))
    >>> with CSVNormWriter(os.path.join(folder, "norms.csv")) as csv_log:
    ...     for step in range(3):
    ...         optimizer.zero_grad()
    ...         nn.functional.mse_loss(model(x), y).backward()
    ...         report = normalizer.apply()
    ...         write_tensorboard(report, writer, step)
    ...         csv_log.write(report, step)
    >>> writer.close()
    >>> print(open(os.path.join(folder, "norms.csv")).readline().strip())
    step,encoder,blocks.0,blocks.2,head
"""

from __future__ import annotations

import csv
import math
import os
from types import TracebackType
from typing import IO, Any, Protocol

import torch

from gradclip.core.report import NormReport

__all__ = ["CSVNormWriter", "ScalarWriter", "layer_norm_values", "write_tensorboard"]


class ScalarWriter(Protocol):
    """What `write_tensorboard` needs: ``torch.utils.tensorboard.SummaryWriter``'s methods."""

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None) -> Any: ...

    def add_histogram(self, tag: str, values: Any, global_step: int | None = None) -> Any: ...


def _label(layer: str) -> str:
    return layer or "(root)"


def layer_norm_values(report: NormReport, *, params: bool = False) -> dict[str, float | None]:
    """``{layer: norm}`` (or ``{"layer.param": norm}`` with ``params``), one device read.

    Args:
        report: the report of one step.
        params: per tensor instead of per layer.

    Returns:
        Norms as Python floats, ``None`` where the norm was not measured; the
        root module's layer is named ``"(root)"``.
    """
    data = report.to_dict()
    values: dict[str, float | None] = data["param_norms" if params else "layer_norms"]
    return {_label(name): value for name, value in values.items()}


def write_tensorboard(
    report: NormReport,
    writer: ScalarWriter,
    step: int,
    *,
    prefix: str = "grad_norm/",
    histogram: bool = True,
    params: bool = False,
) -> None:
    """Write one step's per-layer gradient norms to TensorBoard.

    One scalar per layer, ``<prefix><layer>``, and (with ``histogram``) a
    histogram ``<prefix>layers`` of the layer norms of this step: how spread
    out the layers' gradients are, and how that changes over training.

    Args:
        report: the `NormReport` of the step.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with
            ``add_scalar`` and ``add_histogram``).
        step: the global step.
        prefix: the tag prefix.
        histogram: also write the histogram of the layer norms.
        params: one scalar per parameter tensor instead of per layer.
    """
    values = layer_norm_values(report, params=params)
    measured = {name: v for name, v in values.items() if v is not None}
    for name, value in measured.items():
        writer.add_scalar(f"{prefix}{name}", value, global_step=step)
    finite = [v for v in measured.values() if math.isfinite(v)]
    if histogram and finite:
        writer.add_histogram(
            f"{prefix}layers", torch.tensor(finite, dtype=torch.float64), global_step=step
        )


class CSVNormWriter:
    """Per-layer gradient norms to a CSV file: one row per step, one column per layer.

    The columns are ``step`` and the layers of the first report written (or
    ``columns``); a later step without a gradient for some layer leaves its cell
    empty, and a layer that was not a column raises, so that a file never has
    rows of different meaning. Rows are flushed as they are written, so the file
    can be read (``pandas.read_csv``) while training runs.

    Args:
        path: the file; created (or truncated, or appended to with ``append``).
        params: one column per parameter tensor (``"layer.param"``) instead of per layer.
        columns: the layer (or tensor) names, in order, if known in advance.
        append: append rows to an existing file with the same header.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        params: bool = False,
        columns: list[str] | None = None,
        append: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.params = params
        self.columns: list[str] | None = list(columns) if columns is not None else None
        self._append = append and os.path.exists(self.path) and os.path.getsize(self.path) > 0
        self._file: IO[str] | None = None
        self._writer: Any = None

    def _open(self, columns: list[str]) -> None:
        if self._append:
            with open(self.path, newline="") as existing:
                header = next(csv.reader(existing), [])
            if header != ["step", *columns]:
                raise ValueError(
                    f"{self.path} has the columns {header}, not {['step', *columns]}; write to a "
                    "new file or pass append=False"
                )
        self._file = open(self.path, "a" if self._append else "w", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._file)
        if not self._append:
            self._writer.writerow(["step", *columns])

    def write(self, report: NormReport, step: int) -> None:
        """Append the row of one step (one device read).

        Raises:
            ValueError: the report has a layer that is not a column of the file.
        """
        values = layer_norm_values(report, params=self.params)
        if self.columns is None:
            self.columns = list(values)
        if self._writer is None:
            self._open(self.columns)
        unknown = [name for name in values if name not in self.columns]
        if unknown:
            raise ValueError(
                f"layers {unknown} are not columns of {self.path} (columns: {self.columns}); "
                "pass columns=... listing every layer"
            )
        row: list[Any] = [step]
        for name in self.columns:
            value = values.get(name)
            row.append("" if value is None else repr(value))
        self._writer.writerow(row)
        assert self._file is not None
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None
            self._append = True

    def __enter__(self) -> CSVNormWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
