"""Which ranks hold replicas of a model the Hugging Face Trainer wraps in DDP unseen."""

from __future__ import annotations

from typing import Any

import torch

from gradclip.core.sharding import is_dtensor

__all__ = ["trainer_ddp_group"]


def trainer_ddp_group(model: torch.nn.Module) -> Any:
    """The ranks holding replicas of ``model`` when the Trainer wraps it in DDP itself.

    The Trainer hands its callbacks ``trainer.model``, never the DDP wrapper that
    accelerate makes (``trainer.model_wrapped``), so the wrapper's process group
    cannot be read off the model. Accelerate wraps every model with a trainable
    parameter in DDP over the default group when it runs on several processes of
    one of its multi-process types (not FSDP, DeepSpeed, XLA or tensor parallel,
    whose parameters are sharded, nor a model holding DTensors).

    Args:
        model: the model the Trainer hands its callbacks.

    Returns:
        ``torch.distributed.group.WORLD`` when the Trainer's DDP replicates
        ``model`` over it, else ``None`` (one process, or sharded parameters).

    Examples:
        >>> print(trainer_ddp_group(torch.nn.Linear(2, 2)))  # one process
        None
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        from accelerate.state import AcceleratorState  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - the Trainer needs accelerate
        return None
    if not AcceleratorState._shared_state:  # no Accelerator made in this process
        return None
    state = AcceleratorState()
    kind = state.distributed_type
    replicated = str(getattr(kind, "value", kind)).startswith("MULTI_")  # DDP, in accelerate
    parallelism = getattr(state, "parallelism_config", None)
    if (
        not state.use_distributed
        or not replicated
        or (parallelism is not None and getattr(parallelism, "tp_enabled", False))
        or not any(p.requires_grad for p in model.parameters())
        or any(is_dtensor(p) for p in model.parameters())
    ):
        return None
    return dist.group.WORLD
