"""Composition of strategies, and the short names the command line uses.

``chain(a, b, c)`` applies ``a``, then ``b`` to the gradients ``a`` left, then
``c``: each rule sees the gradients as the previous one left them, so the
norms are measured again between rules (one ``_foreach_norm`` per (device,
dtype) for each later rule that reads norms). This is optax's ``chain`` for
gradient transformations, e.g. element-wise clipping followed by a global
norm clip.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from gradclip.core.kernels import accumulation_dtype
from gradclip.core.rule import GroupView, Strategy
from gradclip.core.sharding import CrossRank
from gradclip.rules.adaptive import _PENDING, AutoClip, StatefulStrategy, ZClip
from gradclip.rules.agc import AdaptiveGradClip
from gradclip.rules.dl4j import resolve_strategy
from gradclip.rules.global_norm import ClipGlobalNorm, device_dtype_runs, per_tensor_norms

__all__ = ["STRATEGY_FACTORIES", "Chain", "chain", "strategy_from_name"]


# (start, stop, coefficient buffer on the run's device, its 0-d views) per run
_Buffer = tuple[int, int, torch.Tensor, tuple[torch.Tensor, ...]]


def _asks_cross_rank(strategy: Strategy) -> bool:
    return type(strategy).cross_rank is not Strategy.cross_rank


def _as_strategy(item: Any, index: int) -> Strategy:
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"chain item {index} must be a strategy or (mode, threshold)")
        return resolve_strategy(item[0], item[1])
    return resolve_strategy(item)


class Chain(StatefulStrategy):
    """Several strategies applied one after the other to the same layers.

    Build it with `chain`. The first rule receives the norms the engine
    measured (which are also the report's); each later rule that reads norms
    gets them measured again on the gradients as the previous rules left them.
    Stateful rules keep their own state inside the chain's, saved and restored
    with it.
    """

    name = "chain"
    scales = False

    def __init__(self, strategies: tuple[Strategy, ...]) -> None:
        self.strategies = strategies
        # The chain can say which layers changed only if every rule in it can.
        self.reports_changes = all(s.reports_changes for s in strategies)  # type: ignore[misc]

    def config(self) -> Mapping[str, Any]:
        return {"strategies": self.strategies}

    def cross_rank(self, view: GroupView) -> CrossRank | None:
        # Called on sharded gradients before the step's collective, so refusing
        # here leaves every gradient untouched. The first rule gets the engine's
        # reduced L2 norms; a later rule would re-measure norms on this rank's
        # shard alone, and no rule inside a chain joins the cross-rank reduction.
        first, later = self.strategies[0], self.strategies[1:]
        if _asks_cross_rank(first) or any(s.measures_norms or _asks_cross_rank(s) for s in later):
            raise NotImplementedError(
                "chain() on sharded (DTensor/FSDP2) gradients is exact only when its first "
                "rule needs L2 norms alone and the later rules read no norms (e.g. "
                "chain('ClipL2PerLayer', ('ClipElementWiseAbsoluteValue', 0.5))); this one "
                f"is {self.describe()}. Use overrides (one rule per layer) instead."
            )
        return None

    def describe(self) -> str:
        return f"chain({', '.join(s.describe() for s in self.strategies)})"

    # -- state ----------------------------------------------------------------------
    def new_state(
        self, num_layers: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        return {"children": [s.init_state(num_layers, device, dtype) for s in self.strategies]}

    def ready(self, view: GroupView) -> dict[str, Any]:
        state = view.state
        saved = state.pop(_PENDING, None)
        if saved is not None:
            self.check_saved(saved)
            children = []
            for strategy, child in zip(self.strategies, saved["children"]):
                if child is None:
                    n = len(view.layer_names)
                    children.append(strategy.init_state(n, view.device, view.dtype))
                else:
                    children.append({_PENDING: child})
            state["children"] = children
        self._bound = state
        return state

    def export_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if _PENDING in state:
            return dict(state[_PENDING])
        children = [
            s.export_state(c) if isinstance(s, StatefulStrategy) else None
            for s, c in zip(self.strategies, state["children"])
        ]
        return {**self._identity(), "children": children}

    # -- applying -------------------------------------------------------------------
    def _buffers(self, view: GroupView) -> list[_Buffer]:
        cached = view.cache.get("buffers")
        if cached is not None:
            buffers: list[_Buffer] = cached
            return buffers
        buffers = []
        for start, stop in device_dtype_runs(view):
            first = view.grads[start]
            buf = torch.ones(
                stop - start, dtype=accumulation_dtype(first.dtype), device=first.device
            )
            buffers.append((start, stop, buf, buf.unbind(0)))
        view.cache["buffers"] = buffers
        return buffers

    def _thresholds(self, view: GroupView, k: int) -> tuple[torch.Tensor, list[float]]:
        key = f"thresholds{k}"
        cached = view.cache.get(key)
        if cached is None:
            t = float(self.strategies[k].threshold)
            layer = torch.full((len(view.layer_names),), t, dtype=view.dtype, device=view.device)
            cached = view.cache[key] = (layer, [t] * len(view.grads))
        return cached  # type: ignore[no-any-return]

    def transform_(self, view: GroupView) -> None:
        state = self.ready(view)
        num_layers = len(view.layer_names)
        changed = torch.zeros(num_layers, dtype=torch.bool, device=view.device)
        tensor_norms, layer_norms = view.tensor_norms, view.layer_norms
        for k, (strategy, child_state) in enumerate(zip(self.strategies, state["children"])):
            if k > 0 and (strategy.measures_norms or strategy.scales):
                tensor_norms = per_tensor_norms(view, 2.0)
                squares = torch.zeros(num_layers, dtype=view.dtype, device=view.device)
                squares.index_add_(0, view.tensor_layer, tensor_norms.square())
                layer_norms = squares.sqrt_()
            elif k > 0:
                tensor_norms = layer_norms = None
            layer_thresholds, host_thresholds = self._thresholds(view, k)
            sub = GroupView(
                layer_names=view.layer_names,
                param_names=view.param_names,
                grads=view.grads,
                params=view.params,
                tensor_layer=view.tensor_layer,
                layer_thresholds=layer_thresholds,
                host_thresholds=host_thresholds,
                tensor_norms=tensor_norms,
                layer_norms=layer_norms,
                device=view.device,
                dtype=view.dtype,
                state=child_state,
                cache=view.cache.setdefault(f"child{k}", {}),
            )
            if strategy.scales:
                coef = strategy.scale(sub)
                for start, stop, buf, views in self._buffers(view):
                    buf.copy_(coef[start:stop], non_blocking=True)
                    torch._foreach_mul_(view.grads[start:stop], views)
                flags = torch.zeros(num_layers, dtype=torch.int32, device=view.device)
                flags.index_add_(0, view.tensor_layer, (coef != 1).to(torch.int32))
                changed |= flags > 0
            else:
                strategy.transform_(sub)
                flags_or_none = strategy.layer_changed(sub)
                if flags_or_none is not None:
                    changed |= flags_or_none
            for key, value in sub.stats.items():
                view.stats[key if key not in view.stats else f"{k}.{key}"] = value
        view.cache["changed"] = changed

    def layer_changed(self, view: GroupView) -> torch.Tensor | None:
        flags = view.cache.pop("changed", None)
        return flags if isinstance(flags, torch.Tensor) and self.reports_changes else None


def chain(*strategies: Any) -> Chain:
    """Apply several strategies in order to the same layers (optax's ``chain``).

    Each rule sees the gradients as the previous one left them; norms are
    measured again before every later rule that reads them. The report keeps
    the norms measured before the first rule.

    Args:
        *strategies: `Strategy` objects, DL4J mode names
            (with the default threshold 1.0) or ``(mode, threshold)`` pairs.

    Returns:
        A strategy usable wherever a mode is (``normalize_``, the default of a
        ``GradientNormalizer``, an override).

    Example:
        >>> clip = gradclip.chain(("ClipElementWiseAbsoluteValue", 0.5),
        ...                       gradclip.ClipGlobalNorm(1.0))
        >>> report = gradclip.normalize_(model, clip)

    Raises:
        ValueError: no strategy given.
    """
    if not strategies:
        raise ValueError("chain() needs at least one strategy")
    return Chain(tuple(_as_strategy(s, i) for i, s in enumerate(strategies)))


#: Default-constructed strategies by short name (``--strategy`` on the command line).
STRATEGY_FACTORIES: dict[str, Callable[[], Strategy]] = {
    "global": lambda: ClipGlobalNorm(1.0),
    "agc": AdaptiveGradClip,
    "autoclip": AutoClip,
    "zclip": ZClip,
}


def strategy_from_name(name: str) -> Strategy:
    """A default-constructed strategy from a short name of `STRATEGY_FACTORIES`.

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    key = name.strip().lower()
    if key not in STRATEGY_FACTORIES:
        raise ValueError(
            f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGY_FACTORIES))}"
        )
    return STRATEGY_FACTORIES[key]()
