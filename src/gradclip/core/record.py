"""Recording every step's per-layer norms to a file, without a host sync per step.

A recording is one file: a JSON header line, then one fixed-size record per
step. A record is, in order (little-endian, no padding between fields):

====================  =========================  =====================================
field                 type                       meaning
====================  =========================  =====================================
``step``              int64                      the step (see `Recorder.record`)
``norm``              float32 × L                each layer's L2 gradient norm, before
                                                 normalization; NaN without a gradient
``tensor_norm``       float32 × T (opt-in)       each parameter's L2 gradient norm
``flags``             uint8 × L                  bit 0: the layer had a gradient;
                                                 bit 1: the rule changed it (clipped);
                                                 bit 2: the rule cannot tell (element-wise)
(padding)             uint8 × 0..7               so that a record is a multiple of 8 bytes
====================  =========================  =====================================

A layer is *non-finite* at a step when bit 0 is set and its norm is inf or
NaN. The header's ``record_dtype`` is that layout as a numpy dtype description
and ``header_bytes`` where the records start, so numpy reads the file directly::

    header = json.loads(open(path, "rb").readline())
    dtype = np.dtype([tuple(field) for field in header["record_dtype"]])
    count = (os.path.getsize(path) - header["header_bytes"]) // dtype.itemsize
    records = np.memmap(path, dtype, "r", header["header_bytes"], (count,))

Records are appended, whole, every ``every`` steps and at `Recorder.close`
(at exit, and when a step raises); a run killed in between leaves every
record written before readable (a torn last record is not counted by the
floor division above).

Per step the recorder only writes into a buffer on the gradients' device
(two small launches, no read). Every ``every`` steps the buffer goes to the
host: on a GPU with one non-blocking copy into pinned memory, written to the
file at the next flush, when that copy is long finished (so a GPU run's file
trails by up to ``2 × every`` steps until `Recorder.close`); on the CPU at once.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import math
import os
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from gradclip.core.layers import Layer
from gradclip.core.report import NormReport

__all__ = [
    "CHANGED",
    "CHANGE_UNKNOWN",
    "FORMAT",
    "HAS_GRADIENT",
    "VERSION",
    "BackwardOrder",
    "Recorder",
    "rank_part",
    "recording_path",
]

FORMAT = "gradclip-recording"
VERSION = 1
HAS_GRADIENT = 1
CHANGED = 2
CHANGE_UNKNOWN = 4

_Map = tuple[torch.Tensor, torch.Tensor]  # (positions in the step, columns in the record)

_LIVE: weakref.WeakSet[Recorder] = weakref.WeakSet()


@atexit.register
def _close_live_recorders() -> None:  # what the device holds reaches the file at exit
    for recorder in list(_LIVE):
        recorder.close()


def _no_recorder() -> None:
    return None


def _mapping(columns: Sequence[int], device: torch.device) -> _Map:
    kept = [(i, c) for i, c in enumerate(columns) if c >= 0]
    src = torch.tensor([i for i, _ in kept], dtype=torch.long, device=device)
    dst = torch.tensor([c for _, c in kept], dtype=torch.long, device=device)
    return src, dst


def recording_path(path: str | os.PathLike[str], part: str = "") -> Path:
    """``path`` with ``part`` (``"rank1"``, ``"opt0"``) inserted before its suffix, if any.

    Examples:
        >>> str(recording_path("runs/grads.gcrec", "rank1"))
        'runs/grads.rank1.gcrec'
    """
    p = Path(path)
    return p if not part else p.with_name(f"{p.stem}.{part}{p.suffix}")


class BackwardOrder:
    """The order in which layers receive their gradients, observed on one backward pass.

    A post-accumulate-grad hook on every trainable leaf parameter notes the
    first time each layer's gradient arrives; the hooks are removed by `stop`.
    Parameters that are not leaves (or whose gradients some wrapper writes
    without accumulating, as FSDP2 does) are not seen; `layers` is then ``None``.
    """

    def __init__(self, layers: Sequence[Layer]) -> None:
        self._seen: dict[int, None] = {}
        self._handles: list[Any] = []
        self._count = len(layers)
        for lid, layer in enumerate(layers):
            for p in layer.params:
                if p.requires_grad and p.is_leaf:
                    register = p.register_post_accumulate_grad_hook
                    self._handles.append(register(self._hook(lid)))  # type: ignore[no-untyped-call]

    def _hook(self, lid: int) -> Any:
        def hook(_p: torch.Tensor) -> None:
            self._seen.setdefault(lid)

        return hook

    @property
    def observed(self) -> bool:
        """Whether a gradient has arrived since the hooks were installed."""
        return bool(self._seen)

    def stop(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def layers(self) -> list[int] | None:
        """Layer indices, the first to receive a gradient (nearest the loss) first."""
        return list(self._seen) if self._seen else None


class Recorder:
    """Appends each step's per-layer norms and flags to a recording file.

    Args:
        path: the file; created (with its directory), or replaced if it exists.
        layers: the layers recorded, in model order (the file's columns).
        rules: each layer's rule, described in the header.
        every: steps kept on the device between two copies to the host (> 0).
        tensors: also record every parameter's norm (4 bytes per tensor-step).
        meta: more header entries (rank, optimizer, ...).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "run.gcrec"
        >>> net = torch.nn.Linear(2, 1)
        >>> normalizer = gradclip.GradientNormalizer(net, "ClipL2PerLayer", record=path)
        >>> net.weight.grad = torch.ones(1, 2); net.bias.grad = torch.ones(1)
        >>> _ = normalizer.apply()
        >>> normalizer.close()
        >>> json.loads(path.open("rb").readline())["layers"]
        ['']
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layers: Sequence[Layer],
        rules: Sequence[str],
        *,
        every: int = 100,
        tensors: bool = False,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"record_every must be a whole number of steps >= 1, got {every!r}")
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"record={str(path)!r} is a directory; give the path of a file")
        self.columns = [layer.name for layer in layers]
        self.params = [layer.qualified(k) for layer in layers for k in range(len(layer.params))]
        self.layer_params = [list(layer.param_names) for layer in layers]
        self.every = every
        self.tensors = bool(tensors)
        self._rules = list(rules)
        self._meta = dict(meta or {})
        n_layers, n_params = len(self.columns), len(self.params) if self.tensors else 0
        self._norm_at = 8
        self._tensor_at = 8 + 4 * n_layers
        self._flags_at = self._tensor_at + 4 * n_params
        self.record_bytes = -(-(self._flags_at + n_layers) // 8) * 8
        self.order = BackwardOrder(layers)
        self._file: IO[bytes] | None = None
        self._device: torch.device | None = None
        self._rows = 0
        self._steps: list[int] = []
        self._pending: tuple[torch.Tensor, list[int], Any] | None = None
        self._spare: torch.Tensor | None = None
        self._per_plan: tuple[Any, Any, Any] | None = None
        self._warned: set[str] = set()
        self._recorded = 0
        self.closed = False
        _LIVE.add(self)

    # -- the header ---------------------------------------------------------------------------
    def record_dtype(self) -> list[list[Any]]:
        """The record layout as a numpy dtype description (``[name, type, shape?]``)."""
        fields: list[list[Any]] = [["step", "<i8"], ["norm", "<f4", [len(self.columns)]]]
        if self.tensors:
            fields.append(["tensor_norm", "<f4", [len(self.params)]])
        fields.append(["flags", "u1", [len(self.columns)]])
        pad = self.record_bytes - (self._flags_at + len(self.columns))
        if pad:
            fields.append(["padding", "u1", [pad]])
        return fields

    def _open(self) -> IO[bytes]:
        order = self.order.layers()
        header: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "layers": self.columns,
            "rules": self._rules,
            "layer_params": self.layer_params,
            "params": self.params if self.tensors else None,
            "backward_order": order,
            "flags": {"has_gradient": HAS_GRADIENT, "changed": CHANGED, "unknown": CHANGE_UNKNOWN},
            "record_dtype": self.record_dtype(),
            "record_bytes": self.record_bytes,
            "every": self.every,
            **self._meta,
        }
        text = json.dumps(header, separators=(",", ":"))
        # the header's own size, padded so that records start at a multiple of 64 bytes
        size = 64
        while True:
            header["header_bytes"] = size
            text = json.dumps(header, separators=(",", ":"))
            if len(text.encode()) + 1 <= size:
                break
            size = -(-(len(text.encode()) + 24) // 64) * 64
        raw = text.encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("wb")
        f.write(raw + b" " * (size - len(raw) - 1) + b"\n")
        f.flush()
        return f

    # -- per step (device only) -----------------------------------------------------------------
    def _buffers(self, device: torch.device) -> None:
        if self._device is not None and self._rows:
            self.flush()
        self._device = device
        self._buffer = torch.zeros(self.every, self.record_bytes, dtype=torch.uint8, device=device)
        width = len(self.columns)
        self._norms = self._buffer[:, self._norm_at : self._tensor_at].view(torch.float32)
        self._tensor_norms = self._buffer[:, self._tensor_at : self._flags_at].view(torch.float32)
        self._flags = self._buffer[:, self._flags_at : self._flags_at + width]
        self._per_plan = None

    def _plan_constants(self, report: NormReport) -> tuple[torch.Tensor, _Map | None, _Map | None]:
        """Per plan: the constant flag bits, and where its layers and tensors go in a record."""
        plan = report._plan
        unknown_key = tuple(tuple(ids) for ids in report._unknown)
        cached = self._per_plan
        if cached is not None and cached[0] is plan and cached[1] == unknown_key:
            known: tuple[torch.Tensor, _Map | None, _Map | None] = cached[2]
            return known
        unknown = {lid for ids in unknown_key for lid in ids}
        columns = {name: i for i, name in enumerate(self.columns)}
        index = [columns.get(name, -1) for name in plan.layer_names]
        for name, col in zip(plan.layer_names, index):
            if col < 0 and name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"layer {name!r} appeared after the recording {str(self.path)!r} started; "
                    "it is not recorded (start a new recording to include it)",
                    stacklevel=4,
                )
        flags = [0] * len(plan.layer_names)
        for lid in range(len(flags)):
            if plan.layer_has_grad[lid]:
                flags[lid] = HAS_GRADIENT | (CHANGE_UNKNOWN if lid in unknown else 0)
        dev = plan.device
        const = torch.tensor(flags, dtype=torch.uint8, device=dev)
        direct = index == list(range(len(self.columns)))
        layer_map = None if direct else _mapping(index, dev)
        tensor_map = None
        if self.tensors:
            params = {name: i for i, name in enumerate(self.params)}
            tensor_map = _mapping([params.get(name, -1) for name in plan.names], dev)
        constants = (const, layer_map, tensor_map)
        self._per_plan = (plan, unknown_key, constants)
        return constants

    def record(self, report: NormReport, step: int) -> None:
        """Keep ``report``'s norms and flags as the record of ``step``: device writes only."""
        if self.closed:
            return
        # the hooks go once a backward pass was seen (or, if none is, after two
        # steps: the gradients were written by something the hooks cannot see)
        self._recorded += 1
        if self.order.observed or self._recorded > 2:
            self.order.stop()
        device = report.layer_norm_vector.device
        if self._device != device:
            self._buffers(device)
        const, layer_map, tensor_map = self._plan_constants(report)
        row = self._rows
        norms = report.layer_norm_vector
        changed = report.changed_vector
        if layer_map is None:
            self._norms[row].copy_(norms)
            torch.add(const, changed, alpha=CHANGED, out=self._flags[row])
        else:  # the model changed since the recording started: its layers by name
            src, dst = layer_map
            self._norms[row].fill_(math.nan)
            self._norms[row].index_copy_(0, dst, norms.index_select(0, src).float())
            flags = torch.add(const, changed, alpha=CHANGED)
            self._flags[row].zero_()
            self._flags[row].index_copy_(0, dst, flags.index_select(0, src))
        if tensor_map is not None:
            src, dst = tensor_map
            self._tensor_norms[row].fill_(math.nan)
            values = report.tensor_norms.index_select(0, src).float()
            self._tensor_norms[row].index_copy_(0, dst, values)
        self._steps.append(int(step))
        self._rows += 1
        if self._rows == self.every:
            self.flush(wait=False)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # the file is the original's: a copy or a pickle of a normalizer does not record
        return _no_recorder, ()

    def failed(self, error: BaseException, step: int) -> int:
        """After a step raised: record it if the error carries its report, then flush.

        Returns:
            1 if the step was recorded, else 0.
        """
        report = getattr(error, "report", None)
        recorded = isinstance(report, NormReport)
        if isinstance(report, NormReport):
            self.record(report, step)
        self.flush()
        return int(recorded)

    # -- to the host and the file ----------------------------------------------------------------
    def flush(self, wait: bool = True) -> None:
        """Send the rows kept on the device to the host; write what has arrived.

        Args:
            wait: also wait for this copy and write it (at exit, on an error,
                on `close`); otherwise it is written at the next flush.
        """
        self._write_pending()
        if self._rows:
            rows, steps = self._rows, self._steps
            host = self._host_buffer()
            host[:rows].copy_(self._buffer[:rows], non_blocking=True)
            event = None
            if self._buffer.is_cuda:
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record()
            self._pending = (host, steps[:rows], event)
            self._rows, self._steps = 0, []
        if wait or not self._buffer.is_cuda:  # a copy to host memory is already done
            self._write_pending()

    def _host_buffer(self) -> torch.Tensor:
        spare, self._spare = self._spare, None
        if spare is not None:
            return spare
        pin = self._buffer.is_cuda
        return torch.empty(self.every, self.record_bytes, dtype=torch.uint8, pin_memory=pin)

    def _write_pending(self) -> None:
        if self._pending is None:
            return
        host, steps, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # copied `every` steps ago: long done
        rows = len(steps)
        host[:rows, 0:8].view(torch.int64)[:, 0] = torch.tensor(steps, dtype=torch.int64)
        if self._file is None:
            self._file = self._open()
        self._file.write(ctypes.string_at(host.data_ptr(), rows * self.record_bytes))
        self._file.flush()
        self._spare = host

    def close(self) -> None:
        """Write everything recorded and close the file (idempotent)."""
        if self.closed:
            return
        self.order.stop()
        try:
            self.flush(wait=True)
            if self._file is None:
                self._file = self._open()  # a run without a step still leaves a readable file
        finally:
            self.closed = True
            if self._file is not None:
                self._file.close()
            _LIVE.discard(self)


def rank_part() -> str:
    """``"rank<r>"`` under a process group of several ranks, else ``""``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"rank{dist.get_rank()}"
    return ""
