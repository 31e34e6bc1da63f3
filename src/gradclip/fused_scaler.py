"""``GradScaler.step`` for an attached fused optimizer: the scaler's check read from the norms.

With a fused optimizer and no ``scaler.unscale_``, ``scaler.step(optimizer)``
first reads every gradient to find an inf or NaN (``_check_inf_per_device``),
then lets the optimizer's kernel divide by the scale ``S``. gradclip measures
every gradient anyway, and a norm of the scaled gradients is inf or NaN where an
element is, so that read can go: `attach_scaler` wraps ``scaler.step`` on the
instance (``normalizer.attach(optimizer, scaler=scaler)``) and, for that
optimizer, on a step where nobody called ``unscale_``:

1. runs the normalizer on the scaled gradients (its rules read the true norms
   ``‖g‖ / S``), which gives the divisor ``S / c`` (``S`` when the
   coefficients were multiplied in) and a device flag of non-finite norms
   (`gradclip.core.folding.nonfinite_flag`);
2. hands the scaler a step it considers unscaled already: ``found_inf`` per
   device is gradclip's flag (so ``scaler.update()`` lowers the scale after a
   skipped step, as it would have), and ``optimizer.grad_scale`` the divisor,
   which the scaler passes on to the fused kernel;
3. calls the scaler's own ``step``, which sets ``found_inf`` on the optimizer,
   steps it and removes both attributes.

The flag is also 1 where a float32 sum of squares overflowed with finite
elements (a norm of the scaled gradients past about 1.8e19): the scaler then
skips the step and halves its scale, as for an inf.

Anything else goes to the scaler as it is: another optimizer, a step after
``unscale_``, a disabled scaler, an optimizer that also updates parameters the
normalizer does not cover (the scaler must check those), or a frozen
parameter that still has a gradient.

Examples:
    >>> net = nn.Linear(4, 2)
    >>> opt = torch.optim.AdamW(net.parameters(), fused=True)
    >>> scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    >>> clip = gradclip.GradientNormalizer(net, gradclip.ClipGlobalNorm(1.0))
    >>> handle = clip.attach(opt, scaler=scaler)
    >>> scaler.scale(net(torch.ones(3, 4)).sum()).backward()
    >>> scaler.step(opt)  # no pass of the scaler's own over the gradients
    >>> scaler.update()
    >>> print(f"{float(clip.last_report.total_norm()):.4f}", scaler.get_scale())
    9.4868 1024.0
    >>> handle.remove()  # the scaler's own step again
    >>> "step" in vars(scaler)
    False
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from gradclip.hooks import StepWrapper

__all__ = ["Prepare", "attach_scaler", "check_scaler"]

#: runs the normalizer on gradients scaled by the given ``S``: ``(grad_scale,
#: found_inf)`` for the optimizer (``grad_scale`` ``None``: unscaled already), or
#: ``None`` where it cannot take the scaler's check
Prepare = Callable[[torch.Tensor], "tuple[torch.Tensor | None, torch.Tensor] | None"]


def check_scaler(scaler: object) -> None:
    """Raise a ``TypeError`` unless ``scaler`` is a ``torch.amp.GradScaler``.

    Examples:
        >>> check_scaler(torch.amp.GradScaler("cpu"))
        >>> check_scaler("scaler")
        Traceback (most recent call last):
        ...
        TypeError: attach(..., scaler=) takes the torch.amp.GradScaler ..., got str
    """
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            "attach(..., scaler=) takes the torch.amp.GradScaler that steps this optimizer "
            f"(scaler.step(optimizer)), got {type(scaler).__name__}"
        )


def attach_scaler(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    prepare: Prepare,
    finish: Callable[[], None],
) -> Callable[[], None]:
    """Wrap ``scaler.step`` for ``optimizer`` (see the module docstring); returns the remover.

    ``prepare`` is called once per step the scaler would have checked, before
    anything is set; when it raises, nothing of the scaler's was changed.
    ``finish`` is called after every step ``prepare`` prepared, also when it raised.
    """
    target = weakref.ref(optimizer)
    # a subclass (ShardedGradScaler) checks across ranks its own way: left to it
    own = type(scaler)._check_inf_per_device is torch.amp.GradScaler._check_inf_per_device

    def step(sc: torch.amp.GradScaler, opt: Any, *args: Any, **kwargs: Any) -> Any:
        original = wrapped.original
        if not (wrapped.active and own and opt is target() and sc.is_enabled()):
            return original(opt, *args, **kwargs)
        state = sc._per_optimizer_states[id(opt)]
        scale = sc._scale
        if state["stage"] is not OptState.READY or scale is None or "closure" in kwargs:
            return original(opt, *args, **kwargs)
        try:
            prepared = prepare(scale)
        except BaseException:
            finish()
            raise
        if prepared is None:
            return original(opt, *args, **kwargs)
        grad_scale, found_inf = prepared
        state["found_inf_per_device"] = {found_inf.device: found_inf}
        state["stage"] = OptState.UNSCALED  # the kernel still divides by grad_scale
        opt.__dict__["grad_scale"] = grad_scale  # the scaler passes it on (None: no division)
        try:
            return original(opt, *args, **kwargs)
        except BaseException:
            # as if this step had not begun: a retry normalizes again
            opt.__dict__.pop("grad_scale", None)
            opt.__dict__.pop("found_inf", None)
            state["stage"] = OptState.READY
            state["found_inf_per_device"] = {}
            raise
        finally:
            finish()

    wrapped = StepWrapper(scaler, step, lambda: None)
    return wrapped.remove
