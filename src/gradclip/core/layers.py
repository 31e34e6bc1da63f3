"""What a *layer* is: grouping a model's parameters the way DL4J groups them.

By default every module that directly owns parameters is one layer, named by
its qualified module name (``""`` for the root); its *param types* are those
direct parameters, named as PyTorch names them (``weight``, ``bias``,
``weight_hh_l0``, ...). A parametrized module (``weight_norm``, ``spectral_norm``,
``orthogonal``) is one layer with the tensors under its ``parametrizations``
(``parametrizations.weight.original0``, see `gradclip.core.parametrized`). A
parameter shared by several modules (tied embeddings) belongs to the first
module that owns it, in ``named_modules()`` order, and is normalized once.

Users can pass their own grouping instead: a mapping of layer name to
parameters, or a list of parameter lists.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import operator
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
from torch import nn

from gradclip.core.parametrized import layer_parameters, parametrization_hosts

__all__ = [
    "Layer",
    "Target",
    "build_layers",
    "match_overrides",
    "resolve_override_keys",
    "reusable",
    "same_layers",
    "tied_layers",
    "unwrap_module",
]

Target: TypeAlias = (
    nn.Module
    | torch.Tensor
    | Mapping[str, Any]
    | Iterable[torch.Tensor]
    | Iterable[Iterable[torch.Tensor]]
)


@dataclass(frozen=True, eq=False)
class Layer:
    """One layer: a name and its named parameters.

    Attributes:
        name: the layer's name (``""`` for a root module's own parameters).
        param_names: the name of each parameter within the layer.
        params: the parameters.
        explicit: the user listed these tensors themselves: they are normalized
            whenever they have a ``.grad``, even with ``requires_grad=False`` (as
            ``clip_grad_norm_`` does); parameters found by walking a module are
            skipped while frozen.
        owners: for parameters found in a module, the ``_parameters`` mapping
            that holds each (the module's, or its parametrizations') and its key
            there, so that a parameter replaced behind the registration hooks is
            noticed.
    """

    name: str
    param_names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]
    explicit: bool = False
    owners: tuple[tuple[Mapping[str, Any], str], ...] = ()

    def qualified(self, index: int) -> str:
        """``"layer.param"`` (or just ``"param"`` for the root layer)."""
        return f"{self.name}.{self.param_names[index]}" if self.name else self.param_names[index]


def unwrap_module(module: nn.Module) -> nn.Module:
    """The user's own model inside DDP, DataParallel or ``torch.compile`` wrappers.

    Layer names and override keys are then the same before and after wrapping.
    """
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):
            module = module._orig_mod  # torch.compile's OptimizedModule
        else:
            return module


# Name components that wrappers insert between a module and its children:
# torch.compile's OptimizedModule (`_orig_mod`), FSDP1 and activation checkpointing.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _clean_name(name: str) -> str:
    # A wrapped submodule keeps the name of the module the user wrote, at any depth.
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _layers_of_module(module: nn.Module) -> list[Layer]:
    seen: set[int] = set()
    layers: list[Layer] = []
    for module_name, submodule in unwrap_module(module).named_modules():
        mine = [entry for entry in layer_parameters(submodule) if id(entry.param) not in seen]
        seen.update(id(entry.param) for entry in mine)
        if mine:
            names, owners, keys, params = zip(*mine, strict=True)
            owned = tuple(zip(owners, keys, strict=True))
            layers.append(Layer(_clean_name(module_name), names, params, False, owned))
    return layers


def tied_layers(module: nn.Module) -> dict[str, str]:
    """Modules that are no layer of their own because all their parameters are another's.

    A parameter shared by several modules belongs to the first that owns it
    (see the module docstring), so a module whose parameters are all shared —
    GPT-2's ``lm_head``, tied to ``transformer.wte`` — or a module registered
    under a second name is not a layer, nor is a module under a parametrized
    module's ``parametrizations`` (``"0.parametrizations.weight"``, part of
    layer ``"0"``). Its name still means that layer to a user.

    Returns:
        ``{module name: the name of the layer that owns its parameters}``.

    Examples:
        >>> emb = torch.nn.Embedding(10, 4)
        >>> head = torch.nn.Linear(4, 10, bias=False)
        >>> head.weight = emb.weight
        >>> tied_layers(torch.nn.ModuleDict({"wte": emb, "lm_head": head}))
        {'lm_head': 'wte'}
    """
    owner = {id(p): layer.name for layer in _layers_of_module(module) for p in layer.params}
    layer_names = set(owner.values())
    tied: dict[str, str] = {}
    root = unwrap_module(module)
    hosts = parametrization_hosts(root)
    for raw, submodule in root.named_modules(remove_duplicate=False):
        name = _clean_name(raw)
        if name in layer_names or name in tied:
            continue
        owners = {owner.get(id(entry.param)) for entry in layer_parameters(submodule)}
        if raw in hosts and len(owners) != 1:  # part of a parametrized module: its layer
            host = _clean_name(hosts[raw])
            owners = {host if host in layer_names else tied.get(host)}
        if len(owners) == 1 and None not in owners:
            (tied[name],) = owners  # type: ignore[assignment]
    return tied


def resolve_override_keys(model: nn.Module, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check override keys against ``model``'s layers; a tied module's name becomes its layer's.

    The name of a module that is no layer of its own (`tied_layers`: GPT-2's
    ``lm_head``, a parametrization's ``"0.parametrizations.weight"``) is taken
    as the name of the layer holding its parameters: a rule for it is a rule
    for those tensors.

    Returns:
        The overrides, with the names of tied modules replaced by their layers'.

    Raises:
        KeyError: a key matches no layer (the message names the closest one).
        ValueError: a tied module and its layer are both overridden, differently.
    """
    names = [layer.name for layer in build_layers(model)]
    tied = tied_layers(model)
    resolved: dict[str, Any] = {}
    renamed: dict[str, str] = {}
    for key, value in overrides.items():
        target = key
        if key in tied:
            try:
                match_overrides(names, {key: value})
            except KeyError:
                target = tied[key]
        if target in resolved and resolved[target] != value:
            first = renamed.get(target, target)
            alias = key if key != target else first
            raise ValueError(
                f"override keys {first!r} and {key!r} both name layer {target!r} ({alias} "
                "shares its parameters, which are normalized once) with different rules; keep one"
            )
        resolved[target] = value
        if target != key:
            renamed.setdefault(target, key)
    match_overrides(names, resolved)
    return resolved


