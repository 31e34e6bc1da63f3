"""The rules' state, owned by the engine and kept per layer name.

Each stateful rule of a normalizer has a *slot*, named after the rule's
state-relevant fields (and its position in a chain; see
`gradclip.core.identity`). A slot holds the rule's state tensors with one row
per layer (``per_layer_state``) or one row per group: ``"*"`` for the layers
of the default rule, ``"*[key]"`` for those of an override key. Each row
records the layers it covers. A step reads the rows of the layers that have
gradients, calls the rule and writes the rows back, except rows whose norm was
not finite that step: those stay exactly as they were, so one bad step cannot
spoil the statistics of the steps after it.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gradclip.core.identity import (
    GROUP_ROW,
    LoadResult,
    group_row,
    match_rows,
    row_key,
    same_cover,
    slot_name,
)
from gradclip.core.meta_state import moved_state, readable, refuse_on_meta
from gradclip.core.packing import pack_tensor, unpack_tensor
from gradclip.core.rule import Rule, State

__all__ = [
    "FORMAT",
    "GROUP_ROW",
    "READABLE_VERSIONS",
    "VERSION",
    "Slot",
    "StateStore",
    "is_stateful",
    "pack_tensor",
    "state_rows",
    "state_slot",
    "unpack_tensor",
]

FORMAT = "gradclip.GradientNormalizer"
# 1 (gradclip 0.1) kept the rules' statistics by group position; 2 (0.2) by layer name,
# with growable buffers as bytes; 3 names slots by their state-relevant fields only, gives
# each override key its own group row and records the layers each row covers
VERSION = 3
READABLE_VERSIONS = (2, 3)


def is_stateful(rule: Rule) -> bool:
    """Whether ``rule`` keeps state between steps (its fresh state is not empty)."""
    return bool(rule.init_state(1, torch.device("cpu"), torch.float64))


def state_slot(group_rule: Rule, k: int, stage: Rule, many: bool) -> str | None:
    """The slot of the ``k``-th rule ``stage`` of a group's rule, or ``None`` if stateless."""
    if not is_stateful(stage):
        return None
    return slot_name(stage, k if many else None)


