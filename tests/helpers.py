"""Small models and utilities shared by the tests."""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal"}


class OpCounter(TorchDispatchMode):
    """Counts every aten op run while active, by name (``aten.mul_.Tensor`` -> ``mul_``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func._schema.name.split("::")[-1]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(n for op, n in self.ops.items() if op in SYNC_OPS)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class HostReadCounter:
    """Counts Python-level reads of tensor values (``tolist``, ``item``, ``bool``, ``float``...).

    ``tolist`` does not go through the dispatcher, so :class:`OpCounter` cannot see it.
    """

    METHODS = ("tolist", "item", "__bool__", "__float__", "__int__", "numpy", "__index__")

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> HostReadCounter:
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
                self.calls[_name] += 1
                return _original(*args, **kw)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


class TinyRNN(nn.Module):
    """An embedding, a tanh RNN and a head: layers "embed", "rnn", "head"."""

    def __init__(self, vocab: int = 11, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.RNN(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def backward_once(model: nn.Module, scale: float = 1.0, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x = torch.randint(0, 11, (4, 6))
    (model(x).float().pow(2).mean() * scale).backward()


def mlp(layers: int, width: int = 8) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def fill_grads(model: nn.Module, scale: float = 10.0, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
    return [p.grad.clone() for p in model.parameters()]


def fused_net(dtype: torch.dtype = torch.float32, layers: int = 2) -> nn.Sequential:
    """The small network of the fused-optimizer tests: ``Linear(6, 9)``, then
    ``layers - 1`` times ``Tanh, Linear(9, 9)``, seeded, in ``dtype``."""
    torch.manual_seed(0)
    mods: list[nn.Module] = [nn.Linear(6, 9)]
    for _ in range(layers - 1):
        mods += [nn.Tanh(), nn.Linear(9, 9)]
    return nn.Sequential(*mods).to(dtype)


def backward_at(model: nn.Module, step: int, scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward of the mean square output on step ``step``'s batch of 16 inputs of 6
    (the model's dtype), the loss scaled by ``scaler`` if given."""
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step)).to(dtype)
    loss = model(x).float().square().mean() * 10
    (loss if scaler is None else scaler.scale(loss)).backward()


def grads_of(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def grad_params(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int, scale: float
) -> list[nn.Parameter]:
    """Parameters of these shapes with random values and gradients (``scale`` times N(0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
        p.grad = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


def torch_inductor_scalar_bug(message: str) -> str | None:
    """The reason to skip when ``message`` shows torch's scalar C++ bug, else ``None``.

    With ``ATEN_CPU_CAPABILITY=default`` Inductor is asked for no vector ISA, yet
    torch 2.13 still emits ``at::vec`` loops for some kernels (masked tails of
    small buffers) without including their header, so the C++ build fails, for
    gradclip's graphs as for any other. Only that failure is skipped.
    """
    if "at::vec" in message and "has not been declared" in message:
        capability = os.environ.get("ATEN_CPU_CAPABILITY", "unset")
        return (
            "torch's Inductor emits vector code it cannot build with "
            f"ATEN_CPU_CAPABILITY={capability} (a torch bug, not gradclip's)"
        )
    return None


@contextlib.contextmanager
def skipping_torch_inductor_scalar_bug() -> Iterator[None]:
    """Skip the test if the block fails only by `torch_inductor_scalar_bug`."""
    try:
        yield
    except Exception as error:
        reason = torch_inductor_scalar_bug(str(error))
        if reason is None:
            raise
        pytest.skip(reason)
