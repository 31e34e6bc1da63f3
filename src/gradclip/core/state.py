"""The rules' state, owned by the engine and kept per layer name.

Each stateful rule of a normalizer has a *slot*, named after the rule (and its
position in a chain). A slot holds the rule's state tensors with one row per
layer (``per_layer_state``) or a single row named ``"*"`` for the group. A
step reads the rows of the layers that have gradients, calls the rule and
writes the rows back, except rows whose norm was not finite that step: those
stay exactly as they were, so one bad step cannot spoil the statistics of the
steps after it.

`StateStore.state_dict` holds only plain containers, strings, ints, bytes and
CPU tensors (``torch.load(..., weights_only=True)`` reads it back); its format
is versioned, and `StateStore.load_state_dict` checks everything before it
changes anything. Its structure is fixed from construction: every slot and
row exists before the first step, and every tensor in it has the shape a
fresh normalizer gives it, so ``torch.distributed.checkpoint`` (which loads
tensors in place into those of a fresh state dict) can restore it. The one
exception, a buffer that grows as the run goes on (`Rule.growable_state`,
e.g. `AutoClip` 's whole history), is stored as ``{"dtype", "shape",
"data": bytes}``: a checkpoint stores bytes whole, whatever their length.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gradclip.core.rule import Rule, State

__all__ = [
    "FORMAT",
    "GROUP_ROW",
    "READABLE_VERSIONS",
    "VERSION",
    "Slot",
    "StateStore",
    "check_identity",
    "identity",
    "is_stateful",
    "pack_tensor",
    "slot_name",
    "state_rows",
    "state_slot",
    "unpack_tensor",
]

FORMAT = "gradclip.GradientNormalizer"
# 1 (gradclip 0.1) kept the rules' statistics by group position; 2 keeps them by layer
# name, with growable buffers as bytes
VERSION = 2
READABLE_VERSIONS = (2,)
GROUP_ROW = "*"  # the one row of a rule whose state is not per layer


def is_stateful(rule: Rule) -> bool:
    """Whether ``rule`` keeps state between steps (its fresh state is not empty)."""
    return bool(rule.init_state(1, torch.device("cpu"), torch.float64))


def slot_name(rule: Rule, stage: int | None = None) -> str:
    """The name of a rule's state slot: the rule as written, without the fields that may
    differ between its layers, and for a chain, the position of the member."""
    if stage is not None:
        return f"{rule.describe()}[{stage}]"
    if not dataclasses.is_dataclass(rule):
        return type(rule).__name__
    args = ", ".join(
        f"{f.name}={getattr(rule, f.name)!r}"
        for f in dataclasses.fields(rule)
        if f.name not in rule.per_layer_fields
    )
    return f"{type(rule).__name__}({args})"


def state_slot(group_rule: Rule, k: int, stage: Rule, many: bool) -> str | None:
    """The slot of the ``k``-th rule ``stage`` of a group's rule, or ``None`` if stateless."""
    if not is_stateful(stage):
        return None
    return slot_name(group_rule, k) if many else slot_name(stage)


def state_rows(rule: Rule, layer_names: Sequence[str]) -> list[str]:
    """The state rows a rule keeps for these layers: one per layer, or the group's one."""
    return list(layer_names) if rule.per_layer_state else [GROUP_ROW]


def identity(
    names: Sequence[str], params: Sequence[str], rules: Sequence[str]
) -> dict[str, list[str]]:
    """What a state dict records of the model it was saved for, to refuse another model."""
    return {"layers": list(names), "params": list(params), "layer_rules": list(rules)}


def check_identity(saved: Mapping[str, Any], mine: Mapping[str, list[str]]) -> None:
    """Raise ``ValueError`` naming the first difference between two `identity` records."""
    for key, what in (("layers", "layer"), ("params", "parameter"), ("layer_rules", "rule")):
        theirs = saved.get(key)
        if not isinstance(theirs, list | tuple):
            raise ValueError(f"the state dict has no {key!r} list")
        theirs = list(theirs)
        if len(theirs) == len(mine[key]) and all(map(_same_entry, theirs, mine[key])):
            continue
        for i, (a, b) in enumerate(zip(theirs, mine[key])):
            if not _same_entry(a, b):
                diff = f"{what} {i} is {b!r} here but {a!r} in the state dict"
                break
        else:
            diff = f"{len(mine[key])} {what}s here but {len(theirs)} in the state dict"
        raise ValueError(
            f"this state dict was saved for a different model or configuration: {diff}"
        )


