"""Whether a model's structure changed: its registration count and its modules' children.

PyTorch calls its registration hooks (counted by `structure_version`)
when a submodule or a parameter is set, never when one is deleted:
``del model.layers[1]``, ``model.blocks.pop("2")``, ``del model.head``. A
deletion always shortens the parent's ``_modules``, and a module set goes
through a hook (or, written into ``_modules`` directly as ``ModuleList.insert``
does, lengthens it), so comparing the number of children of every module that
has some finds every change the hooks miss. It costs one ``len`` per such
module each step: a model of 1,000 layers in one ``Sequential`` has one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

__all__ = ["ModelStructure", "structure_version", "watch_module_structure"]

# Bumped whenever any module registers a parameter or a submodule, so that a
# normalizer notices `model.head = nn.Linear(...)` without walking the model on
# every step.
_structure_version = 0
_hooks_installed = False


def _bump(*_: Any) -> None:
    global _structure_version
    _structure_version += 1


def watch_module_structure() -> None:
    """Install (once) the global hooks that count parameter and submodule registrations."""
    global _hooks_installed
    if not _hooks_installed:
        nn.modules.module.register_module_parameter_registration_hook(_bump)
        nn.modules.module.register_module_module_registration_hook(_bump)
        _hooks_installed = True


def structure_version() -> int:
    """How many parameters and submodules have been registered anywhere so far."""
    return _structure_version


def _roots(target: Any) -> list[nn.Module]:
    """The modules of a target: a module, the stages, or the modules in a custom grouping."""
    if isinstance(target, nn.Module):
        return [target]
    values: Iterable[Any] = ()
    if isinstance(target, Mapping):
        values = target.values()
    elif isinstance(target, list | tuple):
        values = target
    roots: list[nn.Module] = []
    for value in values:
        if isinstance(value, nn.Module):
            roots.append(value)
        elif isinstance(value, list | tuple):  # a layer given as a list of modules or tensors
            roots.extend(v for v in value if isinstance(v, nn.Module))
    return roots


class ModelStructure:
    """A target's structure as last seen: the registrations so far and the number of
    children of each of its modules that has some.

    Args:
        target: a module, a sequence of stage modules, or a custom grouping.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> seen = ModelStructure(model)
        >>> seen.changed()
        False
        >>> del model[1]
        >>> seen.changed()
        True
    """

    def __init__(self, target: Any) -> None:
        self._version = structure_version()
        parents: dict[int, nn.Module] = {}
        for root in _roots(target):
            for module in root.modules():
                if module._modules:
                    parents.setdefault(id(module), module)
        # their child mappings, not the modules: a normalizer must not keep its model
        # alive (`gradclip.normalize_` caches it by a weak reference). A ModuleList
        # deletes from its mapping before it renumbers into a new one.
        self._children = [module._modules for module in parents.values()]
        self._counts = self._now()

    def _now(self) -> list[int]:
        return list(map(len, self._children))

    def changed(self) -> bool:
        """Whether something was registered anywhere, or a module lost a child, since."""
        return self._version != structure_version() or self._now() != self._counts
