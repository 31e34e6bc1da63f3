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

With ``find_inf`` (`GradScaler` handing its check to the step, see
`gradclip.fused_scaler`) the step also sets a 0-d float32 flag, 1 where a
measured norm of the scaled gradients is not finite: where an element is inf
or NaN, as the scaler's own check finds, and also where a float32 sum of
squares overflowed with finite elements (a norm past ~1.8e19 of the *scaled*
gradients). The scaler then skips the step and lowers its scale, as for an
inf: the next steps' scaled norms are that much smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gradclip.core.measure import Measurement
from gradclip.core.plan import Plan
from gradclip.core.rule import ScalingRule

__all__ = ["FusedArgs", "foldable", "in_place_rules", "nonfinite_flag", "true_norms"]


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
    """The rules of ``plan`` that change gradients themselves (they need unscaled gradients).

    A rule that neither reads nor changes them (``None``) is not one of them.
    """
    return sorted(
        {
            stage.rule.describe()
            for round_ in plan.rounds
            for _, stage in round_.stages
            if not isinstance(stage.rule, ScalingRule) and stage.rule.reads_gradient
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


def nonfinite_flag(plan: Plan, grads: list[torch.Tensor], measured: Measurement) -> torch.Tensor:
    """0-d float32: 1 if a norm of the step's gradients is inf or NaN, else 0 (no host read).

    Tensors the step does not measure (a rule that reads no L2 norm) are read
    once more for their largest magnitude.
    """
    norms = measured.tensor_norms
    if not plan.all_measured:
        norms = norms.index_select(0, plan.measured_positions_t)
        seen = set(plan.measured.positions)
        rest = [g for i, g in enumerate(grads) if i not in seen]
        if rest:
            largest = torch.stack(torch._foreach_norm(rest, math.inf)).to(norms)
            norms = torch.cat([norms, largest])
    return (~torch.isfinite(norms)).any().to(torch.float32)


@dataclass(frozen=True)
class FusedArgs:
    """What a fused optimizer's step passes to `Engine.step`.

    Attributes:
        divisor: the scale the gradients still carry (``GradScaler``'s ``S``).
        skip: 0-d device flag of a step that will be skipped: no rule's state changes.
        fold: leave a uniform coefficient to the optimizer instead of multiplying it in.
        skip_on_device: ``nonfinite="skip"`` marks a step with a non-finite layer in
            ``Engine.bad_step`` instead of reading it on the host.
        find_inf: set ``Engine.found_inf``, `nonfinite_flag` of the step, and skip
            on it (``GradScaler``'s check done by the step).
        optimizer_step: a fused optimizer's step follows (``False``: `Engine.step`
            without one, e.g. ``apply()``); a uniform coefficient is then carried
            through the rounds and applied at the end, by the kernel (``fold``) or
            by `finish`.
        exclusive: the optimizer updates the step's gradients only (no other
            parameter, no frozen one with a gradient). Otherwise its ``grad_scale``
            must stay ``divisor``, which its other gradients still carry: a uniform
            coefficient is then multiplied in, as a per-layer one is.
    """

    divisor: torch.Tensor | None = None
    skip: torch.Tensor | None = None
    fold: bool = False
    skip_on_device: bool = False
    find_inf: bool = False
    optimizer_step: bool = True
    exclusive: bool = True

    def begin(
        self, plan: Plan, measured: Measurement
    ) -> tuple[Measurement, torch.Tensor | None, bool]:
        """The true norms, the divisor to carry through the rounds, and whether the
        step is uniform (`foldable`: nothing is multiplied in the rounds).

        Raises:
            RuntimeError: a ``divisor`` with a rule that changes gradients in place
                (nothing is modified).
        """
        if self.divisor is not None:
            refused = in_place_rules(plan)
            if refused:
                raise RuntimeError(
                    f"the gradients are still scaled by GradScaler and {', '.join(refused)} "
                    "changes them in place: call scaler.unscale_(optimizer) before "
                    "scaler.step(optimizer)"
                )
            measured = true_norms(measured, self.divisor)
        # Divided here by S / c, the step's gradients would leave S to the others
        uniform = (
            self.optimizer_step and (self.exclusive or self.divisor is None) and foldable(plan)
        )
        carried = self.divisor
        if uniform and carried is None:
            carried = torch.ones((), dtype=plan.acc_dtype, device=plan.device)
        return measured, carried, uniform

    def finish(
        self, grads: list[torch.Tensor], carried: torch.Tensor | None, uniform: bool
    ) -> torch.Tensor | None:
        """What the optimizer's ``grad_scale`` must be after the rounds (``None``: none).

        A uniform step that is not folded divides the gradients here by the very
        float32 divisor the fused kernel would have divided them by: folded or
        not, the optimizer sees the same gradients (a multiply by ``c`` would
        round ``g·c`` where the kernel rounds ``g / (1/c)``, one ulp apart).
        """
        if uniform and not self.fold and carried is not None:
            torch._foreach_div_(grads, carried.to(torch.float32))
            return None
        return carried
