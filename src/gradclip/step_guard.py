"""Optimizer wrappers, and a step that stays normalized when ``optimizer.step`` is replaced.

Training frameworks hand users a wrapper rather than the optimizer:
accelerate's ``AcceleratedOptimizer`` (a ``torch.optim.Optimizer`` subclass
that never runs ``Optimizer.__init__``, so it has no hooks of its own) and
Lightning's ``LightningOptimizer`` both keep the real one in ``.optimizer``.
`unwrap_optimizer` finds it, so that ``attach`` registers its hooks where
``step`` runs them.

With ``nonfinite="skip"``, ``attach`` wraps ``step`` on the instance, so that a
step can be skipped. Something may replace that attribute afterwards:
accelerate's fp16 path (``AcceleratedOptimizer(..., scaler=GradScaler())``)
swaps ``optimizer.step`` for its own patched copy of the step it saw when the
optimizer was prepared, and puts that one back after every step, which
silently drops a wrapper installed later. `guard_skipping` covers that case: a
step pre-hook, which runs inside ``Optimizer.step`` whoever calls it, notices a
step the wrapper did not normalize, normalizes it, and when it must be skipped
hides the gradients from the optimizer for this one step (every
``torch.optim`` optimizer leaves a parameter without a gradient untouched, its
state and step count included) and gives them back right after.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from gradclip.hooks import AttachHandle, attach_pre_hook, attach_skipping

__all__ = ["attach_guarded", "attach_once", "guard_skipping", "is_hookable", "unwrap_optimizer"]


def is_hookable(optimizer: object) -> bool:
    """Whether ``optimizer`` is a ``torch.optim.Optimizer`` with its step hooks.

    A subclass that never ran ``Optimizer.__init__`` (a wrapper) has none.
    """
    return isinstance(optimizer, torch.optim.Optimizer) and "_optimizer_step_pre_hooks" in vars(
        optimizer
    )


def unwrap_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside framework wrappers; anything else as it is.

    Follows ``.optimizer`` from objects that are not a fully built optimizer.

    Examples:
        >>> sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> class Wrapper:  # like accelerate's AcceleratedOptimizer
        ...     def __init__(self, optimizer): self.optimizer = optimizer
        >>> unwrap_optimizer(Wrapper(Wrapper(sgd))) is sgd, unwrap_optimizer(sgd) is sgd
        (True, True)
    """
    current = optimizer
    for _ in range(8):  # wrappers of wrappers, never a cycle
        if is_hookable(current):
            return current
        current = getattr(current, "optimizer", None)
        if current is None:
            break
    return optimizer


def guard_skipping(
    optimizer: torch.optim.Optimizer,
    apply_and_check: Callable[[], bool],
    normalized: list[bool],
    on_skip: Callable[[], None],
) -> Callable[[], None]:
    """Normalize (and skip) steps that bypass the ``step`` wrapper of ``nonfinite="skip"``.

    Args:
        optimizer: the optimizer the wrapper was installed on.
        apply_and_check: normalize; false if the step must be skipped.
        normalized: ``[flag]``, set by the wrapper when it normalized a step that
            goes ahead; this guard clears it at every step.
        on_skip: called for every step this guard skips.

    Returns:
        A function that removes the guard.
    """
    hidden: list[tuple[torch.Tensor, torch.Tensor]] = []

    def pre(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        post(opt, args, kwargs)  # a step that raised left them hidden
        if normalized[0]:  # the wrapper ran: nothing to do
            normalized[0] = False
            return
        if callable(kwargs.get("closure")) or any(callable(a) for a in args[1:]):
            raise RuntimeError(
                "nonfinite='skip' cannot skip a step whose gradients a closure computes "
                "inside optimizer.step(closure); use nonfinite='zero' (or 'error') with "
                "closure optimizers"
            )
        if apply_and_check():
            return
        on_skip()
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    hidden.append((p, p.grad))
                    p.grad = None

    def post(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        while hidden:
            p, grad = hidden.pop()
            p.grad = grad

    handles: list[RemovableHandle] = [
        optimizer.register_step_pre_hook(pre),
        optimizer.register_step_post_hook(post),
    ]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


def attach_guarded(
    optimizer: torch.optim.Optimizer,
    apply_and_check: Callable[[], bool],
    forget: Callable[[], None],
) -> AttachHandle:
    """`gradclip.hooks.attach_skipping`, plus `guard_skipping` for a replaced ``step``."""
    normalized = [False]

    def wrapped_check() -> bool:
        normalized[0] = apply_and_check()
        return normalized[0]

    def skipped() -> None:
        handle.skipped_steps += 1

    unguard = guard_skipping(optimizer, apply_and_check, normalized, skipped)

    def remove() -> None:
        unguard()
        forget()

    handle = attach_skipping(optimizer, wrapped_check, remove)
    return handle


def attach_once(
    attached: weakref.WeakKeyDictionary[torch.optim.Optimizer, AttachHandle],
    optimizer: Any,
    apply: Callable[[], Any],
    apply_skipping: Callable[[], bool],
    skip: bool,
    fused: Callable[[torch.optim.Optimizer, Callable[[], None]], AttachHandle | None] | None = None,
) -> AttachHandle:
    """What ``GradientNormalizer.attach`` does: unwrap, check, hook, remember in ``attached``.

    ``apply`` runs before every step; with ``skip``, ``apply_skipping`` instead,
    and the step is skipped when it returns True. ``fused``, where it returns a
    handle, hooks the optimizer instead (a fused optimizer, `gradclip.fused`).
    """
    optimizer = unwrap_optimizer(optimizer)  # accelerate's, Lightning's wrappers
    if not is_hookable(optimizer):
        raise TypeError(
            "attach() takes a torch.optim.Optimizer (it registers a step pre-hook), or a "
            f"wrapper keeping one in .optimizer, got {type(optimizer).__name__}; for other "
            "training loops call normalizer.apply() before the update"
        )
    if optimizer in attached:
        raise RuntimeError(
            "this GradientNormalizer is already attached to this optimizer: a second "
            "attach would normalize twice per step. Keep the first handle (or call its "
            "remove() before attaching again)"
        )
    ref = weakref.ref(optimizer)

    def forget() -> None:
        opt = ref()
        if opt is not None:
            attached.pop(opt, None)

    handle = None if fused is None else fused(optimizer, forget)
    if handle is None:
        if skip:
            handle = attach_guarded(optimizer, lambda: not apply_skipping(), forget)
        else:
            handle = attach_pre_hook(optimizer, apply, forget)
    attached[optimizer] = handle
    return handle
