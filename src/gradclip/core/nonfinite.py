"""What a step does with layers whose gradient norm is inf or NaN.

=============  ==================================================================
policy         effect
=============  ==================================================================
``propagate``  (default) nothing special: inf and NaN flow through the rules as
               they would in ``clip_grad_norm_``; no extra cost.
``zero``       the gradients of every layer whose norm is not finite are set to
               exactly zero, on the device, before any rule runs; the rules see
               those layers as zero (norm 0). No host read. Costs one
               bit-masked multiply of every gradient (a plain ``x * 0`` would turn
               ``inf`` into NaN), and every layer is measured, even those whose
               rule reads no norms (``None``, element-wise clipping, AGC).
``error``      raise `NonFiniteGradientError` naming the layers, before any
               gradient is modified. Reads one ``(L,)`` bool vector to the host
               per step (a synchronization on an accelerator).
``skip``       for `GradientNormalizer.attach`: a step with a non-finite
               layer leaves the gradients and every rule's state untouched and the
               optimizer step is skipped, as ``torch.amp.GradScaler`` does. Reads
               the same ``(L,)`` vector to the host once per step. On pipeline
               stages a non-finite layer on any stage skips every stage's step.
=============  ==================================================================

A layer is judged by the norm its rule uses: the L2 norm, or the p-norm of a
``ClipGlobalNorm(norm_type=p)``, so finite float64 gradients whose squares
would overflow are not refused by a rule that never squares them. Whatever
the policy, the adaptive rules' statistics never take in a non-finite norm
(see `gradclip.core.state`), and the report keeps the norms measured before
anything was done, so ``report.nonfinite_layers()`` names the layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from gradclip.core.measure import layer_norms

if TYPE_CHECKING:
    from gradclip.core.plan import Plan

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteGradientError",
    "bad_layers",
    "check_nonfinite",
    "judge_unsquared",
    "read_bad_layers",
    "zero_layers_",
]

NONFINITE_POLICIES = ("propagate", "zero", "error", "skip")

# Integer views of the float gradients: multiplying the bit pattern by 0 gives
# +0.0 whatever the value was (inf and NaN included); by 1 leaves it untouched.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class NonFiniteGradientError(RuntimeError):
    """A gradient norm was inf or NaN under ``nonfinite="error"``; nothing was modified.

    Attributes:
        layers: the names of the layers whose norm was not finite.
        report: the step's `NormReport` (norms before anything was modified),
            when the engine raised it.
    """

    def __init__(self, layers: list[str], report: object | None = None) -> None:
        self.layers = layers
        self.report = report
        shown = ", ".join(repr(name or "(root)") for name in layers[:20])
        more = f" and {len(layers) - 20} more" if len(layers) > 20 else ""
        super().__init__(
            f"non-finite gradient norm (inf or NaN) in layer(s) {shown}{more}; no gradient was "
            "modified (nonfinite='error'). Use nonfinite='zero' or 'skip' to train through it."
        )


def check_nonfinite(policy: object) -> str:
    """Return ``policy`` if it is one of `NONFINITE_POLICIES`, else raise ``ValueError``."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(
            f"nonfinite must be one of {', '.join(map(repr, NONFINITE_POLICIES))}, got {policy!r}"
        )
    return str(policy)


def bad_layers(plan: Plan, judged: torch.Tensor) -> torch.Tensor:
    """``(L,)`` bool: measured layers whose judged norm is inf or NaN."""
    # layers without gradients read NaN ("not measured"): they are not non-finite
    return ~torch.isfinite(judged) & plan.layer_measured_t


def read_bad_layers(
    plan: Plan, bad: torch.Tensor, elsewhere: torch.Tensor | None = None
) -> tuple[list[str], bool]:
    """Names of the layers flagged in ``bad``, and whether any layer was not finite:
    one ``(L,)`` read to the host.

    ``elsewhere``: 0-d bool, a layer of another pipeline stage was not finite
    (read in the same transfer).
    """
    if elsewhere is None:
        names = [name for name, flag in zip(plan.layer_names, bad.tolist()) if flag]
        return names, bool(names)
    *flags, other = torch.cat([bad, elsewhere.reshape(1).to(bad.device)]).tolist()
    names = [name for name, flag in zip(plan.layer_names, flags) if flag]
    return names, bool(names) or bool(other)


def zero_layers_(plan: Plan, grads: list[torch.Tensor], bad: torch.Tensor) -> torch.Tensor:
    """Set every gradient of the ``bad`` layers to +0.0 in place, on the device.

    Needs every tensor measured (the policy forces ``measure_all``).

    Returns:
        ``(T,)`` bool: the tensors that were zeroed.
    """
    bad_tensor = bad.index_select(0, plan.measured_layer_t)
    for run in plan.measured.runs:
        chunk = run.pick(grads)
        bits = _BITS[chunk[0].element_size()]
        keep = (~bad_tensor[run.start : run.stop]).to(run.device, bits)
        torch._foreach_mul_([g.view(bits) for g in chunk], list(keep.unbind(0)))
    return bad_tensor


def judge_unsquared(
    plan: Plan, grads: Sequence[torch.Tensor], judged: torch.Tensor
) -> torch.Tensor:
    """``judged`` with the layers of rules that never square (`Rule.squares`) judged by
    their largest magnitude: finite exactly when every element is, where the L2 norm of
    huge finite gradients (float64 at 1e200) would overflow to inf.

    Not on sharded gradients, where a local maximum could differ between ranks.
    """
    for group in plan.groups:
        if any(stage.rule.squares for stage in group.stages):
            continue
        tensors = [grads[p] for p in group.positions]
        maxima = torch.stack(
            [n.to(judged.dtype) for n in torch._foreach_norm(tensors, ord=math.inf)]
        )
        layer = layer_norms(
            maxima, group.stages[0].layout.tensor_layer, len(group.layer_ids), math.inf
        )
        judged = judged.index_copy(0, group.layer_ids_t, layer)
    return judged