def _module_params(module: nn.Module) -> Layer:
    """A module given as one layer of a custom grouping, with the owners of its parameters
    (so that a parameter replaced in it is followed, as for a module target)."""
    seen: set[int] = set()
    names: list[str] = []
    params: list[torch.Tensor] = []
    owners: list[tuple[Mapping[str, Any], str]] = []
    for prefix, submodule in module.named_modules():
        for key, param in submodule._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            names.append(_clean_name(f"{prefix}.{key}" if prefix else key))
            params.append(param)
            owners.append((submodule._parameters, key))
    return Layer("", tuple(names), tuple(params), False, tuple(owners))


def _named_tensors(value: Any, where: str) -> tuple[list[str], list[torch.Tensor]]:
    """Parameters of one user-given layer: a module, a tensor, a name->tensor mapping or a list."""
    if isinstance(value, nn.Module):
        layer = _module_params(value)
        return list(layer.param_names), list(layer.params)
    if isinstance(value, torch.Tensor):
        return ["0"], [value]
    if isinstance(value, Mapping):
        items = list(value.items())
        for name, tensor in items:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{where}[{name!r}] must be a tensor, got {type(tensor).__name__}")
        return [str(n) for n, _ in items], [t for _, t in items]
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        tensors = list(value)
        for i, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"{where}[{i}] must be a tensor (a parameter), got {type(tensor).__name__}"
                )
        return [str(i) for i in range(len(tensors))], tensors
    raise TypeError(
        f"{where} must be a module, a tensor, a mapping of names to tensors or a list of "
        f"tensors; got {type(value).__name__}"
    )


