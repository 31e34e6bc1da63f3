"""Sharded training: FSDP2 (DTensor), HSDP and DDP on 2 gloo processes on the CPU.

Every case runs in one launch of two processes (`two_ranks`, shared with the
other distributed test modules: starting them costs seconds, the cases
milliseconds). Each rank runs every case, records a result per case, and the
tests below read those results: a failing case is reported under its own name,
with the rank's message.

The single-process reference is computed inside each worker on an unsharded
copy of the same model with the same inputs, so both ranks compare against
exactly what ``gradclip`` gives without sharding.
"""

from __future__ import annotations

import copy
import math
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from two_ranks import AGREEMENT, module_tests

import gradclip
from gradclip import GradientNormalization
from gradclip.commands.bench_distributed import CollectiveCounter

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

WORLD = 2
RTOL = 1e-5
ATOL = 1e-7
MODES = [m.value for m in GradientNormalization]
TIMEOUT_S = 120


# -- in the worker processes ----------------------------------------------------------------------
def _mlp(seed: int, widths: tuple[int, ...] = (6, 5, 3, 1)) -> nn.Sequential:
    # (5, 6), (3, 5) and (1, 3) weights: uneven shards on 2 ranks, and rank 1
    # holds an empty shard of the whole last layer.
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(len(widths) - 1):
        mods += [nn.Linear(widths[i], widths[i + 1]), nn.Tanh()]
    return nn.Sequential(*mods[:-1])


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(7, 4)  # 7 rows: 4 and 3 per rank
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t  # type: ignore[no-any-return]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert actual.keys() == expected.keys(), (what, sorted(actual), sorted(expected))
    for name in expected:
        torch.testing.assert_close(
            actual[name],
            expected[name],
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, n=name: f"{what} {n}: {m}",
        )


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().sum().backward()


