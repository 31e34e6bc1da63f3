"""What a recording normalizer adds: starting a `Recorder`, steps a scaler skipped, closing.

`GradientNormalizer` takes these methods from `Recording`; the recording
itself (device buffer, file format) is `gradclip.core.record`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import torch

from gradclip.core.checkpoint import load_state
from gradclip.core.engine import Engine
from gradclip.core.identity import LoadResult
from gradclip.core.record import Recorder, rank_part, recording_path
from gradclip.core.report import NormReport

__all__ = ["RecordPath", "Recording", "start_recording", "steps_of"]

RecordPath = str | os.PathLike[str] | None  # where a normalizer records (None: it does not)


def _rank_meta() -> dict[str, Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    return {"rank": 0, "world_size": 1}


def steps_of(state_dict: Any) -> int:
    """The ``"steps"`` of a normalizer's state dict (0 if absent), checked."""
    steps = state_dict.get("steps", 0) if isinstance(state_dict, Mapping) else 0
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"the state dict's 'steps' must be a count >= 0, got {steps!r}")
    return steps


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
    """The recording half of `GradientNormalizer`.

    Arguments of the normalizer: ``record``, a file to record every step's
    per-layer norms and clipped flags in (`gradclip.core.record`; read it with
    `gradclip.insight`), which implies ``measure_all`` (with ``mode=None`` the
    normalizer is a pure monitor); under a process group of several ranks each
    rank writes its own file, ``name.rank<r>.ext``; `close` at the end (it also
    happens at exit). ``record_every``: steps kept on the device between two
    copies to the file. ``record_tensors``: also record every parameter's norm.
    A copy or a pickle of a recording normalizer does not record.
    """

    _recorder: Recorder | None
    _lock: threading.Lock
    _engine: Engine
    steps: int

    def _apply(self, step: int | None) -> NormReport:
        raise NotImplementedError

    def _load_with_steps(self, state_dict: Any, strict: bool, staged: bool) -> LoadResult:
        """Load a state dict and its ``"steps"`` (checked first; kept only if it loads)."""
        steps = steps_of(state_dict)
        result = load_state(self._engine, state_dict, strict, staged=staged)
        self.steps = steps
        return result

    def _start_recording(self, record: Any, every: int, tensors: bool) -> None:
        self.steps = 0  # `apply` calls, kept in `state_dict` (a recording's step)
        self._recorder = start_recording(self._engine, record, every, tensors)

    def apply_at(self, step: int | None) -> NormReport:
        """`apply`, recorded as step ``step`` (a trainer's global step; ``None``: `steps`)."""
        if torch.compiler.is_compiling():
            return self._apply(step)
        with self._lock:
            try:
                return self._apply(step)
            except Exception as error:
                self._failed(error, step)
                raise

    def _keep(self, report: NormReport, step: int | None) -> None:
        """Count the step and record ``report`` (device writes only)."""
        if torch.compiler.is_compiling():
            # a host counter would be guarded on and recompile every step: a compiled
            # apply() neither counts nor records
            return
        if self._recorder is not None:
            self._recorder.record(report, self.steps if step is None else step)
        self.steps += 1

    def _failed(self, error: BaseException, step: int | None) -> None:
        """A step raised: record it if the error carries its norms, and write the file."""
        if self._recorder is not None:
            self.steps += self._recorder.failed(error, self.steps if step is None else step)

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
