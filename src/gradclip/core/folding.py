"""A step whose multiply a fused optimizer does: the divisor of ``grad_scale``.

PyTorch's fused optimizers (``Adam``/``AdamW``/``SGD``/``Adagrad`` with
``fused=True``) read and write every gradient in their own kernel, and divide it
there by the device tensor ``optimizer.grad_scale`` when one is set (it is how
``GradScaler`` unscales them). The engine can hand its work to that pass:

* **AMP**: gradients still scaled by ``S`` are measured as they are and their
  norms divided by ``S`` (norms are homogeneous: ``‖g·S‖ = S·‖g‖``), so every
  rule reads the true norms; a per-layer multiply by the coefficients ``c``
  keeps ``S``, and the kernel's division by ``S`` completes the unscale.
* **Folding**: when every round of the step gives one coefficient ``c`` for all
  the step's gradients (`foldable`), nothing is multiplied: the divisor becomes
  ``S / c`` (``1 / c`` without AMP) and the kernel applies it.

The divisor ``D`` is carried through the rounds: gradients in memory are the
true ones times ``1 / D``, so a later round's re-measured norms are divided by
``D`` too.
"""

from __future__ import annotations

import torch

from gradclip.core.measure import Measurement
from gradclip.core.plan import Plan
from gradclip.core.rule import ScalingRule

__all__ = ["foldable", "in_place_rules", "true_norms"]


def foldable(plan: Plan) -> bool:
    """Whether every round of ``plan`` gives one coefficient to all of the step's tensors.

    True when each round has a single scaling rule over every tensor of the step
    whose `Rule.uniform` holds for its layout.
    """
    for round_ in plan.rounds:
        if not round_.single or len(round_.stages) != 1 or round_.scaled is None:
            return False
        _, stage = round_.stages[0]
        if not isinstance(stage.rule, ScalingRule) or len(round_.scaled) != plan.num_tensors:
            return False
        if not stage.rule.uniform(stage.layout):
            return False
    return bool(plan.rounds)


def in_place_rules(plan: Plan) -> list[str]:
    """The rules of ``plan`` that change gradients themselves (they need unscaled gradients)."""
    return sorted(
        {
            stage.rule.describe()
            for round_ in plan.rounds
            for _, stage in round_.stages
            if not isinstance(stage.rule, ScalingRule)
        }
    )


def true_norms(measured: Measurement, divisor: torch.Tensor) -> Measurement:
    """The step's norms of gradients stored as ``true / divisor``: each divided by ``divisor``."""
    d = divisor.to(measured.tensor_norms.dtype)
    return Measurement(
        measured.tensor_norms / d,
        measured.layer_norms / d,
        {gi: norms / divisor.to(norms.dtype) for gi, norms in measured.p_norms.items()},
        measured.reduced,
    )