def _same_entry(a: object, b: object) -> bool:
    """Equal identity entries; a parameter's shape ``(?)`` (a lazy module's parameter
    before its first forward) matches any shape of the same parameter."""
    if a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    (a_name, _, a_shape), (b_name, _, b_shape) = a.rpartition("("), b.rpartition("(")
    return a_name == b_name and "?)" in (a_shape, b_shape)


def _row_shape(*tensors: torch.Tensor) -> list[int]:
    """The shape of a row that holds a row of each of ``tensors`` (the largest of each dim)."""
    return [max(dims) for dims in zip(*(t.shape[1:] for t in tensors))]


def _pad_rows(tensor: torch.Tensor, row_shape: Sequence[int]) -> torch.Tensor:
    """``tensor`` with each row zero-padded at the end of each dim up to ``row_shape``."""
    if tuple(tensor.shape[1:]) == tuple(row_shape):
        return tensor
    out = tensor.new_zeros([tensor.shape[0], *row_shape])
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return out


def pack_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """``tensor`` as ``{"dtype": "float64", "shape": [...], "data": bytes}``, a CPU copy.

    For buffers whose length changes during a run: a checkpoint stores bytes
    whole, where a tensor must match the shape of the one it is loaded into.
    The bytes are the tensor's elements in row-major order, native byte order.

    Examples:
        >>> packed = pack_tensor(torch.tensor([1.0, 2.5], dtype=torch.float64))
        >>> packed["dtype"], packed["shape"], len(packed["data"])
        ('float64', [2], 16)
        >>> unpack_tensor(packed).tolist()
        [1.0, 2.5]
    """
    cpu = tensor.detach().to("cpu", copy=True).contiguous()
    # ctypes reads the storage as it is: no numpy needed, no per-element Python objects
    data = ctypes.string_at(cpu.data_ptr(), cpu.nbytes) if cpu.nbytes else b""
    return {"dtype": str(cpu.dtype).removeprefix("torch."), "shape": list(cpu.shape), "data": data}


def unpack_tensor(packed: Mapping[str, Any]) -> torch.Tensor:
    """The tensor `pack_tensor` packed; ``ValueError`` if ``packed`` is not one."""
    if not isinstance(packed, Mapping) or set(packed) != {"dtype", "shape", "data"}:
        raise ValueError("expected a packed tensor {'dtype', 'shape', 'data'}")
    dtype = getattr(torch, str(packed["dtype"]), None)
    shape, data = packed["shape"], packed["data"]
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"packed tensor: unknown dtype {packed['dtype']!r}")
    if not isinstance(shape, list | tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"packed tensor: shape must be a list of ints >= 0, got {shape!r}")
    numel = 1
    for n in shape:
        numel *= n
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not isinstance(data, bytes | bytearray) or len(data) != numel * itemsize:
        raise ValueError(
            f"packed tensor: {numel * itemsize} bytes expected for {dtype} {list(shape)}"
        )
    if not numel:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


@dataclass(eq=False)
class Slot:
    """One rule's state: tensors with one row per entry of ``rows``."""

    rule: Rule
    rows: dict[str, int]
    tensors: State
    # Steps this rule has taken, counted on the host for rules that grow a buffer
    # (`Rule.growable_state`) and must size it without reading the device; not
    # counted for others, so that a compiled step reads no changing Python int.
    steps: int = 0

    def index(self, rows: Sequence[str]) -> tuple[torch.Tensor, bool]:
        """The row indices of ``rows`` on the state's device, and whether they are all rows.

        Called when a plan is built; the plan keeps the result.
        """
        ids = [self.rows[r] for r in rows]
        device = next(iter(self.tensors.values())).device
        whole = ids == list(range(len(self.rows)))
        return torch.tensor(ids, dtype=torch.long, device=device), whole


