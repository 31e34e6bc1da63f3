"""Training under DDP and FSDP2 options users set, against the unsplit model clipped by hand.

On two gloo processes (one launch with the other distributed modules, see
`two_ranks`). Each case trains a few steps with an optimizer the normalizer is
attached to, and checks that every rank ends with the same parameters (DDP)
or the same full parameters (FSDP2) as one process training on both ranks'
batches with gradclip applied to its plain model. The rules mix a per-layer
rule with stateful per-layer overrides (ZClip, AutoClip), so a step that
normalized twice, or not at all, or with another rank's norms, shows.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from itertools import product
from typing import Any

import pytest
import torch
from torch import nn
from two_ranks import AGREEMENT, WORLD, module_tests

import gradclip
from gradclip.commands.bench_distributed import CollectiveCounter

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

TIMEOUT_S = 60
RTOL = 1e-6  # relative to max(|v|, 1e-3); in float64 a wrong step is off by far more
STEPS = 4


# -- in the worker processes ----------------------------------------------------------------------
class Net(nn.Module):
    """A small model with uneven dims (5, 3 on two ranks), a 1-element bias and a side branch."""

    def __init__(self, with_side: bool) -> None:
        super().__init__()
        torch.manual_seed(40)
        self.body = nn.Linear(6, 5)
        self.mid = nn.Linear(5, 3)
        self.head = nn.Linear(3, 1)
        # used on some steps or ranks only, by some cases
        self.side = nn.Linear(5, 3) if with_side else None
        self.double()  # the order DDP sums micro-batches and ranks in stays below RTOL

    def forward(self, x: torch.Tensor, side: bool = False) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        z = self.mid(h) + (self.side(h) if side and self.side is not None else 0.0)
        return self.head(torch.tanh(z))  # type: ignore[no-any-return]


RULES = ["per-layer", "global"]  # the rule sets every training case runs with
_current = {"rules": RULES[0]}


def _rules() -> dict[str, Any]:
    if _current["rules"] == "global":
        # totals over layers (a p-norm, a percentile of global norms), AGC's units
        # split over ranks (FSDP2's sharded biases), element-wise clamps
        return {
            "mode": gradclip.ClipGlobalNorm(0.05, norm_type=3.0),
            "overrides": {
                "body": gradclip.AdaptiveGradClip(0.02),
                "mid": gradclip.AutoClip(percentile=50),
                "head": ("ClipElementWiseAbsoluteValue", 0.02),
            },
        }
    return {
        "mode": "ClipL2PerLayer",
        "threshold": 0.05,
        "overrides": {
            "mid": gradclip.ZClip(warmup_steps=2, z_thresh=0.5, scope="layer"),
            "head": gradclip.AutoClip(percentile=50, scope="layer"),
        },
    }


def _batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    x, y = torch.randn(4, 6, generator=gen) * (1 + step), torch.randn(4, 1, generator=gen) * 5
    return x.double(), y.double()


Side = Callable[[int, int], bool] | None  # (step, rank) -> whether the side branch runs; no branch


def _never(step: int, rank: int) -> bool:
    return False


def _runs(side: Side, step: int, rank: int) -> bool:
    return side is not None and side(step, rank)


Optim = Callable[[Any], torch.optim.Optimizer]


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def _fused_adam(params: Any) -> torch.optim.Optimizer:
    # gradclip folds its coefficients into the fused kernel's grad_scale
    return torch.optim.Adam(params, lr=0.01, fused=True)


def _foreach_adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.01, foreach=True)


def _reference(micro: int, side: Side, make: Optim = _sgd) -> list[torch.Tensor]:
    """One process, both ranks' batches, the gradients DDP / FSDP2 average: the parameters."""
    model = Net(side is not None)
    optimizer = make(model.parameters())
    gradclip.GradientNormalizer(model, **_rules()).attach(optimizer)
    for step in range(STEPS):
        optimizer.zero_grad()
        for r in range(WORLD):  # each rank's micro-batches first, as DDP sums them
            for m in range(micro):
                x, y = _batch(step, m, r)
                out = model(x, _runs(side, step, r))
                (nn.functional.mse_loss(out, y) / (WORLD * micro)).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _compare(params: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    full = [p.full_tensor() if isinstance(p, DTensor) else p.detach() for p in params]
    flat = torch.cat([p.flatten() for p in full])
    every = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(every, flat)
    assert all(torch.equal(e, every[0]) for e in every), "the ranks' parameters differ"
    want = torch.cat([p.flatten() for p in expected])
    err = ((flat - want).abs() / want.abs().clamp_min(1e-3)).max().item()
    assert err <= RTOL, f"relative error {err:.3g} against the single-process run"


def _counted_step(optimizer: torch.optim.Optimizer) -> int:
    """Runs the step (gradclip's included); the number of collectives it ran."""
    counter = CollectiveCounter()
    with counter:
        optimizer.step()
    return len(counter.ops)


def _train_ddp(
    rank: int,
    *,
    micro: int = 1,
    side: Side = None,
    before: bool = False,
    make: Optim = _sgd,
    **ddp: Any,
) -> tuple[list[torch.Tensor], list[int]]:
    from torch.nn.parallel import DistributedDataParallel

    net = Net(side is not None)
    normalizer = gradclip.GradientNormalizer(net, **_rules()) if before else None
    model = DistributedDataParallel(net, **ddp)
    if normalizer is None:
        normalizer = gradclip.GradientNormalizer(model, **_rules())
    optimizer = make(model.parameters())
    normalizer.attach(optimizer)
    counts: list[int] = []
    for step in range(STEPS):
        optimizer.zero_grad()
        for m in range(micro):
            x, y = _batch(step, m, rank)
            if m < micro - 1:
                with model.no_sync():
                    (
                        nn.functional.mse_loss(model(x, _runs(side, step, rank)), y) / micro
                    ).backward()
            else:
                (nn.functional.mse_loss(model(x, _runs(side, step, rank)), y) / micro).backward()
        counts.append(_counted_step(optimizer))
    return list(net.parameters()), counts


def _side_on_rank0(step: int, rank: int) -> bool:
    return rank == 0


def _side_on_odd_steps(step: int, rank: int) -> bool:
    return step % 2 == 1


DDP_CASES: dict[str, tuple[dict[str, Any], int, Side, bool]] = {
    # name: (DDP keywords, micro-batches, side branch, normalizer built before wrapping)
    "ddp:plain": ({}, 1, None, False),
    "ddp:built-before-wrap": ({}, 1, None, True),
    "ddp:bucket-view": ({"gradient_as_bucket_view": True}, 1, None, False),
    "ddp:static-graph": ({"static_graph": True}, 1, None, False),
    "ddp:no-sync-accumulation": ({}, 3, None, False),
    "ddp:bucket-view-no-sync": ({"gradient_as_bucket_view": True}, 2, None, False),
    "ddp:unused-on-one-rank": ({"find_unused_parameters": True}, 1, _side_on_rank0, False),
    "ddp:unused-on-all-ranks": ({"find_unused_parameters": True}, 1, _never, False),
    "ddp:some-steps-only": ({"find_unused_parameters": True}, 1, _side_on_odd_steps, False),
    "ddp:fused-adam": ({"make": _fused_adam}, 1, None, False),
    "ddp:bucket-view-fused-adam": (
        {"make": _fused_adam, "gradient_as_bucket_view": True},
        2,
        None,
        False,
    ),
    "ddp:foreach-adamw": ({"make": _foreach_adamw}, 1, None, True),
}


def _case_ddp(rank: int, out: dict[str, Any]) -> None:
    for rules, (name, (ddp, micro, side, before)) in product(RULES, DDP_CASES.items()):
        name = f"{name}:{rules}"
        _current["rules"] = rules
        try:
            expected = _reference(micro, side, ddp.get("make", _sgd))
            params, counts = _train_ddp(rank, micro=micro, side=side, before=before, **ddp)
            _compare(params, expected)
            # DDP reduced the gradients: only a normalizer built on the wrapper compares
            # the ranks' configurations, once
            assert counts == [0 if before else AGREEMENT] + [0] * (STEPS - 1), counts
            out[name] = {"ok": True}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


def _hsdp(replicas: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    # the replicated pieces count once (weights 1/replicas), also where a layer's
    # rule measures no L2 norm (AGC, element-wise)
    shape = (replicas, WORLD // replicas)
    return {"mesh": init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))}


def _by_columns(param: nn.Parameter) -> Any:
    from torch.distributed.tensor import Shard

    # FSDP2 on dim 1 where it divides evenly (FSDP2 needs that there), else dim 0
    return Shard(1) if param.dim() > 1 and param.shape[1] % WORLD == 0 else Shard(0)


LAYOUTS: dict[str, Callable[[], dict[str, Any]]] = {
    # name: the keywords of every fully_shard call
    "blocks": dict,
    "root-only": dict,
    "hsdp-2x1": lambda: _hsdp(2),
    "hsdp-1x2": lambda: _hsdp(1),
    "dim-1": lambda: {"shard_placement_fn": _by_columns},
}


def _train_fsdp(
    rank: int,
    *,
    micro: int = 1,
    side: Side = None,
    before: bool = False,
    layout: str = "blocks",
    make: Optim = _sgd,
    **shard: Any,
) -> tuple[list[torch.Tensor], list[int]]:
    from torch.distributed.fsdp import fully_shard

    model = Net(side is not None)
    normalizer = gradclip.GradientNormalizer(model, **_rules()) if before else None
    shard.update(LAYOUTS[layout]())
    if layout != "root-only":
        for child in model.children():
            fully_shard(child, **shard)
    fully_shard(model, **shard)
    if normalizer is None:
        normalizer = gradclip.GradientNormalizer(model, **_rules())
    optimizer = make(model.parameters())
    normalizer.attach(optimizer)
    counts: list[int] = []
    for step in range(STEPS):
        optimizer.zero_grad()
        for m in range(micro):
            model.set_requires_gradient_sync(m == micro - 1)
            x, y = _batch(step, m, rank)
            (nn.functional.mse_loss(model(x, _runs(side, step, rank)), y) / micro).backward()
        counts.append(_counted_step(optimizer))
    return list(model.parameters()), counts


def _offload() -> dict[str, Any]:
    from torch.distributed.fsdp import CPUOffloadPolicy

    return {"offload_policy": CPUOffloadPolicy(pin_memory=False)}


FSDP_CASES: dict[str, tuple[Callable[[], dict[str, Any]], int, Side, bool, str]] = {
    # name: (fully_shard keywords, micro-batches, side branch, built before, layout)
    "fsdp:blocks-and-root": (dict, 1, None, False, "blocks"),
    "fsdp:root-only": (dict, 1, None, False, "root-only"),
    "fsdp:built-before": (dict, 1, None, True, "blocks"),
    "fsdp:no-reshard": (lambda: {"reshard_after_forward": False}, 1, None, False, "blocks"),
    "fsdp:cpu-offload": (_offload, 1, None, False, "blocks"),
    "fsdp:no-sync-accumulation": (dict, 3, None, False, "blocks"),
    "fsdp:no-sync-no-reshard": (lambda: {"reshard_after_forward": False}, 2, None, False, "blocks"),
    "fsdp:some-steps-only": (dict, 1, _side_on_odd_steps, False, "blocks"),
    "fsdp:fused-adam": (lambda: {"make": _fused_adam}, 2, None, False, "blocks"),
    "fsdp:foreach-adamw": (lambda: {"make": _foreach_adamw}, 1, None, True, "root-only"),
    "fsdp:hsdp-2x1": (dict, 1, None, False, "hsdp-2x1"),
    "fsdp:hsdp-1x2": (dict, 1, None, False, "hsdp-1x2"),
    "fsdp:hsdp-2x1-accumulation": (dict, 2, None, True, "hsdp-2x1"),
    "fsdp:dim-1": (dict, 1, None, False, "dim-1"),
}


def _case_fsdp(rank: int, out: dict[str, Any]) -> None:
    for rules, (name, (shard, micro, side, before, layout)) in product(RULES, FSDP_CASES.items()):
        name = f"{name}:{rules}"
        _current["rules"] = rules
        try:
            keywords = shard()
            expected = _reference(micro, side, keywords.get("make", _sgd))
            params, counts = _train_fsdp(
                rank, micro=micro, side=side, before=before, layout=layout, **keywords
            )
            _compare(params, expected)
            assert counts == [AGREEMENT + 1] + [1] * (STEPS - 1), counts
            out[name] = {"ok": True, "collectives": 1}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


class NormNet(Net):
    """`Net` with a BatchNorm: its running statistics are buffers DDP broadcasts."""

    def __init__(self) -> None:
        super().__init__(False)
        self.norm = nn.BatchNorm1d(6).double()

    def forward(self, x: torch.Tensor, side: bool = False) -> torch.Tensor:
        return super().forward(self.norm(x))


def _by_hand(
    rank: int,
    make: Callable[[], Net],
    wrap: Callable[[Net], nn.Module],
    data_rank: int | None = None,
) -> None:
    """Each step, gradclip on the wrapped model equals gradclip on the step's full gradients.

    For wrappers whose gradients a single process cannot reproduce (compressed
    communication, low-precision compute, per-rank batch statistics), the plain
    model clipped by hand is given the step's full gradients.
    """
    from torch.distributed.tensor import DTensor

    net, plain = make(), make()
    model = wrap(net)
    by_hand = gradclip.GradientNormalizer(plain, **_rules())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gradclip.GradientNormalizer(model, **_rules()).attach(optimizer)
    for step in range(STEPS):
        optimizer.zero_grad()
        x, y = _batch(step, 0, rank if data_rank is None else data_rank)
        nn.functional.mse_loss(model(x), y).backward()
        with torch.no_grad():
            for p, q in zip(net.parameters(), plain.parameters()):
                q.copy_(p.full_tensor() if isinstance(p, DTensor) else p)  # AGC reads weights
                g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                q.grad = g.detach().clone()
        by_hand.apply()
        optimizer.step()
        _compare([p.grad for p in net.parameters()], [q.grad for q in plain.parameters()])


def _ddp_hook(hook: Any) -> Callable[[Net], nn.Module]:
    def wrap(net: Net) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net)
        model.register_comm_hook(None, hook)
        return model

    return wrap