def _dedup(layers: list[Layer]) -> list[Layer]:
    seen: set[int] = set()
    result: list[Layer] = []
    for layer in layers:
        owners: Sequence[Any] = layer.owners or [None] * len(layer.params)
        keep = [
            (n, p, o)
            for n, p, o in zip(layer.param_names, layer.params, owners)
            if id(p) not in seen
        ]
        seen.update(id(p) for _, p, _ in keep)
        if keep:
            names, params = tuple(n for n, _, _ in keep), tuple(p for _, p, _ in keep)
            kept_owners = tuple(o for _, _, o in keep) if layer.owners else ()
            result.append(Layer(layer.name, names, params, layer.explicit, kept_owners))
    return result


def reusable(target: Target) -> Target:
    """``target`` in a form that can be walked again: an iterator becomes a list."""
    if isinstance(target, nn.Module | torch.Tensor | Mapping | list | tuple | str | bytes):
        return target
    return list(target) if isinstance(target, Iterable) else target


def build_layers(target: Target) -> list[Layer]:
    """Group ``target``'s parameters into layers.

    Args:
        target: one of

            * an ``nn.Module``: one layer per module that directly owns parameters
              (a parametrized module: with those under its ``parametrizations``);
            * a mapping ``{layer_name: params}`` where ``params`` is a module, a
              tensor, a mapping ``{param_name: tensor}`` or a list of tensors;
            * a list of parameter lists: layer ``i`` is named ``"i"``;
            * a single tensor or a flat iterable of tensors (``model.parameters()``):
              one layer named ``""`` holding them all, as ``clip_grad_norm_`` does.

    Returns:
        The layers in order, each parameter in exactly one layer.

    Raises:
        TypeError: ``target`` is none of the above.
    """
    if isinstance(target, nn.Module):
        return _layers_of_module(target)
    if isinstance(target, torch.Tensor):
        return [Layer("", ("0",), (target,), True)]
    if isinstance(target, Mapping):
        layers = []
        for name, value in target.items():
            if not isinstance(name, str):
                raise TypeError(f"layer names must be strings, got {type(name).__name__} {name!r}")
            if isinstance(value, nn.Module):
                layers.append(dataclasses.replace(_module_params(value), name=name))
                continue
            names, tensors = _named_tensors(value, f"target[{name!r}]")
            layers.append(Layer(name, tuple(names), tuple(tensors), True))
        return _dedup(layers)
    if isinstance(target, Iterable) and not isinstance(target, str | bytes):
        items = list(target)
        if not items:
            warnings.warn(
                "gradclip got an empty iterable of parameters (an exhausted generator such as "
                "a reused model.parameters()?): nothing is normalized",
                UserWarning,
                stacklevel=3,
            )
        if all(isinstance(item, torch.Tensor) for item in items):
            flat = tuple(str(i) for i in range(len(items)))
            return _dedup([Layer("", flat, tuple(items), True)])
        layers = []
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                raise TypeError(
                    "target mixes tensors and lists of tensors; pass either a flat list of "
                    "parameters (one layer) or a list of parameter lists (one layer each)"
                )
            if isinstance(item, nn.Module):
                layers.append(dataclasses.replace(_module_params(item), name=str(i)))
                continue
            names, tensors = _named_tensors(item, f"target[{i}]")
            layers.append(Layer(str(i), tuple(names), tuple(tensors), True))
        return _dedup(layers)
    raise TypeError(
        "target must be an nn.Module, a tensor, a mapping of layer names to parameters, or a "
        f"list of parameter lists; got {type(target).__name__}"
    )


def _is_glob(key: str) -> bool:
    return any(ch in key for ch in "*?[")


