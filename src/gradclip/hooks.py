"""Running a normalizer inside ``optimizer.step()``: what `GradientNormalizer.attach` installs.

Without a closure the normalizer runs in a step pre-hook, on the gradients the
last ``backward()`` left. With a closure (``LBFGS``, or any optimizer stepped
as ``optimizer.step(closure)``) the gradients the update uses are the ones the
closure computes inside ``step``, possibly several times: the pre-hook then
wraps the closure so that every evaluation is normalized right after its
backward pass, and nothing is normalized before ``step``.

With ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` unscales before it
calls ``step``, so the normalizer sees unscaled gradients, and a step the
scaler skips does not run the normalizer at all.
"""

from __future__ import annotations

import types
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["AttachHandle", "StepWrapper", "attach_pre_hook", "attach_skipping", "closure_of"]


def _first(args: tuple[Any, ...], optimizer: torch.optim.Optimizer) -> int:
    # step pre-hooks receive step's arguments with the optimizer itself first
    return 1 if args and args[0] is optimizer else 0


def closure_of(
    optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Callable[[], Any] | None:
    """The closure ``optimizer.step`` was given (by position or keyword), or ``None``."""
    at = _first(args, optimizer)
    closure = kwargs.get("closure", args[at] if len(args) > at else None)
    return closure if callable(closure) else None


def _with_closure(
    optimizer: torch.optim.Optimizer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    closure: Callable[[], Any],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure}
    at = _first(args, optimizer)
    return (*args[:at], closure, *args[at + 1 :]), kwargs


def _check_unscaled(optimizer: torch.optim.Optimizer) -> None:
    if getattr(optimizer, "grad_scale", None) is not None:
        # A fused optimizer stepped by GradScaler without unscale_: the gradients
        # are still scaled, and normalizing them would be wrong. GradScaler removes
        # the attributes it set only after a step that returned: remove them here,
        # or every later step, unscale_ called or not, would raise again.
        optimizer.__dict__.pop("grad_scale", None)
        optimizer.__dict__.pop("found_inf", None)
        raise RuntimeError(
            "the optimizer's gradients are still scaled by GradScaler (fused optimizer): call "
            "scaler.unscale_(optimizer) before scaler.step(optimizer) so that gradclip "
            "normalizes the true gradients"
        )


class AttachHandle(RemovableHandle):
    """What `GradientNormalizer.attach` returns; ``remove()`` detaches the normalizer.

    Attributes:
        skipped_steps: with ``nonfinite="skip"``, how many optimizer steps were
            skipped for non-finite gradients.
    """

    def __init__(self, on_remove: Callable[[], None]) -> None:
        self._hooks: OrderedDict[int, object] = OrderedDict()  # RemovableHandle needs one
        super().__init__(self._hooks)
        self._on_remove: Callable[[], None] | None = on_remove
        self.skipped_steps = 0

    def remove(self) -> None:
        if self._on_remove is not None:
            on_remove, self._on_remove = self._on_remove, None
            on_remove()


def attach_pre_hook(
    optimizer: torch.optim.Optimizer, apply: Callable[[], object], forget: Callable[[], None]
) -> AttachHandle:
    """Run ``apply`` before every ``optimizer.step()``, or after each closure evaluation."""

    def hook(
        opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        _check_unscaled(opt)
        closure = closure_of(opt, args, kwargs)
        if closure is None:
            apply()
            return None

        def normalized_closure() -> Any:
            loss = closure()
            apply()
            return loss

        return _with_closure(opt, args, kwargs, normalized_closure)

    registered = optimizer.register_step_pre_hook(hook)

    def remove() -> None:
        registered.remove()
        forget()

    return AttachHandle(remove)


#: per owner, its StepWrappers in the order a call runs them (the first on top);
#: weak references: the wrappers must not keep their owner alive
_CHAINS: weakref.WeakKeyDictionary[Any, list[weakref.ref[StepWrapper]]] = (
    weakref.WeakKeyDictionary()
)


def _chain(owner: Any) -> list[StepWrapper]:
    """The live wrappers of ``owner``'s chain, in call order."""
    refs = _CHAINS.get(owner, [])
    return [w for w in (r() for r in refs) if w is not None]


class StepWrapper:
    """``optimizer.step`` replaced on the instance by ``step(opt, *args, **kwargs)``.

    (Also ``GradScaler.step``, `gradclip.fused_scaler`: any object with a ``step``.)

    Installed as a bound method, so that LR schedulers created later can wrap it
    in turn. A second wrapper of the same owner, while the first is still on
    top, goes below the ones already there: several normalizers then run in the
    order they were attached, as step pre-hooks do. `remove` takes the wrapper
    out; if something else wrapped the step after it, it cannot, and turns the
    wrapper into a pass-through instead (`active`).
    """

    def __init__(
        self,
        optimizer: Any,
        step: Callable[..., Any],
        forget: Callable[[], None],
    ) -> None:
        self.owner = weakref.ref(optimizer)
        self.original: Callable[..., Any]
        self.active = True
        self._forget = forget
        self.wrapper = types.MethodType(step, optimizer)
        chain = _chain(optimizer)
        if chain and optimizer.__dict__.get("step") is chain[0].wrapper:
            last = chain[-1]  # runs ours next, then what it ran
            self.original, last.original = last.original, self.wrapper
            self._had_instance_step = False  # (only the top one's is read)
            _CHAINS[optimizer] = [weakref.ref(w) for w in (*chain, self)]
            return
        self.original = optimizer.step
        self._had_instance_step = "step" in optimizer.__dict__
        optimizer.step = self.wrapper  # type: ignore[method-assign]
        _CHAINS[optimizer] = [weakref.ref(self)]

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        opt = self.owner()
        chain = [] if opt is None else _chain(opt)
        at = next((i for i, w in enumerate(chain) if w is self), None)
        if opt is not None and at is not None and at > 0:
            chain[at - 1].original = self.original  # spliced out
            del chain[at]
        elif opt is not None and opt.__dict__.get("step") is self.wrapper:
            if at == 0 and len(chain) > 1:
                chain[1]._had_instance_step = self._had_instance_step
                opt.step = self.original  # the next one of the chain
                del chain[0]
            elif self._had_instance_step:
                opt.step = self.original  # type: ignore[method-assign]
                chain = []
            else:
                del opt.step
                chain = []
        if opt is not None and opt in _CHAINS:
            _CHAINS[opt] = [weakref.ref(w) for w in chain]
        self._forget()


def attach_skipping(
    optimizer: torch.optim.Optimizer,
    apply_and_check: Callable[[], bool],
    forget: Callable[[], None],
) -> AttachHandle:
    """Wrap ``optimizer.step``: normalize, and skip the step when ``apply_and_check()`` is false.

    The step is wrapped on the instance (see `StepWrapper`).
    """
    handle: AttachHandle

    def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if wrapped.active:
            if closure_of(opt, args, kwargs) is not None:
                raise RuntimeError(
                    "nonfinite='skip' cannot skip a step whose gradients a closure computes "
                    "inside optimizer.step(closure); use nonfinite='zero' (or 'error') with "
                    "closure optimizers"
                )
            _check_unscaled(opt)
            if not apply_and_check():
                handle.skipped_steps += 1
                return None
        return wrapped.original(*args, **kwargs)

    wrapped = StepWrapper(optimizer, step, forget)
    handle = AttachHandle(wrapped.remove)
    return handle
