"""Adaptive clipping: thresholds learned from the history of gradient norms.

* `AutoClip` (Seetharaman et al. 2020): clip the norm at the
  ``percentile``-th percentile of every norm seen so far, the current one
  included.
* `ZClip` (Kumar et al. 2025): an exponential moving average of the norm's
  mean and variance; a norm whose z-score exceeds ``z_thresh`` is clipped to
  ``mean + z_thresh² · std / z``.

``scope="global"`` (the default, as in both papers) tracks one norm: the L2
norm of all the layers given to the rule together. ``scope="layer"`` tracks
each layer's norm separately and clips each layer by its own statistics —
DL4J's per-layer idea applied to the adaptive rules. A layer's statistics
advance only on steps where it has gradients, and a layer seen for the first
time starts its own warm-up. A norm of exactly zero counts as no gradient, in
either scope: the statistics skip it and the gradients are left alone. (The
authors' loops would count it; a layer whose warm-up saw only zeros — an
expert never routed, DDP's unused parameters — would then have every later
gradient clipped to nothing.)

The statistics, step counters included, are tensors on the gradients' device:
a step reads nothing to the host, and a compiled step does not recompile as
the counters advance. The normalizer owns them (`GradientNormalizer.state_dict`)
and keeps them as they were on a step whose tracked norm is inf or NaN, so a
bad step clips (or spoils) only itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from gradclip.core.rule import GroupLayout, Measured, ScalingRule, State, set_fields
from gradclip.core.validation import check_threshold
from gradclip.rules.global_norm import TORCH_CLIP_EPS, clip_coefficient

__all__ = ["AutoClip", "ZClip"]

Scope = Literal["global", "layer"]


def _check_scope(scope: object) -> Scope:
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return scope  # type: ignore[return-value]


def _tracked(m: Measured, per_layer: bool) -> torch.Tensor:
    """``(R,)`` the norm each state row tracks: each layer's, or the group's together."""
    if per_layer:
        assert m.layer_norms is not None
        return m.layer_norms
    return m.total_norm().reshape(1)


def _to_tensors(coef: torch.Tensor, m: Measured, per_layer: bool) -> torch.Tensor:
    return m.per_tensor(coef) if per_layer else coef.expand(len(m.grads))


def _skip_zeros(
    norms: torch.Tensor, coef: torch.Tensor, state: State, new: State
) -> tuple[torch.Tensor, State]:
    """Rows whose norm is exactly zero keep their statistics, and coefficient 1.

    A zero gradient (a layer that took no part in the step: DDP's unused
    parameters, ``zero_grad(set_to_none=False)``) says nothing about the norm's
    scale. Counted, zeros pull the threshold to 0, and the layer's first real
    gradients are then clipped to nothing (ZClip for good: its EMA is fed the
    clipped norm). NaN rows are left to the ``nonfinite`` policy.
    """
    idle = norms == 0
    kept = {
        key: torch.where(idle.view(-1, *([1] * (value.dim() - 1))), state[key], value)
        for key, value in new.items()
    }
    return torch.where(idle, 1.0, coef), kept


def _percentile(history: torch.Tensor, filled: torch.Tensor, q: float) -> torch.Tensor:
    """``(R,)`` the ``q``-th percentile of the first ``filled[r]`` entries of each row.

    Linear interpolation between the two nearest ranks, as ``numpy.percentile``;
    entries past ``filled`` are ignored, so rows of different lengths share a buffer.
    """
    valid = torch.arange(history.shape[1], device=history.device) < filled[:, None]
    ordered = torch.where(valid, history, torch.inf).sort(dim=1).values
    rank = (filled - 1).to(history.dtype) * (q / 100.0)
    low = rank.floor()
    lo = low.long()
    hi = torch.minimum(lo + 1, filled - 1)
    a = ordered.gather(1, lo[:, None]).squeeze(1)
    b = ordered.gather(1, hi[:, None]).squeeze(1)
    return a + (b - a) * (rank - low)


@dataclass(frozen=True)
class AutoClip(ScalingRule):
    """AutoClip (Seetharaman et al. 2020): clip at a percentile of the norm history.

    At step ``t`` with gradient norm ``n_t`` (of all the rule's layers together,
    or of each layer with ``scope="layer"``):

    $$
    H_t = \\{n_1, \\dots, n_t\\}, \\qquad
    c_t = \\operatorname{percentile}(H_t, p), \\qquad
    g \\leftarrow g \\cdot \\min\\Big(1, \\frac{c_t}{n_t + 10^{-6}}\\Big)
    $$

    as the authors' loop does: append the current norm, take ``np.percentile``
    (linear interpolation), then ``clip_grad_norm_(params, c_t)`` (whence the
    ``1e-6``). The threshold is in the report's stats as ``"autoclip_threshold"``.

    **History.** By default only the last ``history_size = 1000`` norms are kept
    (a ring buffer, ``H_t = {n_{t-999}, …, n_t}``): memory and per-step time
    stay flat however long the run, and a compiled step never recompiles. For
    the first 1,000 steps this is the paper's rule exactly; after them the
    threshold follows the recent norms rather than the whole run's. The cost
    per step is a sort of ``rows × history_size`` numbers (one row, or one per
    layer with ``scope="layer"``). ``history_size=None`` is the paper's rule
    for any length: every norm is kept, so memory grows by one number per row
    per step (8 bytes in float64: 8 MB per row over 10⁶ steps), the sort
    with it, and under ``torch.compile`` the step recompiles each time the
    buffer doubles (at 64, 128, … steps).

    Args:
        percentile: ``p`` in ``[0, 100]``. Default 10 (the paper's choice).
        history_size: keep only the last ``history_size`` norms (default 1000);
            ``None`` keeps them all (the paper's rule, growing with the run).
        scope: ``"global"`` (default) or ``"layer"``.

    Examples:
        >>> net = torch.nn.Linear(4, 2)
        >>> normalizer = gradclip.GradientNormalizer(net, gradclip.AutoClip(50.0))
        >>> for scale in (1.0, 1.0, 100.0):          # a spike on the third step
        ...     net.zero_grad()
        ...     (scale * net(torch.ones(3, 4)).sum()).backward()
        ...     report = normalizer.apply()
        >>> report.changed_layers()
        ['']

    References:
        Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive Gradient
        Clipping for Source Separation Networks", IEEE MLSP 2020.
    """

    percentile: float = 10.0
    history_size: int | None = 1000
    scope: Scope = "global"
    # the history is the same whatever percentile is read from it
    schedulable_fields: ClassVar[tuple[str, ...]] = ("percentile",)
    _INITIAL_CAPACITY: ClassVar[int] = 64

    def __post_init__(self) -> None:
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, int | float):
            raise TypeError(f"percentile must be a number in [0, 100], got {p!r}")
        if not 0.0 <= float(p) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {p!r}")
        size = self.history_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"history_size must be a positive int or None, got {size!r}")
        set_fields(self, percentile=float(p), scope=_check_scope(self.scope))

    @property
    def per_layer_state(self) -> bool:
        return self.scope == "layer"

    def uniform(self, layout: GroupLayout) -> bool:
        return self.scope == "global" or len(layout.layer_names) == 1

    @property
    def spans_layers(self) -> bool:
        return self.scope == "global"

    @property
    def growable_state(self) -> frozenset[str]:
        # the whole history: a buffer that doubles as the run goes on
        return frozenset() if self.history_size is not None else frozenset({"history"})

    def init_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> State:
        capacity = self.history_size or self._INITIAL_CAPACITY
        return {
            "count": torch.zeros(rows, dtype=torch.long, device=device),
            "history": torch.zeros(rows, capacity, dtype=dtype, device=device),
            "threshold": torch.zeros(rows, dtype=dtype, device=device),
        }

    def scale(self, m: Measured, state: State) -> tuple[torch.Tensor, State]:
        norms = _tracked(m, self.per_layer_state).to(state["history"].dtype)
        count, history = state["count"], state["history"]
        capacity = history.shape[1]
        if self.history_size is None and m.step >= capacity:
            # grow on the host's step count (an upper bound of every row's): no sync
            grown = max(2 * capacity, 1 << m.step.bit_length())
            history = torch.cat([history, history.new_zeros(history.shape[0], grown - capacity)], 1)
            capacity = grown
        slot = count % capacity if self.history_size is not None else count
        before = history  # widened if it grew this step
        history = history.scatter(1, slot[:, None], norms[:, None])
        count = count + 1
        threshold = _percentile(history, count.clamp(max=capacity), self.percentile)
        coef = clip_coefficient(norms, threshold)
        new = {"count": count, "history": history, "threshold": threshold}
        coef, new = _skip_zeros(norms, coef, {**state, "history": before}, new)
        return _to_tensors(coef, m, self.per_layer_state), new

    def stats(self, m: Measured, state: State) -> Mapping[str, torch.Tensor]:
        threshold = state["threshold"]
        return {"autoclip_threshold": threshold if self.per_layer_state else threshold[0]}


@dataclass(frozen=True)
class ZClip(ScalingRule):
    """ZClip (Kumar et al. 2025): z-score clipping against an EMA of the norm.

    With ``n_t`` the gradient norm at step ``t`` (global, or per layer with
    ``scope="layer"``), ``μ`` and ``σ²`` the EMA mean and variance:

    * warm-up (the first ``warmup_steps`` steps): norms are collected and not
      clipped (except by ``max_grad_norm``, if given, as ``clip_grad_norm_``);
      at the last warm-up step ``μ`` and ``σ²`` are set to the mean and the
      population variance of the collected norms.
    * then ``z = (n_t − μ) / (σ + 10⁻⁶)``; if ``z > z_thresh`` the norm is
      clipped to ``c = μ + z_thresh·σ / (z / z_thresh)`` (``= μ + z_thresh²·σ/z``),
      otherwise ``c = n_t``; with ``max_grad_norm``, ``c ← min(c, max_grad_norm)``.
      Gradients are scaled by ``c / (n_t + 10⁻⁶)`` when ``n_t > c``.
    * the EMA is updated with the clipped norm ``x`` (before ``max_grad_norm``):
      ``μ ← α·μ + (1−α)·x``, then ``σ² ← α·σ² + (1−α)·(x − μ)²`` with the new ``μ``.

    Every detail the paper leaves open (the ``10⁻⁶``, the population variance,
    the new mean in the variance update, ``max_grad_norm`` not feeding the EMA)
    follows the authors' ``zclip`` package (``mode="zscore"``,
    ``clip_option="adaptive_scaling"``, ``clip_factor=1``). The EMA mean and std
    are in the report's stats as ``"zclip_mean"`` and ``"zclip_std"``.

    Args:
        alpha: EMA decay ``α`` in ``(0, 1)``. Default 0.97.
        z_thresh: z-score above which a norm is a spike, > 0. Default 2.5.
        warmup_steps: steps used to initialize the statistics, >= 1. Default 25.
        max_grad_norm: an optional fixed cap on top of the adaptive one. Default
            ``None`` (no cap; the package's default is 1.0).
        scope: ``"global"`` (default) or ``"layer"``.

    Examples:
        >>> net = torch.nn.Linear(4, 2)
        >>> normalizer = gradclip.GradientNormalizer(net, gradclip.ZClip(warmup_steps=3))
        >>> for scale in (1.0, 1.1, 0.9, 1.0, 50.0):     # a spike after the warm-up
        ...     net.zero_grad()
        ...     (scale * net(torch.ones(3, 4)).sum()).backward()
        ...     report = normalizer.apply()
        >>> report.changed_layers()
        ['']

    References:
        Kumar, Owen, Chowdhury and Güra, "ZClip: Adaptive Spike Mitigation for
        LLM Pre-Training", arXiv:2504.02507, 2025; github.com/bluorion-com/ZClip.
    """

    alpha: float = 0.97
    z_thresh: float = 2.5
    warmup_steps: int = 25
    max_grad_norm: float | None = None
    scope: Scope = "global"
    # the EMA statistics do not depend on the spike threshold or the fixed cap
    schedulable_fields: ClassVar[tuple[str, ...]] = ("z_thresh", "max_grad_norm")
    _EPS: ClassVar[float] = 1e-6  # the zclip package's eps in the z-score denominator

    def __post_init__(self) -> None:
        a, w = self.alpha, self.warmup_steps
        if isinstance(a, bool) or not isinstance(a, int | float):
            raise TypeError(f"alpha must be a number in (0, 1), got {a!r}")
        if not 0.0 < float(a) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {a!r}")
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"warmup_steps must be an int >= 1, got {w!r}")
        cap = self.max_grad_norm
        set_fields(
            self,
            alpha=float(a),
            z_thresh=check_threshold(self.z_thresh, what="z_thresh"),
            max_grad_norm=None if cap is None else check_threshold(cap, what="max_grad_norm"),
            scope=_check_scope(self.scope),
        )

    @property
    def per_layer_state(self) -> bool:
        return self.scope == "layer"

    @property
    def spans_layers(self) -> bool:
        return self.scope == "global"

    def uniform(self, layout: GroupLayout) -> bool:
        return self.scope == "global" or len(layout.layer_names) == 1

    def init_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> State:
        return {
            "count": torch.zeros(rows, dtype=torch.long, device=device),
            "warmup": torch.zeros(rows, self.warmup_steps, dtype=dtype, device=device),
            "mean": torch.zeros(rows, dtype=dtype, device=device),
            "var": torch.zeros(rows, dtype=dtype, device=device),
        }

    def scale(self, m: Measured, state: State) -> tuple[torch.Tensor, State]:
        count, mean, var = state["count"], state["mean"], state["var"]
        norms = _tracked(m, self.per_layer_state).to(mean.dtype)
        # Both branches are computed and one is selected per row, on the device:
        # no host branch on the step count, so nothing syncs or recompiles.
        warming = count < self.warmup_steps
        at = count.clamp(max=self.warmup_steps - 1)[:, None]
        warmup = torch.where(
            warming[:, None], state["warmup"].scatter(1, at, norms[:, None]), state["warmup"]
        )
        ends = count + 1 == self.warmup_steps
        warm_mean = warmup.mean(dim=1)
        warm_var = (warmup - warm_mean[:, None]).square().mean(dim=1)
        if self.max_grad_norm is None:
            warm_coef = torch.ones_like(norms)
        else:
            warm_coef = clip_coefficient(norms, self.max_grad_norm)

        std = var.sqrt()
        z = (norms - mean) / (std + self._EPS)
        clipped = torch.where(
            z > self.z_thresh, mean + (self.z_thresh * std) / (z / self.z_thresh), norms
        )
        bound = clipped if self.max_grad_norm is None else clipped.clamp(max=self.max_grad_norm)
        coef = torch.where(norms > bound, (bound / (norms + TORCH_CLIP_EPS)).clamp(max=1.0), 1.0)
        ema_mean = self.alpha * mean + (1.0 - self.alpha) * clipped
        ema_var = self.alpha * var + (1.0 - self.alpha) * (clipped - ema_mean).square()

        new = {
            "count": count + 1,
            "warmup": warmup,
            "mean": torch.where(warming, torch.where(ends, warm_mean, mean), ema_mean),
            "var": torch.where(warming, torch.where(ends, warm_var, var), ema_var),
        }
        coef, new = _skip_zeros(norms, torch.where(warming, warm_coef, coef), state, new)
        return _to_tensors(coef, m, self.per_layer_state), new

    def stats(self, m: Measured, state: State) -> Mapping[str, torch.Tensor]:
        mean, std = state["mean"], state["var"].sqrt()
        if self.per_layer_state:
            return {"zclip_mean": mean, "zclip_std": std}
        return {"zclip_mean": mean[0], "zclip_std": std[0]}