def _specificity(key: str, layer_name: str) -> tuple[int, int]:
    """How closely an override key names a layer, higher wins; ``(0, 0)``: no match.

    An exact name ``(3, 0)``; a glob ``(2, literal components)``; the name of
    an enclosing module ``(1, its length)``.
    """
    if key == layer_name:
        return (3, 0)
    if _is_glob(key) and fnmatch.fnmatchcase(layer_name, key):
        return (2, sum(not _is_glob(part) for part in key.split(".")))
    if key == "" or layer_name.startswith(key + "."):
        return (1, len(key))
    return (0, 0)


def _closest(key: str, layer_names: list[str]) -> str:
    """A hint naming the layer closest to a key that matched none ("" if none is close)."""
    close = difflib.get_close_matches(key, layer_names, n=1, cutoff=0.6)
    if not close:  # the last components often say more than the full path
        tails = {name.rsplit(".", 1)[-1]: name for name in layer_names}
        hits = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.75)
        close = [tails[hit] for hit in hits]
    return f" The closest layer is {close[0]!r}." if close else ""


def match_overrides(layer_names: list[str], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Assign each layer the override that names it most specifically.

    A key matches a layer if it is the layer's name, a glob pattern
    (``"blocks.*.attn"``) or the name of a module containing it (``"encoder"``
    covers ``"encoder.0"``). When several keys match a layer:

    1. an exact layer name wins over any other key;
    2. then a glob wins over a module name; among globs, the one with more
       literal dot-separated components (``"blocks.*.attn"`` has two,
       ``"blocks.*"`` one);
    3. among module names, the longer one (the innermost module);
    4. a tie goes to the later key.

    Wrapper components in a key
    (``"body._orig_mod.2"`` of a ``torch.compile``-d ``body``) are ignored, as
    they are in layer names.

    Returns:
        ``{layer_name: key}``: the winning key of each layer some key matched.

    Raises:
        KeyError: a key matches no layer; the message names the closest layer
            and lists the layer names.

    Examples:
        >>> match_overrides(["body.0", "body.2", "head"], {"body": "None", "body.2": "None"})
        {'body.0': 'body', 'body.2': 'body.2'}
        >>> match_overrides(["blocks.0.attn", "blocks.0.mlp"], {"blocks.*.attn": 1, "blocks": 2})
        {'blocks.0.attn': 'blocks.*.attn', 'blocks.0.mlp': 'blocks'}
    """
    best: dict[str, tuple[tuple[int, int], int, str]] = {}
    for order, key in enumerate(overrides):
        if not isinstance(key, str):
            raise TypeError(f"override keys must be layer names or patterns, got {key!r}")
        clean = _clean_name(key)
        matched = False
        for name in layer_names:
            rank = _specificity(clean, name)
            if rank[0] == 0:
                continue
            matched = True
            score = (rank, order, key)
            if name not in best or score[:2] > best[name][:2]:
                best[name] = score
        if not matched:
            shown = ", ".join(repr(n) for n in layer_names[:50])
            more = f" and {len(layer_names) - 50} more" if len(layer_names) > 50 else ""
            raise KeyError(
                f"override key {key!r} matches no layer.{_closest(clean, layer_names)} Keys are "
                "module names (or glob patterns such as 'blocks.*.attn'); a module whose "
                "parameters are all shared with an earlier one (tied weights) is part of that "
                "earlier layer, and a parametrized module is one layer with its "
                f"parametrizations. The layers are: {shown}{more}"
            )
    return {name: score[2] for name, score in best.items()}


def same_layers(new: Sequence[Layer], old: Sequence[Layer]) -> bool:
    """Whether ``new`` are ``old``: the same names, parameter names and parameter objects."""
    return len(new) == len(old) and all(
        a.name == b.name
        and a.param_names == b.param_names
        and all(map(operator.is_, a.params, b.params))
        for a, b in zip(new, old)
    )
