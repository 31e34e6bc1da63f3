"""The rows of ``python -m gradclip bench`` and their Markdown table."""

from __future__ import annotations

from dataclasses import dataclass

from gradclip.commands.bench_timing import Launches

__all__ = ["Row", "format_table"]


@dataclass
class Row:
    """One timed method of one scenario."""

    scenario: str
    method: str
    median_ms: float
    ratio: float | None  # to the scenario's reference method
    reference: str
    target: float | None  # the ratio the project promises, if any
    extra_bytes: int | None = None
    host_ms: float | None = None  # time for the call to return
    gpu_ms: float | None = None  # CUDA events around the call
    launches: Launches | None = None  # per call, from the profiler
    floor_ratio: float | None = None  # to the hardware floor measured in the same run
    floor_target: float | None = None  # the ratio to that floor the project promises

    @property
    def meets_target(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio <= self.target

    @property
    def meets_floor_target(self) -> bool | None:
        if self.floor_target is None or self.floor_ratio is None:
            return None
        return self.floor_ratio <= self.floor_target


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table.

    Columns: the median wall time of a call, its host time and (CUDA) GPU time,
    what it launches (CUDA: kernels, and ``+N H2D`` host-to-device copies; CPU:
    top-level aten ops), the ratio of wall times to the scenario's reference,
    the project's target for that ratio, the wall time over the scenario's
    hardware floor (`gradclip.commands.bench_floor`) with its target, and the
    peak extra memory of a call.
    """
    lines = [
        "| scenario | method | median ms | host ms | GPU ms | launches | ratio | vs | target "
        "| vs hardware floor | floor target | peak extra bytes |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|---|---:|",
    ]
    for row in rows:
        ratio = "1 (ref)" if row.ratio is None else f"{row.ratio:.2f}x"
        target = (
            ""
            if row.target is None
            else f"<= {row.target:.2f}x " + ("ok" if row.meets_target else "MISSED")
        )
        extra = "" if row.extra_bytes is None else f"{row.extra_bytes:,}"
        floor = "" if row.floor_ratio is None else f"{row.floor_ratio:.2f}x"
        floor_target = (
            ""
            if row.floor_target is None
            else f"<= {row.floor_target:.2f}x " + ("ok" if row.meets_floor_target else "MISSED")
        )
        vs = "" if row.ratio is None else row.reference
        host = "" if row.host_ms is None else f"{row.host_ms:.3f}"
        gpu = "" if row.gpu_ms is None else f"{row.gpu_ms:.3f}"
        launches = ""
        if row.launches is not None:
            launches = str(row.launches.kernels)
            if row.launches.copies_to_device:
                launches += f" +{row.launches.copies_to_device} H2D"
        lines.append(
            f"| {row.scenario} | {row.method} | {row.median_ms:.3f} | {host} | {gpu} | {launches} "
            f"| {ratio} | {vs} | {target} | {floor} | {floor_target} | {extra} |"
        )
    return "\n".join(lines)
