"""Parametrized modules: one layer, with the tensors their parametrizations hold.

``torch.nn.utils.parametrize.register_parametrization`` (behind
``weight_norm``, ``spectral_norm`` and ``orthogonal``) moves a module's
``weight`` into ``module.parametrizations.weight.original`` (``original0``,
``original1``, ... when the parametrization's ``right_inverse`` returns several
tensors) and computes ``weight`` from them in every forward pass. The gradient
of that module is then the gradient of those tensors and of any parameters the
parametrization modules own, so the module's layer holds its direct parameters
and every parameter under its ``parametrizations``, named relative to the
module as ``named_parameters()`` names them (``parametrizations.weight.original0``).

Each parameter is given with the ``_parameters`` mapping that really holds it,
so that a parameter replaced there is noticed as for any other layer.

Examples:
    >>> linear = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 8))
    >>> [entry.name for entry in layer_parameters(linear)]
    ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

__all__ = ["LayerParameter", "layer_parameters", "parametrization_hosts"]


class LayerParameter(NamedTuple):
    """One parameter of a module's layer and where it is held."""

    name: str  # within the layer, as ``named_parameters()`` of the layer's module names it
    owner: Mapping[str, Any]  # the ``_parameters`` mapping that holds it
    key: str  # its key there
    param: torch.Tensor


_PARAMETRIZATIONS = "parametrizations"  # the ModuleDict torch's parametrize registers


def _parametrizations(module: nn.Module) -> nn.ModuleDict | None:
    """``module.parametrizations`` if torch's ``parametrize`` parametrized ``module``."""
    # torch's `is_parametrized`, read from `_modules` (a getattr that misses costs an
    # exception on every plain module) and narrowed to torch's ParametrizationList
    # entries: a user's own ModuleDict named `parametrizations` is a module like any other
    modules = module._modules  # a script module's has no `get`
    entries = modules[_PARAMETRIZATIONS] if _PARAMETRIZATIONS in modules else None  # noqa: SIM401
    if (
        isinstance(entries, nn.ModuleDict)
        and len(entries) > 0
        and all(isinstance(entry, ParametrizationList) for entry in entries.values())
    ):
        return entries
    return None


def layer_parameters(module: nn.Module) -> list[LayerParameter]:
    """The parameters of ``module``'s own layer: its direct ones, then (if it is
    parametrized) every one under its ``parametrizations``, in ``named_parameters()`` order.

    A parameter reachable twice is listed once; parameters shared with other
    modules are left to the caller (the first layer that owns one keeps it).

    Args:
        module: any module.

    Returns:
        Each parameter with its name and the mapping and key that hold it.
    """
    found = [
        LayerParameter(key, module._parameters, key, param)
        for key, param in module._parameters.items()
        if param is not None
    ]
    parametrizations = _parametrizations(module)
    if parametrizations is not None:
        seen = {id(entry.param) for entry in found}
        for prefix, submodule in parametrizations.named_modules(prefix=_PARAMETRIZATIONS):
            for key, param in submodule._parameters.items():
                if param is None or id(param) in seen:
                    continue
                seen.add(id(param))
                found.append(LayerParameter(f"{prefix}.{key}", submodule._parameters, key, param))
    return found


def parametrization_hosts(root: nn.Module) -> dict[str, str]:
    """``{module name: the parametrized module it serves}`` for every module under a
    parametrized module's ``parametrizations``, under every name ``root`` gives it.

    Such a module (``"0.parametrizations.weight"`` of a ``weight_norm``-ed
    ``"0"``) holds part of its host's layer, so its name, which users see in
    ``named_parameters()``, means that layer. For a parametrization that is
    itself parametrized, the outermost parametrized module is the host.

    Examples:
        >>> model = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(
        ...     torch.nn.Linear(4, 8)))
        >>> parametrization_hosts(model)
        {'0.parametrizations': '0', '0.parametrizations.weight': '0',
         '0.parametrizations.weight.0': '0'}
    """
    hosts: dict[str, str] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        served = None if name in hosts else _parametrizations(module)
        if served is None:
            continue
        start = f"{name}.{_PARAMETRIZATIONS}" if name else _PARAMETRIZATIONS
        for inner, _ in served.named_modules(prefix=start, remove_duplicate=False):
            hosts.setdefault(inner, name)
    return hosts