class StateStore:
    """Every slot of one normalizer; see the module docstring."""

    def __init__(self) -> None:
        self.slots: dict[str, Slot] = {}
        #: bumped whenever a slot's rows or devices change: plans holding row
        #: indices from before are then rebuilt
        self.generation = 0

    def ensure(
        self,
        name: str,
        rule: Rule,
        rows: Sequence[str],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """Make sure slot ``name`` exists on ``device`` with ``rows``; new rows start fresh."""
        slot = self.slots.get(name)
        if slot is None:
            tensors = rule.init_state(len(rows), device, dtype)
            self.slots[name] = Slot(rule, {r: i for i, r in enumerate(rows)}, tensors)
            self.generation += 1
            return
        first = next(iter(slot.tensors.values()))
        if first.is_meta and device.type != "meta":
            # made for a model built on the meta device, now materialized (to_empty):
            # no step ran, there is no data to copy, the state starts fresh
            slot.tensors = rule.init_state(len(slot.rows), device, dtype)
            self.generation += 1
        elif first.device != device:
            slot.tensors = {k: v.to(device) for k, v in slot.tensors.items()}
            self.generation += 1
        missing = [r for r in rows if r not in slot.rows]
        if missing:
            fresh = rule.init_state(len(missing), device, dtype)
            for key, value in slot.tensors.items():
                shape = _row_shape(value, fresh[key])
                slot.tensors[key] = torch.cat(
                    [_pad_rows(value, shape), _pad_rows(fresh[key], shape)]
                )
            for r in missing:
                slot.rows[r] = len(slot.rows)
            self.generation += 1

    def prune(self, keep: Mapping[str, Sequence[str]]) -> None:
        """Drop the slots not in ``keep`` and the rows of layers a model no longer has."""
        for name in [n for n in self.slots if n not in keep]:
            del self.slots[name]
        for name, rows in keep.items():
            slot = self.slots.get(name)
            if slot is None or set(slot.rows) <= set(rows):
                continue
            kept = [r for r in slot.rows if r in set(rows)]
            index = torch.tensor([slot.rows[r] for r in kept], dtype=torch.long)
            slot.tensors = {
                k: v.index_select(0, index.to(v.device)) for k, v in slot.tensors.items()
            }
            slot.rows = {r: i for i, r in enumerate(kept)}
            self.generation += 1

    def load(self, name: str, index: torch.Tensor, whole: bool) -> State:
        """The rows at ``index`` of slot ``name`` (all of them, in order, if ``whole``)."""
        slot = self.slots[name]
        if whole:
            return dict(slot.tensors)
        return {k: v.index_select(0, index) for k, v in slot.tensors.items()}

    def store(
        self,
        name: str,
        index: torch.Tensor,
        whole: bool,
        old: State,
        new: State,
        keep: torch.Tensor | None,
    ) -> State:
        """Write ``new`` into the rows at ``index`` of slot ``name``, except where ``keep`` is true.

        Args:
            index: the rows, as for `load`; ``whole``: they are all rows, in order.
            old: what `load` returned for these rows this step.
            new: what the rule returned.
            keep: ``(R,)`` bool on the device: rows to leave as they were.

        Returns:
            The rows as written.
        """
        slot = self.slots[name]
        if new.keys() != old.keys():
            raise RuntimeError(
                f"{slot.rule.describe()} returned state {sorted(new)} but was given "
                f"{sorted(old)}: a rule returns the same state entries it is given"
            )
        written: State = {}
        for key, value in new.items():
            stored = slot.tensors[key]
            previous = old[key]
            if value.shape[1:] != stored.shape[1:]:  # the rule grew a buffer
                grown = _row_shape(stored, value)
                stored = slot.tensors[key] = _pad_rows(stored, grown)
                value, previous = _pad_rows(value, grown), _pad_rows(previous, grown)
            if keep is not None:
                mask = keep.view(-1, *([1] * (value.dim() - 1)))
                value = torch.where(mask, previous, value.to(previous.dtype))
            if whole:
                stored.copy_(value)
            else:
                stored.index_copy_(0, index, value.to(stored.dtype))
            written[key] = value
        if slot.rule.growable_state:
            slot.steps += 1
        return written

    # -- saving ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every slot, its rows by name, as CPU copies (growable buffers packed as bytes)."""
        rules: dict[str, Any] = {}
        for name, slot in self.slots.items():
            growable = slot.rule.growable_state
            tensors = slot.tensors
            if any(v.is_meta for v in tensors.values()):  # a model still on meta: fresh state
                dtype = next((v.dtype for v in tensors.values() if v.is_floating_point()), None)
                cpu = torch.device("cpu")
                tensors = slot.rule.init_state(len(slot.rows), cpu, dtype or torch.float64)
            rows = {
                row: {
                    k: pack_tensor(v[i]) if k in growable else v[i].detach().to("cpu", copy=True)
                    for k, v in tensors.items()
                }
                for row, i in slot.rows.items()
            }
            rules[name] = {"steps": slot.steps, "rows": rows}
        return {"format": FORMAT, "version": VERSION, "rules": rules}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Check ``state_dict`` against the slots completely, then install it.

        Raises:
            ValueError: not a normalizer state dict, an unsupported version, or
                one whose rules, layers or tensors differ from this normalizer's;
                nothing is changed then.
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != FORMAT:
            raise ValueError(
                "not a gradclip.GradientNormalizer state dict (its 'format' entry is missing "
                "or different); pass what GradientNormalizer.state_dict() returned"
            )
        version = state_dict.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"this state dict has format version {version!r}; this gradclip reads version "
                f"{' or '.join(map(str, READABLE_VERSIONS))}. A version-1 state (gradclip 0.1) "
                "held the adaptive rules' statistics by group position; restart those "
                "statistics (they re-learn within their warm-up) rather than convert them"
            )
        saved = state_dict.get("rules")
        if not isinstance(saved, Mapping):
            raise ValueError("the state dict has no 'rules' mapping")
        if set(saved) != set(self.slots):
            raise ValueError(
                "the state dict holds the state of rules "
                f"{sorted(saved)}, this normalizer has stateful rules {sorted(self.slots)}: "
                "it was saved for another configuration"
            )
        installs = [
            (self.slots[name], *self._check_slot(name, entry)) for name, entry in saved.items()
        ]
        if any(v.is_meta for slot in self.slots.values() for v in slot.tensors.values()):
            raise RuntimeError(
                "this normalizer's model is on the meta device, where a state holds no data: "
                "materialize the model first (model.to_empty(device=...)), then load the state"
            )
        for slot, steps, rows in installs:
            # a growable buffer takes the loaded length (every row of the slot is loaded),
            # so that state_dict() right after gives back exactly what was loaded
            for key in slot.rule.growable_state & slot.tensors.keys():
                shapes = [tuple(tensors[key].shape) for tensors in rows.values()]
                length = [max(dims) for dims in zip(*shapes)] if shapes else []
                stored = slot.tensors[key]
                if shapes and list(stored.shape[1:]) != length:
                    slot.tensors[key] = stored.new_zeros([stored.shape[0], *length])
                    self.generation += 1
            for row, tensors in rows.items():
                i = slot.rows[row]
                for key, value in tensors.items():
                    stored = slot.tensors[key]
                    stored[i].zero_()
                    stored[i][tuple(slice(0, n) for n in value.shape)] = value
            slot.steps = steps

    def _check_slot(self, name: str, entry: Any) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
        slot = self.slots[name]
        where = f"state of {name}"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("rows"), Mapping):
            raise ValueError(f"{where}: expected a mapping with 'steps' and 'rows'")
        steps = entry.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{where}: 'steps' must be an int >= 0, got {steps!r}")
        rows = entry["rows"]
        if set(rows) != set(slot.rows):
            raise ValueError(
                f"{where}: rows for layers {sorted(rows)}, this model has {sorted(slot.rows)}"
            )
        fresh = slot.rule.init_state(1, torch.device("cpu"), torch.float64)
        growable = slot.rule.growable_state
        checked: dict[str, dict[str, torch.Tensor]] = {}
        for row, tensors in rows.items():
            if not isinstance(tensors, Mapping) or set(tensors) != set(fresh):
                got = sorted(tensors) if isinstance(tensors, Mapping) else type(tensors).__name__
                raise ValueError(
                    f"{where}, row {row!r}: expected entries {sorted(fresh)}, got {got}"
                )
            tensors = dict(tensors)
            for key, value in tensors.items():
                want = fresh[key][0]
                if key in growable and isinstance(value, Mapping):  # packed as bytes
                    try:
                        value = tensors[key] = unpack_tensor(value)
                    except ValueError as err:
                        raise ValueError(f"{where}, row {row!r}, {key!r}: {err}") from None
                if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point != (
                    want.dtype.is_floating_point
                ):
                    raise ValueError(
                        f"{where}, row {row!r}, {key!r}: expected a tensor like {want.dtype}"
                    )
                shape_ok = value.shape == want.shape or (
                    key in growable
                    and value.dim() == want.dim()
                    and all(a >= b for a, b in zip(value.shape, want.shape))
                )
                if not shape_ok:
                    raise ValueError(
                        f"{where}, row {row!r}, {key!r}: shape {tuple(value.shape)}, expected "
                        f"{tuple(want.shape)}"
                    )
            checked[str(row)] = tensors
        return steps, checked