def state_rows(rule: Rule, layer_names: Sequence[str], tag: str | None = None) -> list[str]:
    """The state rows a rule keeps for a group's layers: one per layer, or the group's one
    (``tag``: the override key that made the group, ``None`` for the default rule's)."""
    return list(layer_names) if rule.per_layer_state else [group_row(tag)]


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
    #: the layers each row covers (`gradclip.core.identity.layer_signature`)
    covers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the (slot, row) format version 2 gave each row, to read its checkpoints
    legacy: dict[str, tuple[str, str]] = field(default_factory=dict)

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
        covers: Mapping[str, tuple[str, ...]] | None = None,
        legacy: Mapping[str, tuple[str, str]] | None = None,
    ) -> None:
        """Make sure slot ``name`` exists on ``device`` with ``rows``; new rows start fresh.

        With ``covers`` (the layers of each row), a row that now covers other
        layers than it did starts fresh too: its state was not theirs.
        """
        slot = self.slots.get(name)
        if slot is None:
            tensors = rule.init_state(len(rows), device, dtype)
            slot = self.slots[name] = Slot(rule, {r: i for i, r in enumerate(rows)}, tensors)
            self.generation += 1
        else:
            first = next(iter(slot.tensors.values()))
            if first.device != device:  # moved (from meta: fresh, as nothing ran there)
                slot.tensors = moved_state(rule, slot.tensors, len(slot.rows), device, dtype)
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
            had = slot.covers
            moved = [r for r in rows if covers and r in had and not same_cover(had[r], covers[r])]
            if moved:
                self._reset(slot, moved)
        slot.covers.update(covers or {})
        slot.legacy.update(legacy or {})

    @staticmethod
    def _reset(slot: Slot, rows: Sequence[str]) -> None:
        """Give ``rows`` of ``slot`` a fresh state, in place (the plans stay valid)."""
        first = next(iter(slot.tensors.values()))
        dtype = next((v.dtype for v in slot.tensors.values() if v.is_floating_point()), None)
        fresh = slot.rule.init_state(1, first.device, dtype or torch.float64)
        for key, stored in slot.tensors.items():
            value = fresh[key][0].to(stored.dtype)
            for row in rows:
                target = stored[slot.rows[row]]
                target.zero_()
                target[tuple(slice(0, n) for n in value.shape)] = value

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
            slot.covers = {r: c for r, c in slot.covers.items() if r in slot.rows}
            slot.legacy = {r: c for r, c in slot.legacy.items() if r in slot.rows}
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
        """Every slot, its rows by name, as CPU copies (growable buffers packed as bytes),
        and the layers each row covers."""
        rules: dict[str, Any] = {}
        for name, slot in self.slots.items():
            growable = slot.rule.growable_state
            rows = {
                row: {
                    k: pack_tensor(v[i]) if k in growable else v[i].detach().to("cpu", copy=True)
                    for k, v in readable(slot.rule, slot.tensors, len(slot.rows)).items()
                }
                for row, i in slot.rows.items()
            }
            covers = {row: list(slot.covers.get(row, ())) for row in slot.rows}
            rules[name] = {"steps": slot.steps, "rows": rows, "covers": covers}
        return {"format": FORMAT, "version": VERSION, "rules": rules}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> LoadResult:
        """Check ``state_dict`` against the slots completely, then install what matches.

        A saved row is restored into a row here by the definition of
        `gradclip.core.identity` (same slot, same covered layers).

        Args:
            state_dict: what `state_dict` returned (format version 3, or 2 from
                gradclip 0.2, whose rows are matched through `Slot.legacy`).
            strict: refuse, changing nothing, unless every row here is restored
                and every saved row used.

        Returns:
            The rows left (`gradclip.core.identity.LoadResult`).

        Raises:
            ValueError: not a normalizer state dict, an unsupported version, a
                malformed entry, or (``strict``) a row left; nothing is changed then.
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
        ambiguous: list[str] = []
        if version == 2:
            saved, ambiguous = self._upgrade(saved)
        current = {
            name: {r: slot.covers.get(r, ()) for r in slot.rows}
            for name, slot in self.slots.items()
        }
        matched, left = match_rows(saved, current)
        for key in ambiguous:
            left.reasons[key] = (
                "saved by gradclip 0.2, where equal rules under several override keys shared "
                "one state; each key now has its own, which that shared state cannot be split into"
            )
        if strict and (left.missing_keys or left.unexpected_keys):
            raise ValueError(
                "this state dict was saved for a different model or configuration (state "
                f"identity: see gradclip.core.identity): {left.describe()}. Nothing was "
                "loaded; load_state_dict(..., strict=False) restores the rows that match "
                "and returns those it left"
            )
        installs = [
            (self.slots[name], *self._check_rows(name, saved[name], rows))
            for name, rows in matched.items()
        ]
        refuse_on_meta(slot.tensors for slot in self.slots.values())
        for slot, steps, rows in installs:
            self._install(slot, steps, rows)
        return left

    def _install(self, slot: Slot, steps: int, rows: dict[str, dict[str, torch.Tensor]]) -> None:
        # a growable buffer takes the loaded length when every row is loaded, so that
        # state_dict() right after gives back exactly what was loaded; else the longest
        for key in slot.rule.growable_state & slot.tensors.keys():
            shapes = [tuple(tensors[key].shape) for tensors in rows.values()]
            stored = slot.tensors[key]
            if len(rows) < len(slot.rows):
                shapes.append(tuple(stored.shape[1:]))
            length = [max(dims) for dims in zip(*shapes)] if shapes else []
            if shapes and list(stored.shape[1:]) != length:
                whole = len(rows) == len(slot.rows)
                slot.tensors[key] = (
                    stored.new_zeros([stored.shape[0], *length])
                    if whole
                    else _pad_rows(stored, length)
                )
                self.generation += 1
        for row, tensors in rows.items():
            i = slot.rows[row]
            for key, value in tensors.items():
                stored = slot.tensors[key]
                stored[i].zero_()
                stored[i][tuple(slice(0, n) for n in value.shape)] = value
        slot.steps = steps if len(rows) == len(slot.rows) else max(slot.steps, steps)

    def _upgrade(self, saved: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Format version 2's rules as version 3's, through each row's `Slot.legacy` name.

        Version 2 gave equal rules under several override keys one shared group
        row; such a row is ambiguous here and is left out (its rows start afresh).
        """
        claims: dict[tuple[str, str], int] = {}
        for slot in self.slots.values():
            for old in slot.legacy.values():
                claims[old] = claims.get(old, 0) + 1
        upgraded: dict[str, Any] = {}
        ambiguous: list[str] = []
        for name, slot in self.slots.items():
            rows: dict[str, Any] = {}
            steps = 0
            for row, (old_slot, old_row) in slot.legacy.items():
                entry = saved.get(old_slot)
                if not isinstance(entry, Mapping):
                    continue
                if claims[(old_slot, old_row)] > 1:
                    ambiguous.append(row_key(name, row))
                    continue
                old_rows = entry.get("rows")
                value = old_rows.get(old_row) if isinstance(old_rows, Mapping) else None
                if value is not None:
                    rows[row] = value
                    steps = max(steps, int(entry.get("steps", 0)))
            if rows:
                upgraded[name] = {
                    "steps": steps,
                    "rows": rows,
                    "covers": {row: list(slot.covers.get(row, ())) for row in rows},
                }
        return upgraded, ambiguous

    def _check_rows(
        self, name: str, entry: Mapping[str, Any], wanted: Sequence[str]
    ) -> tuple[int, dict[str, dict[str, torch.Tensor]]]:
        slot = self.slots[name]
        where = f"state of {name}"
        steps = entry.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{where}: 'steps' must be an int >= 0, got {steps!r}")
        fresh = slot.rule.init_state(1, torch.device("cpu"), torch.float64)
        growable = slot.rule.growable_state
        checked: dict[str, dict[str, torch.Tensor]] = {}
        for row in wanted:
            tensors = entry["rows"][row]
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
