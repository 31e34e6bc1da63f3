"""Tensors as bytes, for state buffers whose length changes during a run.

A checkpoint stores bytes whole, where a tensor must match the shape of the
one it is loaded into (``torch.distributed.checkpoint`` loads in place).
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["pack_tensor", "unpack_tensor"]


def pack_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    """``tensor`` as ``{"dtype": "float64", "shape": [...], "data": bytes}``, a CPU copy.

    For buffers whose length changes during a run: a checkpoint stores bytes
    whole, where a tensor must match the shape of the one it is loaded into.
    The bytes are the tensor's elements in row-major order, native byte order.

    Examples:
        >>> packed = pack_tensor(torch.tensor([1.0, 2.5], dtype=torch.float64))
        >>> packed["dtype"], packed["shape"], len(packed["data"])
        ('float64', [2], 16)
        >>> unpack_tensor(packed).tolist()
        [1.0, 2.5]
    """
    cpu = tensor.detach().to("cpu", copy=True).contiguous()
    # ctypes reads the storage as it is: no numpy needed, no per-element Python objects
    data = ctypes.string_at(cpu.data_ptr(), cpu.nbytes) if cpu.nbytes else b""
    return {"dtype": str(cpu.dtype).removeprefix("torch."), "shape": list(cpu.shape), "data": data}


def unpack_tensor(packed: Mapping[str, Any]) -> torch.Tensor:
    """The tensor `pack_tensor` packed; ``ValueError`` if ``packed`` is not one."""
    if not isinstance(packed, Mapping) or set(packed) != {"dtype", "shape", "data"}:
        raise ValueError("expected a packed tensor {'dtype', 'shape', 'data'}")
    dtype = getattr(torch, str(packed["dtype"]), None)
    shape, data = packed["shape"], packed["data"]
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"packed tensor: unknown dtype {packed['dtype']!r}")
    if not isinstance(shape, list | tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"packed tensor: shape must be a list of ints >= 0, got {shape!r}")
    numel = 1
    for n in shape:
        numel *= n
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not isinstance(data, bytes | bytearray) or len(data) != numel * itemsize:
        raise ValueError(
            f"packed tensor: {numel * itemsize} bytes expected for {dtype} {list(shape)}"
        )
    if not numel:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
