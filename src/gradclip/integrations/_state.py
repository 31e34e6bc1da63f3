"""The trainer callbacks' state: one normalizer state dict per optimizer, in a versioned envelope.

A callback holds a `GradientNormalizer` per optimizer (the Hugging Face
``Trainer`` has one); its state is theirs, in the optimizers' order, as plain
containers and CPU tensors, so that Lightning's checkpoint (read with
``weights_only=True``) and ``torch.load(..., weights_only=True)`` take it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradclip.core.state import FORMAT as NORMALIZER_FORMAT

__all__ = ["FORMAT", "VERSION", "pack", "unpack"]

FORMAT = "gradclip.TrainerCallback"
VERSION = 1


def pack(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The callback's state dict from its normalizers' state dicts, in optimizer order."""
    return {"format": FORMAT, "version": VERSION, "optimizers": [dict(s) for s in states]}


def unpack(state_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The normalizers' state dicts inside a callback state dict (or a normalizer's own).

    A `GradientNormalizer.state_dict` is taken as the state of the only
    optimizer, so a normalizer's state can be handed to a callback by hand.

    Raises:
        ValueError: neither a callback nor a normalizer state dict, or another version.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (a mapping), got {type(state_dict).__name__}")
    if state_dict.get("format") == NORMALIZER_FORMAT:
        return [dict(state_dict)]
    if state_dict.get("format") != FORMAT:
        raise ValueError(
            "not a gradclip callback state dict (its 'format' entry is "
            f"{state_dict.get('format')!r}); pass what the callback's state_dict() returned"
        )
    if state_dict.get("version") != VERSION:
        raise ValueError(
            f"this callback state dict has version {state_dict.get('version')!r}; this gradclip "
            f"reads version {VERSION}"
        )
    states = state_dict.get("optimizers")
    if not isinstance(states, list | tuple) or not all(isinstance(s, Mapping) for s in states):
        raise ValueError("the callback state dict has no 'optimizers' list of state dicts")
    return [dict(s) for s in states]