def _thresholds(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per mode, a threshold that clips some gradients and leaves others.

    L2 modes: the geometric mean of the smallest and largest layer (or tensor)
    norm; value clipping: the median magnitude. Both branches are then tested.
    """
    probe = copy.deepcopy(model)
    _backward(probe, x)
    layers = [m for m in probe.modules() if isinstance(m, nn.Linear)]
    layer_norms = [
        float(torch.cat([p.grad.flatten() for p in m.parameters()]).norm()) for m in layers
    ]
    tensor_norms = [float(p.grad.norm()) for p in probe.parameters()]
    values = torch.cat([p.grad.abs().flatten() for p in probe.parameters()])
    t = {mode: 1.0 for mode in MODES}
    t["ClipL2PerLayer"] = (min(layer_norms) * max(layer_norms)) ** 0.5
    t["ClipL2PerParamType"] = (min(tensor_norms) * max(tensor_norms)) ** 0.5
    t["ClipElementWiseAbsoluteValue"] = float(values.median())
    return t


def _apply_counted(normalizer: gradclip.GradientNormalizer) -> tuple[gradclip.NormReport, int]:
    counter = CollectiveCounter()
    with counter:
        report = normalizer.apply()
    return report, len(counter.ops)


def _layer_norms(report: gradclip.NormReport) -> dict[str, float]:
    return {k: float(v) for k, v in report.layer_norms.items()}


def _case_fsdp_modes(rank: int, out: dict[str, Any]) -> None:
    from torch.distributed.fsdp import fully_shard

    reference = _mlp(0)
    sharded = copy.deepcopy(reference)
    names_before = [n for n, _ in sharded.named_modules()]
    for module in sharded:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(sharded)
    local_rows = [p.to_local().shape[0] for p in sharded.parameters()]
    assert 0 in local_rows if rank == 1 else 0 not in local_rows, local_rows
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)) * 3
    thresholds = _thresholds(reference, x)
    for mode in MODES:
        name = f"fsdp2:{mode}"
        try:
            t = thresholds[mode]
            _backward(reference, x)
            before = _grads(reference)
            expected_report = gradclip.GradientNormalizer(reference, mode, t).apply()
            expected = _grads(reference)
            if mode.startswith("ClipL2"):  # the case exercises both branches
                same = [torch.equal(before[k], expected[k]) for k in before]
                assert any(same) and not all(same), (mode, same)
            normalizer = gradclip.GradientNormalizer(sharded, mode, t)
            assert [n for n, _ in sharded.named_modules()] == names_before
            assert [layer.name for layer in normalizer.layers] == ["0", "2", "4"]
            collectives = []
            for _ in range(2):  # the second step reuses the cached plan
                _backward(sharded, x)
                report, n = _apply_counted(normalizer)
                collectives.append(n)
                _close(_grads(sharded), expected, name)
            needs_norms = mode not in ("None", "ClipElementWiseAbsoluteValue")
            steady = 1 if needs_norms else 0
            assert collectives == [AGREEMENT + steady, steady], collectives
            if needs_norms:
                got, want = _layer_norms(report), _layer_norms(expected_report)
                for layer in want:
                    assert abs(got[layer] - want[layer]) <= RTOL * want[layer], (layer, got, want)
            changed = {k: bool(v) for k, v in report.changed.items()}
            want_changed = {k: bool(v) for k, v in expected_report.changed.items()}
            assert changed == want_changed, (changed, want_changed)
            out[name] = {"ok": True, "collectives": collectives[1]}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


def _case_fsdp_overrides(rank: int, out: dict[str, Any]) -> None:
    """A DL4J-style mixed configuration, the same keys before and after ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard

    reference = _mlp(0)
    sharded = copy.deepcopy(reference)
    fully_shard(sharded)  # root only: one FSDP group for everything
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)) * 3
    thresholds = _thresholds(reference, x)
    l2 = thresholds["ClipL2PerLayer"]
    overrides = {
        "0": ("ClipL2PerParamType", thresholds["ClipL2PerParamType"]),
        "2": ("ClipElementWiseAbsoluteValue", thresholds["ClipElementWiseAbsoluteValue"]),
        "4": "RenormalizeL2PerLayer",
    }
    _backward(reference, x)
    gradclip.GradientNormalizer(reference, "ClipL2PerLayer", l2, overrides).apply()
    expected = _grads(reference)
    _backward(sharded, x)
    normalizer = gradclip.GradientNormalizer(sharded, "ClipL2PerLayer", l2, overrides)
    plain = gradclip.GradientNormalizer(_mlp(0), "ClipL2PerLayer", l2, overrides)
    assert normalizer.describe() == plain.describe()
    _, n = _apply_counted(normalizer)
    _close(_grads(sharded), expected, "overrides")
    assert n == AGREEMENT + 1, n
    out["fsdp2:overrides"] = {"ok": True, "collectives": n - AGREEMENT}


def _case_many_layers(rank: int, out: dict[str, Any]) -> None:
    from torch.distributed.fsdp import fully_shard

    reference = _mlp(4, (8,) * 25 + (1,))
    sharded = copy.deepcopy(reference)
    for module in sharded:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(sharded)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(4))
    for mode in ("ClipL2PerLayer", "RenormalizeL2PerParamType"):
        _backward(reference, x)
        gradclip.GradientNormalizer(reference, mode, 0.05).apply()
        _backward(sharded, x)
        _, n = _apply_counted(gradclip.GradientNormalizer(sharded, mode, 0.05))
        _close(_grads(sharded), _grads(reference), f"many layers {mode}")
        assert n == AGREEMENT + 1, n
    out["fsdp2:25-layers"] = {"ok": True, "collectives": n - AGREEMENT}


def _case_tied(rank: int, out: dict[str, Any]) -> None:
    from torch.distributed.fsdp import fully_shard

    reference = _Tied()
    sharded = copy.deepcopy(reference)
    fully_shard(sharded)
    assert sharded.head.weight is sharded.emb.weight
    idx = torch.tensor([[0, 3, 6, 2], [1, 1, 5, 4]])
    for mode in ("ClipL2PerLayer", "RenormalizeL2PerParamType", "ClipL2PerParamType"):
        _backward(reference, idx)
        gradclip.GradientNormalizer(reference, mode, 0.1).apply()
        _backward(sharded, idx)
        normalizer = gradclip.GradientNormalizer(sharded, mode, 0.1)
        assert [layer.name for layer in normalizer.layers] == ["emb", "mid"]
        _, n = _apply_counted(normalizer)
        _close(_grads(sharded), _grads(reference), f"tied {mode}")
        assert n == AGREEMENT + 1, n
    out["fsdp2:tied"] = {"ok": True, "collectives": n - AGREEMENT}


