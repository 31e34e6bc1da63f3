"""The rules' state of a model built on the meta device, which holds no data.

A normalizer built before ``model.to_empty(device=...)`` makes its state on
``meta`` too; no step can run there, so that state is fresh by definition:
when the model moves to a real device the state starts fresh there, and
``state_dict()`` before that gives the fresh state. Loading a state into meta
tensors would be lost at ``to_empty``: it is refused with what to do.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from gradclip.core.rule import Rule, State

__all__ = ["moved_state", "readable", "refuse_on_meta"]


def _on_meta(tensors: State) -> bool:
    return any(v.is_meta for v in tensors.values())


def moved_state(
    rule: Rule, tensors: State, rows: int, device: torch.device, dtype: torch.dtype
) -> State:
    """``tensors`` on ``device``; fresh if they were on meta (there is nothing to copy)."""
    if _on_meta(tensors) and device.type != "meta":
        return rule.init_state(rows, device, dtype)
    return {k: v.to(device) for k, v in tensors.items()}


def readable(rule: Rule, tensors: State, rows: int) -> State:
    """``tensors``, or the fresh state on the CPU in their dtype if they are on meta."""
    if not _on_meta(tensors):
        return tensors
    dtype = next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.float64)
    return rule.init_state(rows, torch.device("cpu"), dtype)


def refuse_on_meta(slots: Iterable[State]) -> None:
    """Raise ``RuntimeError`` if any state is on meta: a state loaded there would be lost."""
    if any(_on_meta(tensors) for tensors in slots):
        raise RuntimeError(
            "this normalizer's model is on the meta device, where a state holds no data: "
            "materialize the model first (model.to_empty(device=...)), then load the state"
        )
