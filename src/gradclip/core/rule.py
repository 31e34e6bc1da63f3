"""The contract every normalization rule implements.

A *strategy* decides what happens to the gradients of the layers assigned to
it. The engine (`gradclip.core.engine`) does the expensive, shared work once
per step for every layer of the model together — one ``_foreach_norm`` per
(device, dtype), one ``_foreach_mul_`` per (device, dtype) — and hands each
strategy a `GroupView` of the layers it owns. A strategy then either

* returns one multiplicative coefficient per tensor from `Strategy.scale`
  (``scales = True``; the engine multiplies them in, together with every other
  scaling strategy's), or
* rewrites its gradients itself in `Strategy.transform_`
  (``scales = False``; e.g. element-wise clipping).

Coefficients are tensors on the device: a strategy never reads a value to the
host, so a step costs no host-device synchronization.

On sharded gradients (``DTensor``, FSDP2) the views hold each rank's local
pieces and the norms are already reduced over ranks. A strategy that needs
other quantities of the full tensors declares their per-rank parts in
`Strategy.cross_rank`; the engine reduces them in the step's single
collective and hands them back in `GroupView.reduced`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch

from gradclip.core.sharding import CrossRank, GroupShards

__all__ = ["GroupView", "Strategy"]


@dataclass(eq=False)
class GroupView:
    """The layers one strategy handles in one step, as the engine measured them.

    Tensors are listed in the engine's order (grouped by device and dtype, then
    model order); ``tensor_layer[i]`` is the index, in ``layer_names``, of the
    layer that owns tensor ``i``.

    Attributes:
        layer_names: names of the group's layers.
        param_names: qualified name of each tensor (``"layer.param"``).
        grads: the gradients, to be read or (in ``transform_``) rewritten in place.
        params: the parameters the gradients belong to (AGC needs the weights).
        tensor_layer: ``(T,)`` int64, on ``device``.
        layer_thresholds: ``(L,)`` thresholds of the layers, on ``device``.
        host_thresholds: the threshold of each tensor's layer as a Python float
            (configuration, not data: reading it costs no synchronization).
        tensor_norms: ``(T,)`` L2 norm of each gradient measured before this step's
            normalization, or ``None`` when the strategy does not measure norms.
        layer_norms: ``(L,)`` L2 norm of each layer, ``sqrt(sum of squares)``.
        device: where the norms and coefficients live.
        dtype: accumulation dtype of the norms (float32 or wider).
        state: the strategy's persistent state for this group (see
            `Strategy.init_state`); mutate it in place on the device.
        stats: extra measurements a strategy wants in the report (name -> tensor).
        cache: scratch space that lives as long as the engine's plan (it is
            emptied whenever the layout of the gradients changes): a place for
            index lists and other per-layout work a strategy should not redo
            every step.
        shards: how the gradients are sharded across ranks (``grads`` and
            ``params`` are then this rank's pieces), or ``None`` when none is a
            ``DTensor``.
        reduced: on sharded gradients, the reduced values of what
            `Strategy.cross_rank` declared this step; ``None`` otherwise.
        zeroed: on sharded gradients under ``nonfinite="zero"``, ``(T,)`` bool: the
            tensors zeroed this step after ``reduced`` was measured, whose reduced
            gradient quantities must be read as those of a zero tensor; else ``None``.
    """

    layer_names: list[str]
    param_names: list[str]
    grads: list[torch.Tensor]
    params: list[torch.Tensor]
    tensor_layer: torch.Tensor
    layer_thresholds: torch.Tensor
    host_thresholds: list[float]
    tensor_norms: torch.Tensor | None
    layer_norms: torch.Tensor | None
    device: torch.device
    dtype: torch.dtype
    state: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    shards: GroupShards | None = None
    reduced: CrossRank | None = None
    zeroed: torch.Tensor | None = None

    @cached_property
    def tensor_thresholds(self) -> torch.Tensor:
        """``(T,)`` the threshold of the layer owning each tensor."""
        return self.layer_thresholds.index_select(0, self.tensor_layer)

    @cached_property
    def layer_norm_per_tensor(self) -> torch.Tensor:
        """``(T,)`` the norm of the layer owning each tensor."""
        if self.layer_norms is None:
            raise RuntimeError("this strategy does not measure norms (measures_norms=False)")
        return self.layer_norms.index_select(0, self.tensor_layer)

    def norms(self) -> torch.Tensor:
        """``(T,)`` the per-tensor norms; raises if the strategy measured none."""
        if self.tensor_norms is None:
            raise RuntimeError("this strategy does not measure norms (measures_norms=False)")
        return self.tensor_norms


class Strategy:
    """Base class of every normalization rule; see the module docstring.

    Subclasses set the class attributes below and implement `scale` or
    `transform_`. Strategies are compared by value (`config`), so
    two layers configured alike share one group.
    """

    #: the engine measures each gradient's L2 norm before the strategy runs.
    measures_norms: ClassVar[bool] = True
    #: `scale` returns coefficients (else `transform_` rewrites in place).
    scales: ClassVar[bool] = True
    #: layers of strategies of the same class but different thresholds are run as
    #: one group, with their thresholds in ``GroupView.layer_thresholds``. Only
    #: stateless rules may batch.
    batchable: ClassVar[bool] = False
    #: the report can say whether the strategy changed a layer (element-wise
    #: clipping cannot without an extra read of every gradient).
    reports_changes: ClassVar[bool] = True
    #: the DL4J-style name shown in tables.
    name: ClassVar[str] = "Strategy"

    threshold: float = 1.0

    def scale(self, view: GroupView) -> torch.Tensor:
        """Return ``(T,)`` coefficients, one per tensor of ``view``, on ``view.device``.

        A coefficient of exactly ``1.0`` leaves a tensor bit-for-bit unchanged.
        """
        raise NotImplementedError(f"{type(self).__name__} does not scale gradients")

    def transform_(self, view: GroupView) -> None:
        """Rewrite ``view.grads`` in place (only for ``scales = False``)."""
        raise NotImplementedError(f"{type(self).__name__} does not transform gradients")

    def cross_rank(self, view: GroupView) -> CrossRank | None:
        """This rank's part of the quantities to reduce over ranks, or ``None`` (the default).

        Called only on sharded gradients, once per step before the step's single
        collective, with ``view.grads``/``view.params`` the local pieces,
        ``view.shards`` set and no norms yet (``tensor_norms`` is ``None``). The
        reduced values arrive in ``view.reduced`` when `scale` or
        `transform_` runs. Must not modify the gradients. Rules that need
        only the L2 norms (which the engine reduces anyway) keep the default.
        """
        return None

    def layer_changed(self, view: GroupView) -> torch.Tensor | None:
        """``(L,)`` bool: which layers a ``transform_`` changed, or ``None`` if unknown."""
        return None

    # -- configuration and state ------------------------------------------------
    def config(self) -> Mapping[str, Any]:
        """The strategy's hyper-parameters, by name (used for equality and display)."""
        return {"threshold": self.threshold}

    def group_key(self) -> Hashable:
        """Layers whose strategies share this key run as one group."""
        if self.batchable:
            return type(self).__qualname__
        return (type(self), tuple(sorted(self.config().items())))

    def init_state(
        self, num_layers: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        """Fresh persistent state for a group of ``num_layers`` layers."""
        return {}

    def describe(self) -> str:
        """A short description for the layer table, e.g. ``ClipL2PerLayer(threshold=1.0)``."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"

    def __repr__(self) -> str:
        return self.describe()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Strategy):
            return NotImplemented
        return type(self) is type(other) and dict(self.config()) == dict(other.config())

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.config().items()))))
