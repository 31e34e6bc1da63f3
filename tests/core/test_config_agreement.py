"""Replicas configured differently raise the same error on every rank, within seconds.

On two gloo processes (one launch with the other distributed modules, see
`two_ranks`): FSDP2, DDP and an explicit ``process_group=`` with a setting that
differs between the ranks (a threshold, ``"None"`` against a rule, which used
to leave the other rank waiting for the process group's timeout, an extra
override, which used to change the collective's length and abort gloo,
``nonfinite``, ``measure_all``, the layers) all raise `RankMismatchError` on
both ranks with the same message, naming the setting, the layers and each
rank's value, before any gradient changes; the ranks are still in step
afterwards. Equal configurations spelled differently agree, and plain modules
without ``process_group=`` are not compared (pipeline stages differ).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from two_ranks import AGREEMENT, module_tests

import gradclip
from gradclip.commands.bench_distributed import CollectiveCounter

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

TIMEOUT_S = 60
FAST_S = 5.0  # a disagreement is reported within this, on every rank


# -- in the worker processes ----------------------------------------------------------------------
def _mlp() -> nn.Sequential:
    torch.manual_seed(30)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1))


def _fsdp() -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)
    return model


def _ddp() -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_mlp())


def _backward(model: nn.Module, rank: int) -> None:
    model.zero_grad(set_to_none=True)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(31 + rank)) * 3
    model(x).square().sum().backward()


def _local_grads(model: nn.Module) -> list[torch.Tensor]:
    from gradclip.core.sharding import local_tensor

    return [local_tensor(p.grad).clone() for p in model.parameters() if p.grad is not None]


Setting = Callable[[int], dict[str, Any]]  # rank -> GradientNormalizer arguments

# name: (model, per-rank arguments, the setting named, layers named, text in the message)
DISAGREEMENTS: dict[str, tuple[Callable[[], nn.Module], Setting, str, list[str], str]] = {
    "config:fsdp2-threshold": (
        _fsdp,
        lambda r: {"mode": "ClipL2PerLayer", "threshold": (1.0, 0.01)[r]},
        "rules",
        ["0", "2", "4"],
        "'0' (rank 0: ClipL2PerLayer(threshold=1.0), rank 1: ClipL2PerLayer(threshold=0.01))",
    ),
    "config:fsdp2-none-vs-rule": (
        _fsdp,
        lambda r: {"mode": ("None", "ClipL2PerLayer")[r]},
        "rules",
        ["0", "2", "4"],
        "rank 0: None(), rank 1: ClipL2PerLayer(threshold=1.0)",
    ),
    "config:fsdp2-extra-override": (
        _fsdp,
        lambda r: {"mode": "ClipL2PerLayer", "overrides": ({}, {"4": "None"})[r]},
        "rules",
        ["4"],
        "'4' (rank 0: ClipL2PerLayer(threshold=1.0), rank 1: None())",
    ),
    "config:fsdp2-nonfinite": (
        _fsdp,
        lambda r: {"mode": "ClipL2PerLayer", "nonfinite": ("propagate", "skip")[r]},
        "nonfinite",
        [],
        "nonfinite differs: rank 0: 'propagate', rank 1: 'skip'",
    ),
    "config:fsdp2-measure-all": (
        _fsdp,
        lambda r: {"mode": "ClipElementWiseAbsoluteValue", "measure_all": bool(r)},
        "measure_all",
        [],
        "measure_all differs: rank 0: False, rank 1: True",
    ),
    "config:ddp-threshold": (
        _ddp,
        lambda r: {"mode": "ClipL2PerLayer", "threshold": (1.0, 0.5)[r]},
        "rules",
        ["0", "2", "4"],
        "rank 0: ClipL2PerLayer(threshold=1.0), rank 1: ClipL2PerLayer(threshold=0.5)",
    ),
    "config:ddp-stateful-rule-fields": (
        _ddp,
        lambda r: {"mode": gradclip.ZClip(z_thresh=(2.5, 3.0)[r])},
        "rules",
        ["0", "2", "4"],
        "z_thresh=2.5",
    ),
    "config:process-group-layers": (
        _mlp,
        lambda r: {"mode": "ClipL2PerLayer", "process_group": "world", "drop": ("4",) if r else ()},
        "layers",
        [],
        "the layers differ: rank 1 lacks ['4(0, 1)']",
    ),
}


def _normalizer(model: nn.Module, kwargs: dict[str, Any]) -> gradclip.GradientNormalizer:
    import torch.distributed as dist

    kwargs = dict(kwargs)
    drop = kwargs.pop("drop", None)
    if kwargs.get("process_group") == "world":
        kwargs["process_group"] = dist.group.WORLD
    target: Any = model
    if drop is not None:  # a custom grouping, without the layers in ``drop``
        target = {
            name: list(m.parameters())
            for name, m in model.named_children()
            if name not in drop and any(True for _ in m.parameters())
        }
    return gradclip.GradientNormalizer(target, **kwargs)


def _case_disagreements(rank: int, out: dict[str, Any]) -> None:
    import torch.distributed as dist

    for name, (make, setting, named, layers, text) in DISAGREEMENTS.items():
        try:
            model = make()
            normalizer = _normalizer(model, setting(rank))
            _backward(model, rank)
            before = _local_grads(model)
            start = time.monotonic()
            try:
                normalizer.apply()
            except gradclip.RankMismatchError as err:
                elapsed = time.monotonic() - start
                message = str(err)
                assert elapsed < FAST_S, elapsed
                assert sorted(err.settings) == [named], err.settings
                assert err.params == layers, err.params
                assert err.settings[named][rank] == normalizer_value(normalizer, named), err
                assert text in message, message
                assert "No gradient or state was modified" in message, message
                after = _local_grads(model)
                assert all(torch.equal(a, b) for a, b in zip(before, after)), "modified"
            else:
                raise AssertionError("ranks configured differently were not detected")
            dist.barrier()  # still in step
            out[name] = {"ok": True, "collectives": 0, "same_on_ranks": message}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


def normalizer_value(normalizer: gradclip.GradientNormalizer, setting: str) -> Any:
    """What this rank sent for ``setting`` (the error's per-rank value)."""
    if setting == "rules":
        return [rule.describe() for rule in normalizer.rules.values()]
    if setting == "nonfinite":
        return normalizer.nonfinite
    if setting == "measure_all":
        return normalizer.measure_all
    return [f"{layer.name}({', '.join(layer.param_names)})" for layer in normalizer.layers]


def _case_agreeing(rank: int, out: dict[str, Any]) -> None:
    """Equal resolved configurations, spelled differently, agree; steady steps unchanged."""
    spelled = (
        {"mode": "ClipL2PerLayer", "threshold": 0.5, "overrides": {"4": "None"}},
        {
            "mode": gradclip.ClipL2PerLayer(0.5),
            "overrides": {"0": ("ClipL2PerLayer", 0.5), "4": {"mode": "None"}},
        },
    )
    for name, make, steady in (("config:fsdp2-agree", _fsdp, 1), ("config:ddp-agree", _ddp, 0)):
        try:
            model = make()
            normalizer = gradclip.GradientNormalizer(model, **spelled[rank])
            counts = []
            for _ in range(3):
                _backward(model, rank)
                with CollectiveCounter() as counter:
                    normalizer.apply()
                counts.append(len(counter.ops))
            assert counts == [AGREEMENT + steady, steady, steady], counts
            out[name] = {"ok": True, "collectives": steady, "same_on_ranks": ""}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


def _case_plain_module_not_compared(rank: int, out: dict[str, Any]) -> None:
    """A plain module under a process group: no collective, each rank its own configuration."""
    name = "config:plain-module-not-compared"
    model = _mlp()
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", (1.0, 0.01)[rank])
    _backward(model, rank)
    with CollectiveCounter() as counter:
        normalizer.apply()
    assert counter.ops == [], counter.ops
    out[name] = {"ok": True, "collectives": 0, "same_on_ranks": ""}


def _case_copy_shares_the_group(rank: int, out: dict[str, Any]) -> None:
    """A deep copy of a normalizer with ``process_group=`` shares the group and compares."""
    import copy

    import torch.distributed as dist

    name = "config:copy-shares-process-group"
    model = _mlp()
    original = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", (1.0, 0.5)[rank], process_group=dist.group.WORLD
    )
    clone = copy.deepcopy(original)
    assert clone.process_group is dist.group.WORLD
    _backward(model, rank)
    with pytest.raises(gradclip.RankMismatchError, match="the rules differ") as caught:
        clone.apply()
    out[name] = {"ok": True, "collectives": 0, "same_on_ranks": str(caught.value)}


def _case_bad_process_group(rank: int, out: dict[str, Any]) -> None:
    name = "config:process-group-type-checked"
    with pytest.raises(TypeError, match=r"takes a torch\.distributed\.ProcessGroup"):
        gradclip.GradientNormalizer(_mlp(), "ClipL2PerLayer", process_group="world")
    out[name] = {"ok": True, "collectives": 0, "same_on_ranks": ""}


CASES: list[Callable[[int, dict[str, Any]], None]] = [
    _case_disagreements,
    _case_agreeing,
    _case_plain_module_not_compared,
    _case_copy_shares_the_group,
    _case_bad_process_group,
]
CASE_NAMES = [
    *DISAGREEMENTS,
    "config:fsdp2-agree",
    "config:ddp-agree",
    "config:plain-module-not-compared",
    "config:copy-shares-process-group",
    "config:process-group-type-checked",
]


# -- in pytest ------------------------------------------------------------------------------------
results, test_every_case_ran, test_case = module_tests(
    __name__, CASE_NAMES, same_on_ranks=True
)  # the same error on every rank
