"""Attaching to a fused optimizer: the multiply, the unscale and the skip done by its kernel.

PyTorch's fused optimizers (``fused=True``) divide every gradient by
``optimizer.grad_scale`` and skip the update where ``optimizer.found_inf`` is 1,
inside their one pass over the parameters, without the host. `attach_fused`
wraps such an optimizer's ``step`` so that each step

1. reads what ``GradScaler.step`` set, if anything: the scale ``S`` of gradients
   not unscaled yet, and its ``found_inf``;
2. runs the normalizer on the gradients as they are, its rules reading the true
   norms (``‖g‖ / S``); see `gradclip.core.folding`. When the step's rules give
   one coefficient ``c`` for all the gradients and folding is on, nothing is
   multiplied and ``grad_scale`` becomes ``S / c`` (``1 / c`` without AMP);
   with folding off, gradclip divides the gradients by that same float32
   divisor itself, so that both give the optimizer the same gradients. Only
   where the normalizer reads every gradient the optimizer updates: otherwise
   (another parameter, a frozen one with a gradient) ``c`` is multiplied in and
   ``grad_scale`` stays ``S``, which those other gradients still carry;
3. sets ``grad_scale`` and ``found_inf`` (new tensors: the scaler's own are
   never modified) and calls the optimizer's step; with ``nonfinite="skip"``,
   ``found_inf`` is also 1 when a layer was not finite, decided on the device;
4. puts back what was there before; when the step raises, removes both
   (``GradScaler`` would have removed its own after the step).

A closure is evaluated first, as torch's fused steps do, so that the
gradients it computes are the ones normalized.

A step pre-hook does the same for a step that bypassed the wrapper
(accelerate's fp16 path swaps ``optimizer.step`` for the step it saw before
``attach``), and a post-hook puts back what it set.

With ``attach(optimizer, scaler=scaler)`` the normalizer runs earlier, inside
``scaler.step``, and the scaler's own check for inf/NaN is read from its norms
(`gradclip.fused_scaler`). On steps ``found_inf`` skips, no rule's state
changes. The count of skipped steps stays on the device until it is read.

Fused ``SGD`` with momentum has a hazard: on its first step it creates the
momentum buffers uninitialized and fills them in the kernel, so a first step
skipped through ``found_inf`` leaves garbage that the next step reads. Missing
buffers are therefore created as zeros before the step, which with
``dampening=0`` gives the very first update PyTorch computes (``0·m + g = g``);
with ``dampening != 0`` it would not, and such an optimizer is not attached this
way (`fusable` says why).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradclip.core.engine import Engine
from gradclip.core.folding import FusedArgs
from gradclip.core.report import NormReport
from gradclip.fused_scaler import attach_scaler
from gradclip.hooks import AttachHandle, StepWrapper, closure_of

__all__ = [
    "FusedHandle",
    "FusedStep",
    "ParamCover",
    "attach_fused",
    "fusable",
    "init_momentum",
    "kernel_scale",
    "momentum_if_skipping",
    "skip_flag",
]

_MISSING: Any = object()
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def fusable(optimizer: torch.optim.Optimizer) -> str | None:
    """``None`` if ``optimizer`` can take gradclip's work in its fused step, else why not.

    Examples:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> fusable(torch.optim.AdamW([w], fused=True)) is None
        True
        >>> fusable(torch.optim.AdamW([w]))
        'its step is not fused (fused=True)'
        >>> fusable(torch.optim.AdamW([{"params": [w], "fused": False}], fused=True))
        'a parameter group has fused=False'
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return "its step is not fused (fused=True)"
    default = optimizer.defaults.get("fused")
    if not all(group.get("fused", default) for group in optimizer.param_groups):
        # torch's unfused update asserts that grad_scale and found_inf are None
        return "a parameter group has fused=False"
    if isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            if group.get("momentum", 0) and group.get("dampening", 0):
                return "fused SGD with momentum and dampening cannot skip its first step"
    return None


def init_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Zero momentum buffers where fused SGD would create them uninitialized (see above)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if not group.get("momentum", 0):
            continue
        for p in group["params"]:
            if p.grad is not None and optimizer.state[p].get("momentum_buffer") is None:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )


def momentum_if_skipping(optimizer: torch.optim.Optimizer) -> None:
    """`init_momentum` before a step whose ``found_inf`` is set: it may be skipped."""
    if optimizer.__dict__.get("found_inf") is not None:
        init_momentum(optimizer)


def skip_flag(found: torch.Tensor | None, bad: torch.Tensor | None) -> torch.Tensor | None:
    """The ``found_inf`` of a step: the scaler's, gradclip's non-finite flag, or their maximum.

    Examples:
        >>> skip_flag(torch.tensor(0.0), torch.tensor(True))
        tensor(1.)
        >>> skip_flag(None, None) is None
        True
    """
    if bad is None:
        return found
    flag = bad.to(torch.float32)
    return flag if found is None else torch.maximum(found.to(flag.device), flag)