def _ddp_buffers(net: Net) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, broadcast_buffers=True)


def _fsdp_mixed(net: Net) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for child in net.children():
        fully_shard(child, mp_policy=policy)
    return fully_shard(net, mp_policy=policy)


def _fsdp_blocks_only(net: Net) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(net.body)  # the head stays a plain tensor on every rank (the same batch
    fully_shard(net.mid)  # on every rank keeps its gradients replicas): weighted 1/2
    return net


def _case_by_hand(rank: int, out: dict[str, Any]) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def plain() -> Net:
        return Net(False)

    cases: dict[str, tuple[Callable[[], Net], Callable[[Net], nn.Module]]] = {
        "ddp:fp16-compress-hook": (plain, _ddp_hook(default_hooks.fp16_compress_hook)),
        "ddp:broadcast-buffers": (NormNet, _ddp_buffers),
        "fsdp:mixed-precision": (plain, _fsdp_mixed),
        "fsdp:blocks-only": (plain, _fsdp_blocks_only),
    }
    for rules, (name, (make, wrap)) in product(RULES, cases.items()):
        same_data = name == "fsdp:blocks-only"
        name = f"{name}:{rules}"
        _current["rules"] = rules
        try:
            _by_hand(rank, make, wrap, 0 if same_data else None)
            out[name] = {"ok": True}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


BY_HAND_CASES = [
    "ddp:fp16-compress-hook",
    "ddp:broadcast-buffers",
    "fsdp:mixed-precision",
    "fsdp:blocks-only",
]
CASES: list[Callable[[int, dict[str, Any]], None]] = [_case_ddp, _case_fsdp, _case_by_hand]
CASE_NAMES = [f"{n}:{r}" for r in RULES for n in (*DDP_CASES, *FSDP_CASES, *BY_HAND_CASES)]


# -- in pytest ------------------------------------------------------------------------------------
results, test_every_case_ran, test_case = module_tests(__name__, CASE_NAMES)
