"""Saving and restoring a normalizer's state (the adaptive rules' statistics).

The state dict holds only plain containers, strings, ints and CPU tensors, so
``torch.load(path)`` (``weights_only=True``) reads it back. It records the
layers, their parameter shapes and their rules, and loading refuses a state
saved for another model or other rules. Restored tensors are moved to the
gradients' device at the next step, and a resumed run continues bit for bit
as the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gradclip.core.engine import Engine
from gradclip.rules.adaptive import _PENDING, StatefulStrategy

__all__ = ["load_normalizer_state", "normalizer_state_dict"]

_FORMAT = "gradclip.GradientNormalizer"
_VERSION = 1


def _stateful_groups(engine: Engine) -> list[tuple[Any, StatefulStrategy, list[str]]]:
    """``(group key, strategy, layer names)`` of every stateful rule, in layer order."""
    groups: dict[Any, tuple[StatefulStrategy, list[str]]] = {}
    for layer, strategy in zip(engine.layers, engine.strategies):
        if isinstance(strategy, StatefulStrategy):
            groups.setdefault(strategy.group_key(), (strategy, []))[1].append(layer.name)
    return [(key, strategy, names) for key, (strategy, names) in groups.items()]


def _identity(engine: Engine) -> dict[str, list[str]]:
    return {
        "layers": [layer.name for layer in engine.layers],
        "params": [
            f"{layer.qualified(k)}{tuple(p.shape)}"
            for layer in engine.layers
            for k, p in enumerate(layer.params)
        ],
        "strategies": [strategy.describe() for strategy in engine.strategies],
    }


def normalizer_state_dict(engine: Engine) -> dict[str, Any]:
    """The state of every stateful rule of ``engine``, with what identifies the model."""
    groups = []
    for key, strategy, names in _stateful_groups(engine):
        state = engine.states.get(key)
        if state is not None:
            groups.append({"layers": names, "state": strategy.export_state(state)})
    return {"format": _FORMAT, "version": _VERSION, **_identity(engine), "groups": groups}


def _first_difference(what: str, saved: list[str], current: list[str]) -> str:
    for i, (a, b) in enumerate(zip(saved, current)):
        if a != b:
            return f"{what} {i} is {b!r} here but {a!r} in the state dict"
    return f"{len(current)} {what}s here but {len(saved)} in the state dict"


def load_normalizer_state(engine: Engine, state_dict: Mapping[str, Any]) -> None:
    """Validate ``state_dict`` against ``engine`` completely, then install it.

    Raises:
        ValueError: not a normalizer state dict, or one saved for a different
            model (layers, parameter names or shapes) or different rules.
    """
    if not isinstance(state_dict, Mapping) or state_dict.get("format") != _FORMAT:
        raise ValueError("not a gradclip.GradientNormalizer state dict")
    if state_dict.get("version") != _VERSION:
        raise ValueError(f"unsupported state dict version {state_dict.get('version')!r}")
    mine = _identity(engine)
    for field, what in (("layers", "layer"), ("params", "parameter"), ("strategies", "rule")):
        if list(state_dict[field]) != mine[field]:
            raise ValueError(
                "this state dict was saved for a different model or configuration: "
                + _first_difference(what, list(state_dict[field]), mine[field])
            )
    by_first_layer = {names[0]: (key, s, names) for key, s, names in _stateful_groups(engine)}
    installs = []
    for group in state_dict["groups"]:
        names = list(group["layers"])
        found = by_first_layer.get(names[0]) if names else None
        if found is None or found[2] != names:
            raise ValueError(
                f"the state dict has a rule state for layers {names} that no rule here owns"
            )
        key, strategy, _ = found
        strategy.check_saved(group["state"])
        installs.append((key, dict(group["state"])))
    for key, saved in installs:
        existing = engine.states.get(key)
        if existing is None:
            engine.states[key] = {_PENDING: saved}
        else:  # the engine's plan holds this very dict: update it in place
            existing.clear()
            existing[_PENDING] = saved