def _case_hsdp(rank: int, out: dict[str, Any]) -> None:
    """HSDP: (Replicate, Shard(0)) gradients; the replicas must not be counted twice."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate

    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    reference = _mlp(5)
    sharded = copy.deepcopy(reference)
    fully_shard(sharded, mesh=mesh)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(5)) * 3
    _backward(sharded, x)
    placements = {tuple(p.grad.placements) for p in sharded.parameters()}
    assert all(pl[0] == Replicate() for pl in placements), placements
    for mode in ("ClipL2PerLayer", "RenormalizeL2PerLayer", "ClipL2PerParamType"):
        _backward(reference, x)
        expected_report = gradclip.GradientNormalizer(reference, mode, 0.5).apply()
        _backward(sharded, x)
        report, n = _apply_counted(gradclip.GradientNormalizer(sharded, mode, 0.5))
        _close(_grads(sharded), _grads(reference), f"hsdp {mode}")
        got, want = _layer_norms(report), _layer_norms(expected_report)
        assert all(abs(got[k] - want[k]) <= RTOL * want[k] for k in want), (got, want)
        assert n == AGREEMENT + 1, n
    out["hsdp:replicate-counted-once"] = {"ok": True, "collectives": n - AGREEMENT}


def _case_mixed_placements(rank: int, out: dict[str, Any]) -> None:
    """Hand-made DTensors: Shard(0), Shard(1), Replicate and a plain tensor in one layer.

    Also AGC (rows of the Shard(1) weight and the sharded 1-D tensor are split
    units, reduced; the rest is local) and the global p-norm for p = 3 and inf.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(6)
    shapes = {"a": (5, 3), "b": (3, 5), "c": (4,), "d": (2, 2), "e": (5,)}
    placements = {"a": Shard(0), "b": Shard(1), "c": Replicate(), "d": None, "e": Shard(0)}
    full_grads = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    full_params = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    modes: list[str | gradclip.Rule] = [
        "ClipL2PerLayer",
        "RenormalizeL2PerLayer",
        "RenormalizeL2PerParamType",
        gradclip.AdaptiveGradClip(0.7),
        gradclip.ClipGlobalNorm(0.5, 3.0),
        gradclip.ClipGlobalNorm(0.5, math.inf),
    ]
    for mode in modes:
        plain = {k: nn.Parameter(v.clone()) for k, v in full_params.items()}
        for k, p in plain.items():
            p.grad = full_grads[k].clone()
        gradclip.GradientNormalizer(
            {"one": [plain["a"], plain["b"]], "two": [plain["c"], plain["d"], plain["e"]]},
            mode,
            0.5,
        ).apply()
        dist_params: dict[str, torch.Tensor] = {}
        for k in shapes:
            pl = placements[k]
            if pl is None:
                dist_params[k] = nn.Parameter(full_params[k].clone())
                dist_params[k].grad = full_grads[k].clone()
            else:
                dist_params[k] = nn.Parameter(distribute_tensor(full_params[k], mesh, [pl]))
                dist_params[k].grad = distribute_tensor(full_grads[k].clone(), mesh, [pl])
        grouping = {
            "one": [dist_params["a"], dist_params["b"]],
            "two": [dist_params["c"], dist_params["d"], dist_params["e"]],
        }
        _, n = _apply_counted(gradclip.GradientNormalizer(grouping, mode, 0.5))
        got = {k: _full(p.grad) for k, p in dist_params.items()}
        _close(got, {k: p.grad for k, p in plain.items()}, f"mixed {mode}")
        assert n == AGREEMENT + 1, n
    out["dtensor:mixed-placements"] = {"ok": True, "collectives": n - AGREEMENT}


