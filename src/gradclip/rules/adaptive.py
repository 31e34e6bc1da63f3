"""Adaptive clipping: thresholds learned from the history of gradient norms.

Both rules keep their statistics on the gradients' device, so a step reads
nothing to the host; only the step counter (how many steps the rule has seen)
is a Python integer, which is configuration-like: it advances by one per step
whatever the values are.

* `AutoClip` (Seetharaman et al. 2020): clip the norm at the
  ``percentile``-th percentile of every norm seen so far, the current one
  included.
* `ZClip` (Kumar et al. 2025): an exponential moving average of the
  norm's mean and variance; a norm whose z-score exceeds ``z_thresh`` is
  clipped to ``mean + z_thresh² · std / z``.

``scope="global"`` (the default, as in both papers) tracks one norm: the L2
norm of all the layers given to the rule together. ``scope="layer"`` tracks
each layer's norm separately and clips each layer by its own statistics —
DL4J's per-layer idea applied to the adaptive rules.

State and resume: each rule's state lives in the normalizer (one state per
group of layers sharing the rule) and is saved with
`gradclip.GradientNormalizer.state_dict`. A rule object also offers
``state_dict()`` / ``load_state_dict()`` for the state of the (last) group it
runs, e.g. with `gradclip.normalize_`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from gradclip.core.rule import GroupView, Strategy
from gradclip.core.validation import check_threshold
from gradclip.rules.global_norm import TORCH_CLIP_EPS, clip_coefficient

__all__ = ["AutoClip", "StatefulStrategy", "ZClip"]

Scope = Literal["global", "layer"]
_PENDING = "_pending"  # a saved state waiting for the device it will live on


def _check_scope(scope: object) -> Scope:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return scope  # type: ignore[return-value]


class StatefulStrategy(Strategy):
    """A strategy with persistent per-group state, saved and restored exactly.

    Subclasses implement `fresh_state` (tensors on the device plus a
    Python ``"step"`` counter) and call `ready` at the start of
    `scale` / `transform_`. State keys starting with ``_`` are
    caches and are not saved.
    """

    _bound: dict[str, Any] | None = None
    _pending_load: dict[str, Any] | None = None

    # -- to implement -----------------------------------------------------------
    def fresh_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """Initial state for ``slots`` tracked norms (1 for global scope, else one per layer)."""
        raise NotImplementedError

    def slots(self, num_layers: int) -> int:
        """How many norms the state tracks for a group of ``num_layers`` layers."""
        return 1

    # -- engine side --------------------------------------------------------------
    def init_state(
        self, num_layers: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        if self._pending_load is not None:
            state: dict[str, Any] = {_PENDING: self._pending_load}
            self._pending_load = None
        else:
            state = self.new_state(num_layers, device, dtype)
        self._bound = state
        return state

    def new_state(
        self, num_layers: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        """The state of a group of ``num_layers`` layers when nothing was loaded."""
        return self.fresh_state(self.slots(num_layers), device, dtype)

    def ready(self, view: GroupView) -> dict[str, Any]:
        """``view.state``, with a loaded state moved to ``view.device`` on first use."""
        state = view.state
        saved = state.pop(_PENDING, None)
        if saved is not None:
            slots = self.slots(len(view.layer_names))
            fresh = self.fresh_state(slots, view.device, view.dtype)
            self._restore(fresh, saved, slots)
            state.update(fresh)
        self._bound = state
        return state

    def check_slots(self, state: Mapping[str, Any], view: GroupView) -> None:
        """Raise if a per-layer state was made for a different number of layers."""
        expected = self.slots(len(view.layer_names))
        if state["slots"] != expected:
            raise RuntimeError(
                f"{self.describe()} keeps per-layer statistics for {state['slots']} layers but "
                f"this step has {expected} ({view.layer_names[:5]}...): the set of layers with "
                "gradients changed. Give every layer a gradient (zero_grad(set_to_none=False)) "
                "or use scope='global'."
            )

    # -- saving -------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        # A string, so that a saved state loads with torch.load(weights_only=True).
        return {"strategy": type(self).__qualname__, "describe": self.describe()}

    def export_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """A CPU copy of ``state`` (tensors cloned), tagged with the strategy's identity."""
        if _PENDING in state:
            return dict(state[_PENDING])
        tensors = {
            k: v.detach().to("cpu", copy=True)
            for k, v in state.items()
            if isinstance(v, torch.Tensor) and not k.startswith("_")
        }
        scalars = {
            k: v
            for k, v in state.items()
            if not isinstance(v, torch.Tensor) and not k.startswith("_")
        }
        return {**self._identity(), "scalars": scalars, "tensors": tensors}

    def check_saved(self, saved: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``saved`` was exported by an equal strategy."""
        if not isinstance(saved, Mapping) or "strategy" not in saved:
            raise ValueError(f"not a gradclip strategy state: {type(saved).__name__}")
        mine = self._identity()
        if saved["strategy"] != mine["strategy"] or saved.get("describe") != mine["describe"]:
            raise ValueError(
                f"a state saved for {saved.get('describe', saved['strategy'])} cannot be loaded "
                f"into {mine['describe']}: the strategy or its settings differ"
            )

    def _restore(self, fresh: dict[str, Any], saved: Mapping[str, Any], slots: int) -> None:
        self.check_saved(saved)
        if saved["scalars"].get("slots") != slots:
            raise ValueError(
                f"state of {self.describe()} tracks {saved['scalars'].get('slots')} norms, but "
                f"this model's group tracks {slots}: it was saved for a different model"
            )
        fresh.update(saved["scalars"])
        for key, value in saved["tensors"].items():
            fresh[key] = self.restore_tensor(key, value, fresh)

    def restore_tensor(
        self, key: str, value: torch.Tensor, fresh: Mapping[str, Any]
    ) -> torch.Tensor:
        """Place a saved tensor where ``fresh`` keeps its counterpart (device and dtype)."""
        like = fresh[key]
        return value.to(like.device, like.dtype, copy=True)

    def state_dict(self) -> dict[str, Any]:
        """The state of the group this strategy last ran, as a CPU copy.

        For a strategy shared by several normalizers or groups, save
        `gradclip.GradientNormalizer.state_dict` instead.

        Raises:
            RuntimeError: the strategy has not run yet.
        """
        if self._bound is None:
            if self._pending_load is not None:
                return dict(self._pending_load)
            raise RuntimeError(
                f"{self.describe()} has no state yet: it is created at its first step"
            )
        return self.export_state(self._bound)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state saved by `state_dict`; it takes effect at the next step.

        Raises:
            ValueError: the state belongs to another strategy or other settings.
        """
        self.check_saved(state_dict)
        if self._bound is not None:
            self._bound.clear()
            self._bound[_PENDING] = dict(state_dict)
        else:
            self._pending_load = dict(state_dict)


def _observed(view: GroupView, scope: Scope) -> torch.Tensor:
    """``(S,)``: the norm the rule tracks, L2 over the group or one per layer."""
    if scope == "layer":
        if view.layer_norms is None:
            raise RuntimeError("adaptive strategies need measured norms")
        return view.layer_norms
    total: torch.Tensor = torch.linalg.vector_norm(view.norms())
    return total.reshape(1)


def _per_tensor(coef: torch.Tensor, view: GroupView, scope: Scope) -> torch.Tensor:
    if scope == "layer":
        return coef.index_select(0, view.tensor_layer)
    return coef.expand(len(view.grads))


class AutoClip(StatefulStrategy):
    """AutoClip (Seetharaman et al. 2020): clip at a percentile of the norm history.

    At step ``t`` with gradient norm ``n_t`` (the L2 norm of all the rule's
    layers together, or of each layer with ``scope="layer"``):

    $$
    H_t = \\{n_1, \\dots, n_t\\}, \\qquad
    c_t = \\operatorname{percentile}(H_t, p), \\qquad
    g \\leftarrow g \\cdot \\min\\Big(1, \\frac{c_t}{n_t + 10^{-6}}\\Big)
    $$

    as the authors' loop does: append the current norm, take
    ``np.percentile`` (linear interpolation; ``torch.quantile`` computes the
    same), then ``torch.nn.utils.clip_grad_norm_(params, c_t)`` (whence the
    ``1e-6``). With ``history_size`` only the last ``history_size`` norms are
    kept (a ring buffer on the device); without it the history grows with
    every step, and so does the cost of the percentile (a sort of the
    history): set ``history_size`` for long runs. The threshold is reported in
    the stats as ``"autoclip_threshold"``.

    Args:
        percentile: ``p`` in ``[0, 100]``. Default 10 (the paper's choice).
        history_size: keep only the last ``history_size`` norms; ``None`` (the
            paper's rule) keeps them all.
        scope: ``"global"`` (default) or ``"layer"``.

    Example:
        >>> normalizer = gradclip.GradientNormalizer(model, gradclip.AutoClip(10.0))
        >>> normalizer.attach(optimizer)
        >>> torch.save(normalizer.state_dict(), "clip.pt")   # with the checkpoint

    References:
        Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks", IEEE MLSP 2020.
    """

    name = "AutoClip"
    _INITIAL_CAPACITY = 64

    def __init__(
        self, percentile: float = 10.0, history_size: int | None = None, scope: Scope = "global"
    ) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, int | float):
            raise TypeError(f"percentile must be a number in [0, 100], got {percentile!r}")
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
        if history_size is not None and (
            isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1
        ):
            raise ValueError(f"history_size must be a positive int or None, got {history_size!r}")
        self.percentile = float(percentile)
        self.history_size = history_size
        self.scope = _check_scope(scope)

    def config(self) -> Mapping[str, Any]:
        return {
            "percentile": self.percentile,
            "history_size": self.history_size,
            "scope": self.scope,
        }

    def slots(self, num_layers: int) -> int:
        return num_layers if self.scope == "layer" else 1

    def fresh_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        capacity = self.history_size or self._INITIAL_CAPACITY
        return {
            "slots": slots,
            "step": 0,
            "history": torch.zeros(slots, capacity, dtype=dtype, device=device),
        }

    def export_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        saved = super().export_state(state)
        if self.history_size is None and "history" in saved["tensors"]:
            # only the filled part: the capacity is an allocation detail
            saved["tensors"]["history"] = saved["tensors"]["history"][:, : state["step"]].clone()
        return saved

    def restore_tensor(
        self, key: str, value: torch.Tensor, fresh: Mapping[str, Any]
    ) -> torch.Tensor:
        like = fresh[key]
        if key != "history" or value.shape == like.shape:
            return super().restore_tensor(key, value, fresh)
        capacity = max(self._INITIAL_CAPACITY, 1 << max(value.shape[1] - 1, 0).bit_length())
        history = torch.zeros(like.shape[0], capacity, dtype=like.dtype, device=like.device)
        history[:, : value.shape[1]].copy_(value)
        return history

    def scale(self, view: GroupView) -> torch.Tensor:
        state = self.ready(view)
        self.check_slots(state, view)
        norms = _observed(view, self.scope).to(state["history"].dtype)
        step: int = state["step"]
        history: torch.Tensor = state["history"]
        if self.history_size is not None:
            history[:, step % self.history_size].copy_(norms)
            filled = min(step + 1, self.history_size)
        else:
            if step == history.shape[1]:  # grow: the step count is a host integer, no sync
                grown = torch.zeros(
                    history.shape[0], 2 * step, dtype=history.dtype, device=history.device
                )
                grown[:, :step].copy_(history)
                state["history"] = history = grown
            history[:, step].copy_(norms)
            filled = step + 1
        state["step"] = step + 1
        threshold = torch.quantile(history[:, :filled], self.percentile / 100.0, dim=1)
        view.stats["autoclip_threshold"] = threshold if self.scope == "layer" else threshold[0]
        return _per_tensor(clip_coefficient(norms, threshold), view, self.scope)


