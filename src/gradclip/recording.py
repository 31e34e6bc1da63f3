"""What a recording normalizer adds: starting a `Recorder`, steps a scaler skipped, closing.

`GradientNormalizer` takes these methods from `Recording`; the recording
itself (device buffer, file format) is `gradclip.core.record`.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from gradclip.core.engine import Engine
from gradclip.core.record import Recorder, rank_part, recording_path
from gradclip.core.report import NormReport

__all__ = ["Recording", "start_recording"]


def _rank_meta() -> dict[str, Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    return {"rank": 0, "world_size": 1}


def start_recording(
    engine: Engine,
    record: str | os.PathLike[str] | None,
    every: int,
    tensors: bool,
    meta: dict[str, Any] | None = None,
) -> Recorder | None:
    """A `Recorder` over ``engine``'s layers and rules, or ``None`` without ``record``."""
    if record is None:
        return None
    return Recorder(
        recording_path(record, rank_part()),
        engine.layers,
        [rule.describe() for rule in engine.rules],
        every=every,
        tensors=tensors,
        meta={**_rank_meta(), **(meta or {})},
    )


class Recording:
    """The recording half of `GradientNormalizer`."""

    _recorder: Recorder | None
    _lock: threading.Lock
    _engine: Engine
    steps: int

    @property
    def recording(self) -> str | None:
        """The path of the recording file, or ``None`` when not recording."""
        return None if self._recorder is None else str(self._recorder.path)

    def record_only(self, step: int | None = None) -> None:
        """Record the current gradients' norms as a step, without normalizing them.

        For a step that a gradient scaler skips (inf or NaN after unscaling),
        so that the recording shows it: the trainer callbacks call it.
        """
        if self._recorder is None:
            return
        with self._lock:
            monitor = getattr(self, "_monitor", None)
            if monitor is None or monitor.layers != self._engine.layers:
                from gradclip.rules.dl4j import resolve_rule

                none = resolve_rule(None, 1.0)
                monitor = Engine(
                    self._engine.layers, [none] * len(self._engine.layers), measure_all=True
                )
                self._monitor = monitor
            report: NormReport = monitor.step()
            self._recorder.record(report, self.steps if step is None else step)
            self.steps += 1

    def flush(self) -> None:
        """Write every step recorded so far to the file (a sync: at the end of training)."""
        if self._recorder is not None:
            with self._lock:
                self._recorder.flush(wait=True)

    def close(self) -> None:
        """Write what the recording still holds to its file and close it (idempotent)."""
        if self._recorder is not None:
            with self._lock:
                self._recorder.close()