def _case_partial_refused(rank: int, out: dict[str, Any]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    ok = nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)]))
    ok.grad = distribute_tensor(torch.full((4, 2), 3.0), mesh, [Shard(0)])
    bad = nn.Parameter(distribute_tensor(torch.zeros(3), mesh, [Shard(0)]))
    bad.grad = DTensor.from_local(torch.full((3,), 5.0), mesh, [Partial()])
    before = [ok.grad.to_local().clone(), bad.grad.to_local().clone()]
    try:
        gradclip.normalize_([[ok], [bad]], "ClipL2PerLayer", 0.1)
    except ValueError as err:
        assert "Partial" in str(err) and "'1.0'" in str(err), str(err)
    else:
        raise AssertionError("a Partial gradient was normalized")
    assert torch.equal(ok.grad.to_local(), before[0]) and torch.equal(
        bad.grad.to_local(), before[1]
    )
    out["dtensor:partial-refused-untouched"] = {"ok": True}

    # AGC on a weight split on dim 0 and dim 1 (FSDP's Shard(0) with tensor
    # parallelism's Shard(1)): the ranks hold different rows (3 and 2 of 5), each
    # row's norms are summed at its global place; the same as on one process.
    mesh2 = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("dp", "tp"))
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([[0.01], [1.0], [0.02], [3.0], [0.5]])
    w_full, g_full = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen) * scales
    b_full, gb_full = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    w = nn.Parameter(distribute_tensor(w_full, mesh2, [Shard(0), Shard(1)]))
    w.grad = distribute_tensor(g_full, mesh2, [Shard(0), Shard(1)])
    bias = nn.Parameter(distribute_tensor(b_full, mesh2, [Shard(0), Shard(0)]))
    bias.grad = distribute_tensor(gb_full, mesh2, [Shard(0), Shard(0)])
    ref_w, ref_b = nn.Parameter(w_full.clone()), nn.Parameter(b_full.clone())
    ref_w.grad, ref_b.grad = g_full.clone(), gb_full.clone()
    agc = gradclip.AdaptiveGradClip(0.1)
    gradclip.normalize_([[bias], [w]], agc)
    gradclip.normalize_([[ref_b], [ref_w]], agc)
    kept = (ref_w.grad == g_full).all(dim=1)
    assert 0 < int(kept.sum()) < 5, kept  # the reference clips some rows, keeps others
    assert torch.allclose(w.grad.full_tensor(), ref_w.grad, rtol=1e-6, atol=0)
    assert torch.allclose(bias.grad.full_tensor(), ref_b.grad, rtol=1e-6, atol=0)
    out["dtensor:agc-split-rows-match-one-process"] = {"ok": True}

    # chain() whose rules read norms would measure each rank's shard alone: refused
    # before the step's collective, so nothing changes and the ranks stay in step.
    g = nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)]))
    g.grad = distribute_tensor(torch.full((4, 2), 3.0), mesh, [Shard(0)])
    chained = gradclip.chain(("ClipElementWiseAbsoluteValue", 2.0), gradclip.ClipGlobalNorm(1.0))
    try:
        gradclip.normalize_([[g]], chained)
    except NotImplementedError as err:
        assert "chain()" in str(err), str(err)
    else:
        raise AssertionError("chain() ran on sharded gradients")
    assert torch.equal(g.grad.to_local(), torch.full_like(g.grad.to_local(), 3.0))
    clamps = gradclip.chain(
        ("ClipElementWiseAbsoluteValue", 2.0), ("ClipElementWiseAbsoluteValue", 1.0)
    )
    gradclip.normalize_([[g]], clamps)  # element-wise only: no norms, allowed
    assert torch.equal(g.grad.to_local(), torch.full_like(g.grad.to_local(), 1.0))
    out["dtensor:chain-refused-untouched"] = {"ok": True}