def kernel_scale(divisor: torch.Tensor | None) -> torch.Tensor | None:
    """``divisor`` as the fused kernels read ``grad_scale``: float32 (``None``: no division)."""
    return None if divisor is None else divisor.to(torch.float32)


class ParamCover:
    """Whether an optimizer updates exactly the normalizer's parameters.

    Only then may a coefficient go into its ``grad_scale``, which divides every
    gradient it updates. Recomputed when its parameter groups change size.
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self._params = frozenset(id(p) for p in params)
        self._sizes: tuple[int, ...] | None = None
        self._same = False

    def same(self, optimizer: torch.optim.Optimizer) -> bool:
        sizes = tuple(len(g["params"]) for g in optimizer.param_groups)
        if sizes != self._sizes:
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self._sizes, self._same = sizes, ids == self._params
        return self._same


class FusedStep:
    """An engine's step for a fused optimizer's step (see `Engine.step`).

    Args:
        optimizer: the fused optimizer.
        fold: fold a uniform coefficient into ``grad_scale`` where the optimizer
            updates exactly the engine's parameters.
        skip_on_device: ``nonfinite="skip"``: mark the step on the device.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, fold: bool, skip_on_device: bool) -> None:
        self.optimizer = optimizer
        self.fold = fold
        self.skip_on_device = skip_on_device
        self._covers: dict[int, ParamCover] = {}  # per engine: a changed model builds another

    def __call__(
        self,
        engine: Engine,
        scale: torch.Tensor | None,
        found: torch.Tensor | None,
        find_inf: bool = False,
    ) -> NormReport:
        """Run ``engine``'s step for the optimizer's coming step.

        Raises:
            RuntimeError: the optimizer's step can no longer take ``grad_scale``
                (a parameter group added since ``attach`` is not fused); nothing
                is modified.
        """
        why = fusable(self.optimizer)
        if why is not None:
            raise RuntimeError(
                f"gradclip was attached to this optimizer as a fused one, but now {why}: "
                "call remove() on the handle attach returned and attach again"
            )
        exclusive = self.checks_all(engine)
        fold = self.fold and exclusive
        return engine.step(
            FusedArgs(scale, found, fold, self.skip_on_device, find_inf, exclusive=exclusive)
        )

    def _cover(self, engine: Engine) -> ParamCover:
        cover = self._covers.get(id(engine))
        if cover is None:
            self._covers.clear()
            cover = self._covers[id(engine)] = ParamCover(engine.params)
        return cover

    def checks_all(self, engine: Engine) -> bool:
        """Whether the engine reads every gradient the optimizer updates.

        The optimizer must update exactly the engine's parameters, and no frozen
        one (which the engine leaves out) may have a gradient. Only then may its
        ``grad_scale`` carry a coefficient (it divides every gradient the
        optimizer updates), and may the engine take ``GradScaler``'s check.
        """
        if not self._cover(engine).same(self.optimizer):
            return False
        params = engine.params
        # C-level pass for the usual case: every parameter trainable
        return all(map(_REQUIRES_GRAD, params)) or all(
            p.requires_grad or p.grad is None for p in params
        )


class FusedHandle(AttachHandle):
    """What `GradientNormalizer.attach` returns for a fused optimizer.

    Attributes:
        skipped: 0-d device tensor, the steps skipped through ``found_inf`` for
            non-finite gradients (``nonfinite="skip"``) or by ``GradScaler``;
            `skipped_steps` reads it (one host read).
    """

    def __init__(self, on_remove: Callable[[], None]) -> None:
        self.skipped: torch.Tensor | None = None
        super().__init__(on_remove)

    @property  # type: ignore[override]
    def skipped_steps(self) -> int:
        """The steps skipped so far (reads the device counter)."""
        return 0 if self.skipped is None else int(self.skipped.item())

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.skipped = None if value == 0 else torch.tensor(float(value))

    def count(self, found_inf: torch.Tensor) -> None:
        """Add a step's ``found_inf`` (0 or 1) to the counter, on the device."""
        if self.skipped is None:
            self.skipped = torch.zeros((), dtype=torch.float32, device=found_inf.device)
        self.skipped.add_(found_inf)


#: ``run(scale, found_inf, find_inf)``: normalizes the gradients and returns the
#: ``grad_scale`` to set (``None``: none), a 0-d bool device flag of non-finite
#: gradients to skip on (``None``: none) and, with ``find_inf``, the
#: `gradclip.core.folding.nonfinite_flag`; ``None`` (only with ``find_inf``) when
#: the normalizer does not read every gradient the optimizer updates
Run = Callable[
    [torch.Tensor | None, torch.Tensor | None, bool],
    "tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None",
]


