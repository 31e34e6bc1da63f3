"""How a `GradientNormalizer` is copied and pickled.

A copy holds its model strongly (as a copied optimizer holds its parameters)
and carries the rules' state; it is attached to no optimizer and has no last
report (both belong to the original). A process group is a handle of this
process, which does not copy: a deep copy shares it.
"""

from __future__ import annotations

import copy
import threading
import weakref
from typing import Any

__all__ = ["deep_copy", "pickled_state", "restore"]


def pickled_state(normalizer: Any) -> dict[str, Any]:
    """``normalizer.__dict__`` as a copy or a pickle takes it."""
    state = dict(normalizer.__dict__)
    state["_model"] = normalizer._module()
    state["_model_ref"] = None
    del state["_lock"]
    state["_attached"] = None
    state["last_report"] = None
    return state


def restore(normalizer: Any, state: dict[str, Any]) -> None:
    """Fill ``normalizer`` from `pickled_state`, with a lock and attachments of its own."""
    normalizer.__dict__.update(state)
    normalizer._lock = threading.Lock()
    normalizer._attached = weakref.WeakKeyDictionary()


def deep_copy(normalizer: Any, memo: dict[int, Any], groups: tuple[Any, ...]) -> Any:
    """A deep copy of ``normalizer`` sharing the process ``groups`` (``None`` entries skipped)."""
    for group in groups:
        if group is not None:
            memo[id(group)] = group
    cls: type = type(normalizer)
    new: Any = object.__new__(cls)
    memo[id(normalizer)] = new
    restore(new, copy.deepcopy(pickled_state(normalizer), memo))
    return new
