"""Replicas agree on their configuration: one fixed-size exchange per engine.

Ranks that hold replicas of a model (a ``DistributedDataParallel`` target,
``DTensor`` parameters, or an explicit ``process_group=``) must normalize with
the same configuration: under DDP, two thresholds make the replicas diverge;
under FSDP2, each rank would scale its own shard by its own rule, and a rank
whose configuration reduces nothing (``"None"``) or reduces another number of
values would skip the step's collective (the others wait for the process
group's timeout) or send a vector of another length (gloo aborts the process).

So before the first step of an engine on replicas every rank sends a digest
of its *resolved* configuration, one 48-bit hash per setting of `SETTINGS`
(each layer's name and parameters; each layer's rule with all its fields, the
threshold after overrides included; ``nonfinite``; ``measure_all``), in one
``all_reduce(MAX)`` of ``2·len(SETTINGS)`` integers ``[h, -h]``: every rank
then reads the largest and the smallest hash of each setting, and they are
equal on every rank exactly when no rank differs. The exchange's size and the
ranks taking part depend on nothing a rank may disagree on, so a disagreement
ends in the same `RankMismatchError` on every rank, within one collective,
never in a hang. Only on that error path a second exchange gathers each rank's
values, so that the message names the setting, the layers and every rank's
value.

It runs on the first step of every engine (a configuration, on a model of a
given structure), an event every replica shares; steady steps add nothing.

Examples:
    >>> config = Configuration.of(["0", "2"], [("weight", "bias")] * 2,
    ...                           ["ClipL2PerLayer(threshold=1.0)"] * 2, "propagate", False)
    >>> len(config.digest()), config.digest() == Configuration.of(
    ...     ["0", "2"], [("weight", "bias")] * 2,
    ...     ["ClipL2PerLayer(threshold=1.0)"] * 2, "propagate", False).digest()
    (4, True)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from gradclip.core.collective import RankMismatchError
from gradclip.core.sharding import RankGroup, is_dtensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "SETTINGS",
    "Configuration",
    "agree",
    "check_process_group",
    "ddp_group",
    "dtensor_group",
    "mismatch_message",
    "replica_group",
]

#: the settings compared, in the digest's order
SETTINGS = ("layers", "rules", "nonfinite", "measure_all")
_BITS = 48  # per hash: exact in int64 and in float64, collisions ~2^-48


@dataclass(frozen=True)
class Configuration:
    """One rank's resolved configuration, as plain values every rank can compare.

    Attributes:
        layers: per layer, ``"name(param, ...)"``.
        rules: per layer, its rule with every field (`gradclip.core.rule.Rule.describe`).
        nonfinite: the non-finite policy.
        measure_all: whether every layer is measured.
    """

    layers: tuple[str, ...]
    rules: tuple[str, ...]
    nonfinite: str
    measure_all: bool

    @classmethod
    def of(
        cls,
        names: Sequence[str],
        param_names: Sequence[Sequence[str]],
        rules: Sequence[str],
        nonfinite: str,
        measure_all: bool,
    ) -> Configuration:
        """From the layers' names, their parameters' names and their rules' descriptions."""
        layers = tuple(f"{n}({', '.join(p)})" for n, p in zip(names, param_names))
        return cls(layers, tuple(rules), nonfinite, bool(measure_all))

    def values(self) -> dict[str, Any]:
        """``{setting: value}`` in a form that pickles and compares alike on every rank."""
        return {
            "layers": list(self.layers),
            "rules": list(self.rules),
            "nonfinite": self.nonfinite,
            "measure_all": self.measure_all,
        }

    def digest(self) -> list[int]:
        """One ``_BITS``-bit hash per setting (`SETTINGS`), independent of the process."""
        values = self.values()
        out = []
        for name in SETTINGS:
            text = json.dumps(values[name], separators=(",", ":"))
            raw = hashlib.sha256(text.encode()).digest()
            out.append(int.from_bytes(raw[: _BITS // 8], "big"))
        return out


def dtensor_group(params: Sequence[torch.Tensor]) -> RankGroup | None:
    """The ranks over which ``DTensor`` parameters are split or replicated, or ``None``.

    The group the step's collective reduces over (`gradclip.core.mesh_group`:
    the default group for a mesh of every rank, the mesh's group for a sub-mesh,
    the largest mesh's for expert parallel); ``None`` without ``DTensor`` s, or on
    meshes the step refuses anyway (it then raises its own error on every rank).
    """
    from gradclip.core.mesh_group import reduction_group

    meshes: list[Any] = []
    for p in params:
        if is_dtensor(p) and p.device_mesh not in meshes:  # type: ignore[attr-defined]
            meshes.append(p.device_mesh)  # type: ignore[attr-defined]
    if not meshes:
        return None
    try:
        return RankGroup(reduction_group(meshes).group)
    except NotImplementedError:
        return None


def ddp_group(module: object) -> RankGroup | None:
    """The process group of a ``DistributedDataParallel`` model (through ``torch.compile``)."""
    from torch import nn

    while isinstance(module, nn.Module):
        if isinstance(module, nn.parallel.DistributedDataParallel):
            return RankGroup(module.process_group)
        module = getattr(module, "_orig_mod", None)  # torch.compile's wrapper
    return None


def replica_group(replicas: RankGroup | None) -> Any:
    """``replicas`` as ``GradientNormalizer(process_group=)`` takes it (``None``: no replicas)."""
    if replicas is None:
        return None
    import torch.distributed as dist

    return replicas.group if replicas.group is not None else dist.group.WORLD


def check_process_group(group: Any) -> Any:
    """``group`` if it is a usable ``ProcessGroup`` (or ``None``); a clear error otherwise."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group= names the ranks that hold replicas of the model, but no process "
            "group is initialized: call torch.distributed.init_process_group() first, or leave "
            "process_group out on a single process"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "process_group= takes a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD or one from new_group()), got {type(group).__name__}"
        )
    return group


def _device_for(group: ProcessGroup | None, params: Sequence[torch.Tensor]) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if "nccl" in backend or "xccl" in backend:  # device-only backends
        for p in params:
            if p.device.type != "cpu":
                return p.device
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(config: Configuration, replicas: RankGroup, params: Sequence[torch.Tensor] = ()) -> None:
    """Check that every rank of ``replicas`` has this configuration; one ``all_reduce``.

    Every rank of the group must call it at the same point (the first step of
    an engine). Reads the result to the host once.

    Raises:
        RankMismatchError: on every rank alike, when some rank's configuration
            differs; ``err.settings`` maps each differing setting to every
            rank's value.
    """
    import torch.distributed as dist

    group = replicas.group
    digest = torch.tensor(config.digest(), dtype=torch.int64)
    vector = torch.cat([digest, -digest]).to(_device_for(group, params))
    dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=group)
    n = len(SETTINGS)
    highest, lowest = vector[:n].tolist(), [-v for v in vector[n:].tolist()]
    differing = [s for s, hi, lo in zip(SETTINGS, highest, lowest) if hi != lo]
    if not differing:
        return
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, config.values(), group=group)
    if "layers" in differing and len({len(v["rules"]) for v in gathered}) > 1:
        differing.remove("rules")  # other layers: their rules cannot be compared one by one
    message, layers, settings = mismatch_message(differing, gathered)
    raise RankMismatchError(message, layers, 0, settings=settings)


def mismatch_message(
    differing: Sequence[str], per_rank: Sequence[dict[str, Any]]
) -> tuple[str, list[str], dict[str, dict[int, Any]]]:
    """The error's message, the layers it names, and ``{setting: {rank: value}}``.

    Examples:
        >>> a = Configuration.of(["0"], [("weight",)], ["ClipL2PerLayer(threshold=1.0)"],
        ...                      "propagate", False).values()
        >>> b = Configuration.of(["0"], [("weight",)], ["ClipL2PerLayer(threshold=0.01)"],
        ...                      "propagate", False).values()
        >>> message, layers, _ = mismatch_message(["rules"], [a, b])
        >>> print(message)  # doctest: +NORMALIZE_WHITESPACE
        Ranks disagree on the gradclip configuration (they hold replicas of one model and
        must normalize alike): the rules differ at layer '0' (rank 0:
        ClipL2PerLayer(threshold=1.0), rank 1: ClipL2PerLayer(threshold=0.01)). Give every
        rank the same mode, threshold, overrides, nonfinite and measure_all (a configuration
        read per node, from an environment variable or with a rank-dependent default is the
        usual cause). No gradient or state was modified, on any rank.
        >>> layers
        ['0']
    """
    parts: list[str] = []
    layers: list[str] = []
    settings: dict[str, dict[int, Any]] = {}
    for name in differing:
        values = {rank: v[name] for rank, v in enumerate(per_rank)}
        settings[name] = values
        if name == "layers":
            parts.append(_differing_layers(values))
        elif name == "rules":
            text, named = _differing_rules(values, per_rank)
            parts.append(text)
            layers.extend(named)
        else:
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in values.items())
            parts.append(f"{name} differs: {shown}")
    message = (
        "Ranks disagree on the gradclip configuration (they hold replicas of one model and must "
        "normalize alike): " + "; ".join(parts) + ". Give every rank the same mode, threshold, "
        "overrides, nonfinite and measure_all (a configuration read per node, from an environment "
        "variable or with a rank-dependent default is the usual cause). No gradient or state was "
        "modified, on any rank."
    )
    return message, layers, settings


def _differing_layers(values: dict[int, list[str]]) -> str:
    first = values[0]
    shown = []
    for rank, layers in values.items():
        if rank == 0 or layers == first:
            continue
        extra = [x for x in layers if x not in first][:5]
        missing = [x for x in first if x not in layers][:5]
        detail = []
        if extra:
            detail.append(f"has {extra} that rank 0 has not")
        if missing:
            detail.append(f"lacks {missing}")
        if not detail:
            detail.append("has the same layers in another order")
        shown.append(f"rank {rank} " + " and ".join(detail))
    return "the layers differ: " + "; ".join(shown)


def _differing_rules(
    values: dict[int, list[str]], per_rank: Sequence[dict[str, Any]]
) -> tuple[str, list[str]]:
    names = [layer.split("(", 1)[0] for layer in per_rank[0]["layers"]]
    count = min(len(v) for v in values.values())
    bad = [i for i in range(count) if len({v[i] for v in values.values()}) > 1]
    described = []
    for i in bad[:10]:
        shown = ", ".join(f"rank {r}: {v[i]}" for r, v in values.items())
        described.append(f"{names[i]!r} ({shown})")
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    return "the rules differ at layer " + ", ".join(described) + more, [names[i] for i in bad]