def _case_ddp(rank: int, out: dict[str, Any]) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    reference = _mlp(7)
    ddp = DistributedDataParallel(copy.deepcopy(reference))
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(4, 6, generator=gen) * 3 for _ in range(WORLD)]
    for mode in MODES:
        t = 0.02 if mode == "ClipElementWiseAbsoluteValue" else 0.5
        reference.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: the mean of the per-rank losses.
        (sum(reference(x).square().sum() for x in xs) / WORLD).backward()
        gradclip.GradientNormalizer(reference, mode, t).apply()
        _backward(ddp, xs[rank])
        normalizer = gradclip.GradientNormalizer(ddp, mode, t)
        assert [layer.name for layer in normalizer.layers] == ["0", "2", "4"]
        _, n = _apply_counted(normalizer)
        # DDP gradients are plain tensors, already averaged: only the configurations
        # are compared, at the first step
        assert n == AGREEMENT, n
        _backward(ddp, xs[rank])
        _, steady = _apply_counted(normalizer)
        assert steady == 0, steady
        got = _grads(ddp.module)
        _close(got, _grads(reference), f"ddp {mode}")
        flat = torch.cat([g.flatten() for g in got.values()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks disagree"
    out["ddp:all-modes-identical-on-ranks"] = {"ok": True, "collectives": steady}


def _case_strategies(rank: int, out: dict[str, Any]) -> None:
    """Strategies beyond DL4J read the reduced norms, so they are exact under sharding too.

    Global-norm and adaptive rules (stateful: several steps, varying inputs) use
    the per-tensor norms the engine already reduced; AGC's unit-wise norms of
    Shard(0) weights of 2 or more dimensions are rows, complete on each rank.
    """
    from torch.distributed.fsdp import fully_shard

    cases: dict[str, tuple[Callable[[], gradclip.Rule], bool, int]] = {
        "fsdp2:ClipGlobalNorm": (lambda: gradclip.ClipGlobalNorm(0.5), True, 1),
        "fsdp2:AutoClip": (lambda: gradclip.AutoClip(percentile=50, scope="layer"), True, 1),
        "fsdp2:ZClip": (lambda: gradclip.ZClip(warmup_steps=2, z_thresh=0.5), True, 1),
        "fsdp2:AdaptiveGradClip-2d-weights": (
            lambda: gradclip.AdaptiveGradClip(clipping=0.05),
            False,
            0,
        ),
    }
    for name, (make, with_bias, want) in cases.items():
        try:
            reference = _mlp(9)
            if not with_bias:
                torch.manual_seed(9)
                reference = nn.Sequential(
                    nn.Linear(6, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False)
                )
            sharded = copy.deepcopy(reference)
            fully_shard(sharded)
            ref_norm = gradclip.GradientNormalizer(reference, make())
            sharded_norm = gradclip.GradientNormalizer(sharded, make())
            gen = torch.Generator().manual_seed(9)
            counts = []
            for step in range(4):
                x = torch.randn(4, 6, generator=gen) * (1 + 2 * step)
                _backward(reference, x)
                ref_norm.apply()
                _backward(sharded, x)
                _, n = _apply_counted(sharded_norm)
                counts.append(n)
                _close(_grads(sharded), _grads(reference), f"{name} step {step}")
            assert counts == [AGREEMENT + want] + [want] * 3, counts
            out[name] = {"ok": True, "collectives": want}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


def _case_counter_can_count(rank: int, out: dict[str, Any]) -> None:
    """The counter sees torch's own collectives (else the counts above would prove nothing)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = _mlp(8)
    fully_shard(model)
    _backward(model, torch.randn(2, 6))
    counter = CollectiveCounter()
    with counter:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        dist.all_reduce(torch.ones(3))
    assert len(counter.ops) >= 2 and counter.elements[-1] == 3, (counter.ops, counter.elements)
    out["counter-sees-collectives"] = {"ok": True, "collectives": len(counter.ops)}


def _global_p_norm(model: nn.Module, p: float) -> float:
    norms = [torch.linalg.vector_norm(q.grad, p) for q in model.parameters()]
    return float(torch.linalg.vector_norm(torch.stack(norms), p))


def _case_global_norm_p(rank: int, out: dict[str, Any]) -> None:
    """ClipGlobalNorm with p != 2: Σ|g|^p (or max|g|) per tensor rides in the one collective.

    FSDP2 with uneven and empty shards (a per-rank norm would give each rank its
    own coefficient) and HSDP (a sum without the 1/replicas weight would count
    each replica twice); two steps, both clipping.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    hsdp = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    for p in (1.0, 3.0, math.inf):
        for layout in ("fsdp2", "hsdp"):
            name = f"{layout}:ClipGlobalNorm-p{p:g}"
            try:
                reference = _mlp(10)
                sharded = copy.deepcopy(reference)
                if layout == "fsdp2":
                    for module in sharded:
                        if isinstance(module, nn.Linear):
                            fully_shard(module)
                    fully_shard(sharded)
                else:
                    fully_shard(sharded, mesh=hsdp)
                gen = torch.Generator().manual_seed(10)
                xs = [torch.randn(4, 6, generator=gen) * (1 + 2 * step) for step in range(2)]
                _backward(reference, xs[0])
                max_norm = 0.5 * _global_p_norm(reference, p)
                ref_norm = gradclip.GradientNormalizer(
                    reference, gradclip.ClipGlobalNorm(max_norm, p)
                )
                sharded_norm = gradclip.GradientNormalizer(
                    sharded, gradclip.ClipGlobalNorm(max_norm, p)
                )
                counts = []
                for x in xs:
                    _backward(reference, x)
                    assert _global_p_norm(reference, p) > max_norm  # the clip applies
                    want = ref_norm.apply().to_dict()["stats"]["global_norm"]
                    _backward(sharded, x)
                    report, n = _apply_counted(sharded_norm)
                    counts.append(n)
                    _close(_grads(sharded), _grads(reference), name)
                    got = report.to_dict()["stats"]["global_norm"]
                    assert abs(got - want) <= RTOL * want, (got, want)
                assert counts == [AGREEMENT + 1, 1], counts
                out[name] = {"ok": True, "collectives": counts[1]}
            except Exception:
                out[name] = {"ok": False, "msg": traceback.format_exc()}


def _normed_mlp(seed: int) -> nn.Sequential:
    # 1-D parameters sharded unevenly: LayerNorm(5) (3 + 2), biases of 5 and 3,
    # and the (1,) bias of the last layer, empty on rank 1 and zero (so AGC's
    # bound is eps·λ, which a wrong sum over ranks cannot cancel out).
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.1, 0.1)
        model[5].bias.zero_()
    return model


def _case_agc_whole_tensor_units(rank: int, out: dict[str, Any]) -> None:
    """AGC on biases and LayerNorm parameters: their unit is the whole, sharded tensor.

    FSDP2 (uneven and empty shards) and HSDP; four steps; the reference clips
    some 1-D units and leaves others, so a per-rank norm could not pass.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    hsdp = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    for layout in ("fsdp2", "hsdp"):
        name = f"{layout}:AdaptiveGradClip-biases-layernorm"
        try:
            reference = _normed_mlp(11)
            sharded = copy.deepcopy(reference)
            if layout == "fsdp2":
                for module in sharded:
                    if isinstance(module, nn.Linear | nn.LayerNorm):
                        fully_shard(module)
                fully_shard(sharded)
            else:
                fully_shard(sharded, mesh=hsdp)
            ref_norm = gradclip.GradientNormalizer(reference, gradclip.AdaptiveGradClip(0.05))
            sharded_norm = gradclip.GradientNormalizer(sharded, gradclip.AdaptiveGradClip(0.05))
            gen = torch.Generator().manual_seed(11)
            counts, clipped_1d, kept_1d = [], 0, 0
            for step in range(4):
                x = torch.randn(4, 6, generator=gen) * (0.2 + step)
                _backward(reference, x)
                before = _grads(reference)
                ref_norm.apply()
                after = _grads(reference)
                for k in before:
                    if before[k].dim() == 1:
                        same = torch.equal(before[k], after[k])
                        kept_1d += same
                        clipped_1d += not same
                _backward(sharded, x)
                _, n = _apply_counted(sharded_norm)
                counts.append(n)
                _close(_grads(sharded), after, f"{name} step {step}")
            assert clipped_1d and kept_1d, (clipped_1d, kept_1d)
            assert counts == [AGREEMENT + 1] + [1] * 3, counts
            out[name] = {"ok": True, "collectives": counts[1]}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


def _case_cross_rank_nonfinite_zero(rank: int, out: dict[str, Any]) -> None:
    """nonfinite="zero": a NaN on rank 0 only; the quantities reduced before the zeroing
    must not leak it (AGC, ClipGlobalNorm p=3 and p=inf)."""
    from torch.distributed.fsdp import fully_shard

    strategies: dict[str, Callable[[], gradclip.Rule]] = {
        "AdaptiveGradClip": lambda: gradclip.AdaptiveGradClip(0.05),
        "ClipGlobalNorm-p3": lambda: gradclip.ClipGlobalNorm(0.1, 3.0),
        "ClipGlobalNorm-pinf": lambda: gradclip.ClipGlobalNorm(0.01, math.inf),
    }
    for key, make in strategies.items():
        name = f"fsdp2:nonfinite-zero:{key}"
        try:
            reference = _normed_mlp(12)
            sharded = copy.deepcopy(reference)
            for module in sharded:
                if isinstance(module, nn.Linear | nn.LayerNorm):
                    fully_shard(module)
            fully_shard(sharded)
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(12))
            _backward(reference, x)
            reference[1].weight.grad[0] = math.nan  # rank 0 holds rows 0-2 of the (5,) gain
            gradclip.GradientNormalizer(reference, make(), nonfinite="zero").apply()
            _backward(sharded, x)
            if rank == 0:
                sharded[1].weight.grad.to_local()[0] = math.nan
            normalizer = gradclip.GradientNormalizer(sharded, make(), nonfinite="zero")
            report, n = _apply_counted(normalizer)
            assert report.nonfinite_layers() == ["1"], report.nonfinite_layers()
            expected = _grads(reference)
            assert torch.equal(expected["1.weight"], torch.zeros(5))
            _close(_grads(sharded), expected, name)
            assert n == AGREEMENT + 1, n
            out[name] = {"ok": True, "collectives": n - AGREEMENT}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


CASES: list[Callable[[int, dict[str, Any]], None]] = [
    _case_fsdp_modes,
    _case_fsdp_overrides,
    _case_many_layers,
    _case_tied,
    _case_hsdp,
    _case_mixed_placements,
    _case_partial_refused,
    _case_ddp,
    _case_strategies,
    _case_global_norm_p,
    _case_agc_whole_tensor_units,
    _case_cross_rank_nonfinite_zero,
    _case_counter_can_count,
]
CASE_NAMES = [f"fsdp2:{m}" for m in MODES] + [
    "fsdp2:overrides",
    "fsdp2:25-layers",
    "fsdp2:tied",
    "hsdp:replicate-counted-once",
    "dtensor:mixed-placements",
    "dtensor:partial-refused-untouched",
    "dtensor:agc-split-rows-match-one-process",
    "dtensor:chain-refused-untouched",
    "ddp:all-modes-identical-on-ranks",
    "fsdp2:ClipGlobalNorm",
    "fsdp2:AutoClip",
    "fsdp2:ZClip",
    "fsdp2:AdaptiveGradClip-2d-weights",
    *[f"{m}:ClipGlobalNorm-p{p}" for p in ("1", "3", "inf") for m in ("fsdp2", "hsdp")],
    "fsdp2:AdaptiveGradClip-biases-layernorm",
    "hsdp:AdaptiveGradClip-biases-layernorm",
    "fsdp2:nonfinite-zero:AdaptiveGradClip",
    "fsdp2:nonfinite-zero:ClipGlobalNorm-p3",
    "fsdp2:nonfinite-zero:ClipGlobalNorm-pinf",
    "counter-sees-collectives",
]


# -- in pytest ------------------------------------------------------------------------------------
results, test_every_case_ran, test_case = module_tests(__name__, CASE_NAMES)
