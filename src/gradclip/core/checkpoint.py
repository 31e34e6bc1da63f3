"""Saving and restoring an engine's state: the state dict and what it records of the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradclip.core.engine import Engine
from gradclip.core.identity import LoadResult, row_key, shape_of
from gradclip.core.stages import check_stage_identity, stage_identity
from gradclip.core.state import FORMAT, StateStore

__all__ = ["covers_of", "fresh_rows", "load_state", "model_identity", "save_state"]


def model_identity(engine: Engine) -> dict[str, list[str]]:
    """The layers, parameters (with shapes) and rules a state dict records."""
    return {
        "layers": [layer.name for layer in engine.layers],
        "params": [
            f"{layer.qualified(k)}{shape_of(p)}"
            for layer in engine.layers
            for k, p in enumerate(layer.params)
        ],
        "layer_rules": [rule.describe() for rule in engine.rules],
    }


def save_state(engine: Engine, staged: bool = False) -> dict[str, Any]:
    """The engine's state dict: its rules' state and `model_identity` (on pipeline
    stages, ``staged``: `gradclip.core.stages.stage_identity`, keyed by layer)."""
    covers = (c for slot in engine.store.slots.values() for cs in slot.covers.values() for c in cs)
    if any("(?)" in c for c in covers):  # lazy modules since materialized: record their shapes
        engine._init_state()
    if staged:
        return {**engine.store.state_dict(), **stage_identity(engine.layers, engine.rules)}
    return {**engine.store.state_dict(), **model_identity(engine)}


def load_state(
    engine: Engine, state_dict: Mapping[str, Any], strict: bool, staged: bool = False
) -> LoadResult:
    """Load a state dict into the engine's store (see `StateStore.load_state_dict`).

    On pipeline stages (``staged``) the state dict's ``stage_layers`` must hold this
    stage's layers as they are (`gradclip.core.stages.check_stage_identity`).

    A format-2 state (gradclip 0.2) recorded no layers per row: it is read only
    for the model it was saved for (same layers and parameters).
    """
    if staged and isinstance(state_dict, Mapping):
        check_stage_identity(state_dict, stage_identity(engine.layers, engine.rules))
    if (
        isinstance(state_dict, Mapping)
        and state_dict.get("version") == 2
        and state_dict.get("format") == FORMAT
    ):
        mine = model_identity(engine)
        if any(state_dict.get(k) != mine[k] for k in ("layers", "params")):
            if strict:
                raise ValueError(
                    "this state dict (format version 2, gradclip 0.2) was saved for a "
                    "different model: its layers or parameters differ; nothing was "
                    "loaded (strict=False starts every rule afresh instead)"
                )
            return engine.store.load_state_dict({**state_dict, "rules": {}}, strict=False)
    # values are copied into the existing tensors; a grown buffer bumps the store's
    # generation, which makes the plan rebuild its row indices
    return engine.store.load_state_dict(state_dict, strict)


def covers_of(store: StateStore) -> dict[str, dict[str, tuple[str, ...]]]:
    """``{slot: {row: covered layers}}`` of a store."""
    return {
        name: {row: slot.covers.get(row, ()) for row in slot.rows}
        for name, slot in store.slots.items()
    }


def fresh_rows(before: Mapping[str, Mapping[str, tuple[str, ...]]], store: StateStore) -> list[str]:
    """The rows of ``store`` that are new, or cover other layers, since `covers_of` gave
    ``before``: those that started afresh."""
    return [
        row_key(name, row)
        for name, rows in covers_of(store).items()
        for row, covered in rows.items()
        if before.get(name, {}).get(row) != covered
    ]
