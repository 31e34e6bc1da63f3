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
               the same ``(L,)`` vector to the host once per step.
=============  ==================================================================

The report keeps the norms measured before anything was done, so
``report.nonfinite_layers()`` names the layers whatever the policy.
"""

from __future__ import annotations

import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from gradclip.core.engine import Plan

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteGradientError",
    "SkipHandle",
    "check_nonfinite",
    "raise_nonfinite",
    "read_nonfinite",
    "zero_nonfinite_",
]

NONFINITE_POLICIES = ("propagate", "zero", "error", "skip")

# Integer views of the float gradients: multiplying the bit pattern by 0 gives
# +0.0 whatever the value was (inf and NaN included); by 1 leaves it untouched.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class NonFiniteGradientError(RuntimeError):
    """A gradient norm was inf or NaN under ``nonfinite="error"``; nothing was modified."""

    def __init__(self, layers: list[str]) -> None:
        self.layers = layers
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


def _bad_layers(plan: Plan, layer_norms: torch.Tensor) -> torch.Tensor:
    # layers without gradients read NaN ("not measured"): they are not non-finite
    return ~torch.isfinite(layer_norms) & plan.layer_measured_t


def read_nonfinite(plan: Plan, layer_norms: torch.Tensor) -> list[str]:
    """Names of the layers whose norm is not finite: one ``(L,)`` read to the host."""
    flags = _bad_layers(plan, layer_norms).tolist()
    return [name for name, bad in zip(plan.layer_names, flags) if bad]


def raise_nonfinite(layers: list[str]) -> None:
    """Raise `NonFiniteGradientError` for ``layers``."""
    raise NonFiniteGradientError(layers)


def zero_nonfinite_(
    plan: Plan, grads: list[torch.Tensor], tensor_norms: torch.Tensor, layer_norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero the gradients of non-finite layers in place, on the device.

    Returns:
        The per-tensor and per-layer norms the rules should see (0 for the
        zeroed layers) and the ``(L,)`` bool mask of the zeroed layers.
    """
    if not plan.all_measured:
        raise RuntimeError("nonfinite='zero' needs every layer measured (measure_all)")
    bad_layer = _bad_layers(plan, layer_norms)
    bad_tensor = bad_layer.index_select(0, plan.measured_layer_t)
    for bucket in plan.buckets:
        chunk = grads[bucket.start : bucket.stop]
        bits = _BITS[chunk[0].element_size()]
        keep = (~bad_tensor[bucket.start : bucket.stop]).to(bucket.device, bits)
        torch._foreach_mul_([g.view(bits) for g in chunk], list(keep.unbind(0)))
    return (
        tensor_norms.masked_fill(bad_tensor, 0.0),
        layer_norms.masked_fill(bad_layer, 0.0),
        bad_layer,
    )


class SkipHandle(RemovableHandle):
    """Handle of a ``nonfinite="skip"`` attachment; `remove` detaches it.

    The optimizer's ``step`` is wrapped on the instance (as a bound method, so
    that LR schedulers created later can wrap it in turn). If something wrapped
    it after us, `remove` cannot unwrap it and turns the wrapper into a
    plain pass-through instead.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, apply: Callable[[], bool]) -> None:
        """Wrap ``optimizer.step``; ``apply()`` normalizes and says whether to step."""
        self._hooks: OrderedDict[int, object] = OrderedDict()  # RemovableHandle needs one
        super().__init__(self._hooks)
        self.active = True
        self.skipped_steps = 0
        self._optimizer = weakref.ref(optimizer)
        original = optimizer.step
        self._had_instance_step = "step" in optimizer.__dict__
        self._original = original
        handle = self

        def step(_optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
            if handle.active and not apply():
                handle.skipped_steps += 1
                return None
            return original(*args, **kwargs)

        self._wrapper = types.MethodType(step, optimizer)
        optimizer.step = self._wrapper  # type: ignore[method-assign]

    def remove(self) -> None:
        self.active = False
        optimizer = self._optimizer()
        if optimizer is not None and optimizer.__dict__.get("step") is self._wrapper:
            if self._had_instance_step:
                optimizer.step = self._original  # type: ignore[method-assign]
            else:
                del optimizer.step