def _grads_token(optimizer: torch.optim.Optimizer) -> tuple[int, int] | None:
    """Which gradients these are: the first one's identity and in-place version."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                return id(p.grad), p.grad._version
    return None


def attach_fused(
    optimizer: torch.optim.Optimizer,
    run: Run,
    forget: Callable[[], None],
    scaler: torch.amp.GradScaler | None = None,
) -> FusedHandle:
    """Wrap ``optimizer.step`` (see the module docstring), and ``scaler.step`` if given
    (`gradclip.fused_scaler`)."""
    handle: FusedHandle
    prepared = [False]  # scaler.step ran the normalizer for the coming step
    entered = [False]  # the wrapper runs this step (its pre-hook then does nothing)
    names = ("grad_scale", "found_inf")
    saved: list[Any] = []  # what the guard replaced for a step that bypassed the wrapper
    guarded: list[Any] = [None]  # the gradients the guard normalized, `_grads_token`

    def hand_over(opt: torch.optim.Optimizer, scale: Any, found: Any) -> None:
        """Normalize, and set ``grad_scale``/``found_inf`` for the kernel."""
        ran = run(
            None if scale is _MISSING else scale,
            None if found is _MISSING else found,
            False,
        )
        assert ran is not None
        grad_scale, bad, _ = ran
        skip = skip_flag(None if found is _MISSING else found, bad)
        if grad_scale is not None:
            opt.grad_scale = kernel_scale(grad_scale)  # type: ignore[attr-defined]
        else:  # unscaled already (put back after the step)
            opt.__dict__.pop("grad_scale", None)
        if skip is not None:
            opt.found_inf = skip  # type: ignore[attr-defined]
            init_momentum(opt)
            if bad is not None:
                handle.count(skip)

    def put_back(opt: torch.optim.Optimizer, values: Sequence[Any]) -> None:
        for name, value in zip(names, values):
            if value is _MISSING:
                opt.__dict__.pop(name, None)
            else:
                setattr(opt, name, value)

    def step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        original = wrapped.original
        if not wrapped.active:
            return original(*args, **kwargs)
        if prepared[0]:  # the scaler set grad_scale and found_inf from gradclip's
            prepared[0] = False
            momentum_if_skipping(opt)
            entered[0] = True
            try:
                return original(*args, **kwargs)
            finally:
                entered[0] = False
        closure = closure_of(opt, args, kwargs)  # accelerate passes None
        loss = None
        if closure is not None:
            # What torch's fused steps do first: the update then uses these gradients.
            # Run here, so that they are normalized before the kernel reads them.
            with torch.enable_grad():
                loss = closure()
            args, kwargs = (), {}
        before = [opt.__dict__.get(name, _MISSING) for name in names]
        try:
            hand_over(opt, *before)
            entered[0] = True  # for its pre-hooks (a subclass's step runs them twice)
            result = original(*args, **kwargs)
        except BaseException:
            # GradScaler removes what it set only after a step that returned: left
            # here, its scale would make every later step look unscaled-but-scaled
            opt.__dict__.pop("grad_scale", None)
            opt.__dict__.pop("found_inf", None)
            raise
        finally:
            entered[0] = False
        put_back(opt, before)
        return result if closure is None else loss

    def guard(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Inside every Optimizer.step, whoever calls it: a step that bypassed the
        # wrapper (accelerate's fp16 path swaps optimizer.step for a copy of the
        # step it saw before attach) is normalized here, as by the wrapper.
        if entered[0] or not wrapped.active:
            return
        if saved and guarded[0] == _grads_token(opt):
            return  # a subclass's step calling Optimizer.step: this very step again
        unguard(opt, args, kwargs)  # a guarded step that raised left them set
        if prepared[0]:
            prepared[0] = False
            momentum_if_skipping(opt)
            return
        if closure_of(opt, args, kwargs) is not None:
            # the step would compute its gradients after the normalizer ran
            raise RuntimeError(
                "a closure was passed to a step that bypassed gradclip's wrapper of this fused "
                "optimizer (a copy of its step taken before attach): call "
                "optimizer.step(closure) itself, or the closure first and then the step"
            )
        saved[:] = [opt.__dict__.get(name, _MISSING) for name in names]
        hand_over(opt, *saved)
        guarded[0] = _grads_token(opt)

    def unguard(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if saved:
            put_back(opt, saved)
            saved.clear()

    def prepare(scale: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        ran = run(scale, None, True)
        if ran is None:
            return None
        grad_scale, bad, found = ran
        flag = skip_flag(found, bad)
        assert flag is not None
        if bad is not None:
            handle.count(flag)
        prepared[0] = True
        return kernel_scale(grad_scale), flag

    def finish() -> None:
        prepared[0] = False

    wrapped = StepWrapper(optimizer, step, forget)
    hooks = [optimizer.register_step_pre_hook(guard), optimizer.register_step_post_hook(unguard)]
    unwrap_scaler = None if scaler is None else attach_scaler(scaler, optimizer, prepare, finish)

    def remove() -> None:
        if unwrap_scaler is not None:
            unwrap_scaler()
        for hook in hooks:
            hook.remove()
        wrapped.remove()

    handle = FusedHandle(remove)
    return handle
