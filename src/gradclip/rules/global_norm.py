"""Global p-norm clipping, as ``torch.nn.utils.clip_grad_norm_``.

References:
    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013.
    PyTorch, ``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from gradclip.core.rule import GroupLayout, Measured, ScalingRule, State, set_fields
from gradclip.core.validation import check_threshold

__all__ = ["TORCH_CLIP_EPS", "ClipGlobalNorm", "clip_coefficient"]

# torch.nn.utils.clip_grad_norm_'s epsilon: max_norm / (total + 1e-6).
TORCH_CLIP_EPS = 1e-6


def clip_coefficient(total: torch.Tensor, max_norm: torch.Tensor | float) -> torch.Tensor:
    """``min(1, max_norm / (total + 1e-6))``, PyTorch's ``clip_grad_norm_`` coefficient.

    The clamp on the device replaces an ``if total > max_norm`` on the host,
    which would cost a synchronization.
    """
    return (max_norm / (total + TORCH_CLIP_EPS)).clamp(max=1.0)


def _norm_order(norm_type: object) -> float:
    # torch accepts the string "inf" as well as the float
    if isinstance(norm_type, str) and norm_type.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, int | float):
        raise TypeError(f"norm_type must be a number >= 1 or inf, got {norm_type!r}")
    p = float(norm_type)
    if math.isnan(p) or p < 1.0:
        raise ValueError(f"norm_type must be >= 1 or float('inf'), got {norm_type!r}")
    return p


@dataclass(frozen=True)
class ClipGlobalNorm(ScalingRule):
    """Clip the global p-norm of the gradients, like ``torch.nn.utils.clip_grad_norm_``.

    $$
    ‖g‖_p = \\Big(\\sum_i ‖g_i‖_p^p\\Big)^{1/p}, \\qquad
    g_i \\leftarrow g_i \\cdot \\min\\Big(1, \\frac{\\text{max\\_norm}}{‖g‖_p + 10^{-6}}\\Big)
    $$

    over every gradient ``g_i`` of the layers the rule is given (``max_i ‖g_i‖_∞``
    for ``p = ∞``): as the default of a `GradientNormalizer`, the whole model
    minus overridden layers; as an override, the layers it names, together. A
    total at or under ``max_norm`` is multiplied by exactly ``1.0``. Sharded
    gradients give the single-process result in the step's one collective. The
    total is in the report's stats as ``"global_norm"``.

    Args:
        max_norm: the largest allowed total norm, finite and > 0.
        norm_type: ``p``: any finite ``p >= 1``, ``float("inf")`` or ``"inf"``.
            ``p = 2`` reuses the norms the engine measures anyway; any other
            ``p`` costs one more read of the gradients. As in torch's kernels,
            the ``|x|^p`` of float32 (and widened half-precision) gradients are
            summed in float32: a tensor whose p-norm is above about
            ``3.4e38^(1/p)`` (1.8e19 for ``p = 2``, 84 for ``p = 20``, 5.9 for
            ``p = 50``) reads ``inf``, and the gradients become zeros, as with
            ``clip_grad_norm_``. For a large ``p`` use ``float("inf")``, or
            float64 gradients.

    Examples:
        >>> net = torch.nn.Linear(4, 2)
        >>> net(torch.ones(3, 4)).sum().backward()
        >>> grads = [p.grad.clone() for p in net.parameters()]
        >>> total = torch.cat([g.flatten() for g in grads]).norm()
        >>> report = gradclip.normalize_(net, gradclip.ClipGlobalNorm(0.5))
        >>> expected = [g * 0.5 / (total + 1e-6) for g in grads]  # torch's formula
        >>> all(torch.allclose(p.grad, e) for p, e in zip(net.parameters(), expected))
        True

    References:
        Pascanu, Mikolov and Bengio, ICML 2013; PyTorch ``clip_grad_norm_``.
    """

    max_norm: float
    norm_type: float = 2.0  # type: ignore[misc]  # the rule's field is the order it reads

    def __post_init__(self) -> None:
        set_fields(
            self,
            max_norm=check_threshold(self.max_norm, what="max_norm"),
            norm_type=_norm_order(self.norm_type),
        )

    @property
    def spans_layers(self) -> bool:
        return True

    def uniform(self, layout: GroupLayout) -> bool:
        """One coefficient for all the tensors: always."""
        return True

    def scale(self, m: Measured, state: State) -> tuple[torch.Tensor, State]:
        coefficient = clip_coefficient(m.total_norm(self.norm_type), self.max_norm)
        return coefficient.expand(len(m.grads)), state

    def stats(self, m: Measured, state: State) -> Mapping[str, torch.Tensor]:
        return {"global_norm": m.total_norm(self.norm_type)}