class ZClip(StatefulStrategy):
    """ZClip (Kumar et al. 2025): z-score clipping against an EMA of the norm.

    With ``n_t`` the gradient norm at step ``t`` (global, or per layer with
    ``scope="layer"``), ``μ`` and ``σ²`` the EMA mean and variance:

    * warm-up (the first ``warmup_steps`` steps): norms are collected and not
      clipped (except by ``max_grad_norm``, if given, as
      ``clip_grad_norm_``); at the last warm-up step ``μ`` and ``σ²`` are set
      to the mean and the population variance of the collected norms.
    * then ``z = (n_t − μ) / (σ + 10⁻⁶)``; if ``z > z_thresh`` the norm is
      clipped to ``c = μ + z_thresh·σ / (z / z_thresh)`` (``= μ + z_thresh²·σ/z``),
      otherwise ``c = n_t``; with ``max_grad_norm``, ``c ← min(c, max_grad_norm)``.
      Gradients are scaled by ``c / (n_t + 10⁻⁶)`` when ``n_t > c``.
    * the EMA is updated with the clipped norm ``x`` (before ``max_grad_norm``):
      ``μ ← α·μ + (1−α)·x``, then ``σ² ← α·σ² + (1−α)·(x − μ)²`` with the new ``μ``.

    Every detail the paper leaves open (the ``10⁻⁶``, the population variance,
    the new mean in the variance update, ``max_grad_norm`` not feeding the EMA)
    follows the authors' ``zclip`` package (``mode="zscore"``,
    ``clip_option="adaptive_scaling"``, ``clip_factor=1``). The statistics live
    on the device; the EMA mean and std are reported in the stats as
    ``"zclip_mean"`` and ``"zclip_std"``.

    Args:
        alpha: EMA decay ``α`` in ``(0, 1)``. Default 0.97.
        z_thresh: z-score above which a norm is a spike, > 0. Default 2.5.
        warmup_steps: steps used to initialize the statistics, >= 1. Default 25.
        max_grad_norm: an optional fixed cap on top of the adaptive one. Default
            ``None`` (no cap; the package's default is 1.0).
        scope: ``"global"`` (default) or ``"layer"``.

    Example:
        >>> normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(z_thresh=2.5))
        >>> normalizer.attach(optimizer)

    References:
        Kumar, Owen, Chowdhury and Güra, "ZClip: Adaptive Spike Mitigation for
        LLM Pre-Training", arXiv:2504.02507, 2025; github.com/bluorion-com/ZClip.
    """

    name = "ZClip"
    _EPS = 1e-6  # the zclip package's eps in the z-score denominator

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        max_grad_norm: float | None = None,
        scope: Scope = "global",
    ) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise TypeError(f"alpha must be a number in (0, 1), got {alpha!r}")
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {warmup_steps!r}")
        self.alpha = float(alpha)
        self.z_thresh = check_threshold(z_thresh, what="z_thresh")
        self.warmup_steps = warmup_steps
        self.max_grad_norm = (
            None if max_grad_norm is None else check_threshold(max_grad_norm, what="max_grad_norm")
        )
        self.scope = _check_scope(scope)

    def config(self) -> Mapping[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "max_grad_norm": self.max_grad_norm,
            "scope": self.scope,
        }

    def slots(self, num_layers: int) -> int:
        return num_layers if self.scope == "layer" else 1

    def fresh_state(self, slots: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        return {
            "slots": slots,
            "step": 0,
            "warmup": torch.zeros(slots, self.warmup_steps, dtype=dtype, device=device),
            "mean": torch.zeros(slots, dtype=dtype, device=device),
            "var": torch.zeros(slots, dtype=dtype, device=device),
        }

    def scale(self, view: GroupView) -> torch.Tensor:
        state = self.ready(view)
        self.check_slots(state, view)
        mean: torch.Tensor = state["mean"]
        var: torch.Tensor = state["var"]
        norms = _observed(view, self.scope).to(mean.dtype)
        step: int = state["step"]
        state["step"] = step + 1
        if step < self.warmup_steps:
            warmup: torch.Tensor = state["warmup"]
            warmup[:, step].copy_(norms)
            if step + 1 == self.warmup_steps:
                mean.copy_(warmup.mean(dim=1))
                var.copy_((warmup - mean[:, None]).square().mean(dim=1))
            if self.max_grad_norm is None:
                coef = torch.ones_like(norms)
            else:
                coef = clip_coefficient(norms, self.max_grad_norm)
        else:
            std = var.sqrt()
            z = (norms - mean) / (std + self._EPS)
            spike = z > self.z_thresh
            eta = z / self.z_thresh
            clipped = torch.where(spike, mean + (self.z_thresh * std) / eta, norms)
            bound = clipped
            if self.max_grad_norm is not None:
                bound = bound.clamp(max=self.max_grad_norm)
            coef = torch.where(
                norms > bound, (bound / (norms + TORCH_CLIP_EPS)).clamp(max=1.0), 1.0
            )
            mean.mul_(self.alpha).add_(clipped, alpha=1.0 - self.alpha)
            var.mul_(self.alpha).add_((clipped - mean).square(), alpha=1.0 - self.alpha)
        if self.scope == "layer":
            view.stats["zclip_mean"] = mean.clone()
            view.stats["zclip_std"] = var.sqrt()
        else:
            view.stats["zclip_mean"] = mean[0].clone()
            view.stats["zclip_std"] = var[0].sqrt()
        return _per_tensor(coef, view, self.scope)
