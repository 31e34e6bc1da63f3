"""Sharded models: reports the same on every rank, and normalizers built before ``fully_shard``.

On two gloo processes (one launch with the other distributed modules, see
`two_ranks`). AGC decides per row on the rows each rank holds, so its
``changed`` flag is per rank; `NormReport.across_ranks` makes the whole report
the same on every rank, equal to the single-process one. A normalizer built
on a module before ``fully_shard`` (of the whole model, or of some blocks
only), even one already used, follows the swapped parameters and stays exact;
one built on tensors refuses the replaced ones instead of skipping them.
"""

from __future__ import annotations

import copy
import json
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
RTOL = 1e-5


# -- in the worker processes ----------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t  # type: ignore[no-any-return]


def _counted(call: Callable[[], gradclip.NormReport]) -> tuple[gradclip.NormReport, int]:
    counter = CollectiveCounter()
    with counter:
        report = call()
    return report, len(counter.ops)


def _set_grads(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        g = full[name].clone()
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        else:
            p.grad = g


def _rows_model() -> nn.Sequential:
    torch.manual_seed(30)
    return nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 2))


def _rows_grads() -> dict[str, torch.Tensor]:
    # rows 0-1 of the first weight (held by rank 0) far above AGC's bound, rows 2-3
    # (rank 1) far below: only rank 0 clips that layer
    w = torch.full((4, 3), 1e-5)
    w[:2] = 1.0
    gen = torch.Generator().manual_seed(31)
    return {"0.weight": w, "2.weight": torch.randn(2, 4, generator=gen), "2.bias": torch.ones(2)}


def _case_reports(rank: int, out: dict[str, Any]) -> None:
    from torch.distributed.fsdp import fully_shard

    configs: dict[str, tuple[Any, dict[str, Any], dict[str, bool], int]] = {
        # name: (default rule, overrides, expected changed, collectives of the step)
        "reports:agc-with-l2": (
            "ClipL2PerLayer",
            {"0": gradclip.AdaptiveGradClip(0.05)},
            {"0": True, "2": True},
            1,
        ),
        "reports:agc-only-no-step-collective": (
            gradclip.AdaptiveGradClip(0.05),
            {"2": None},
            {"0": True, "2": False},
            0,
        ),
    }
    for name, (default, overrides, want, step_collectives) in configs.items():
        try:
            reference = _rows_model()
            sharded = copy.deepcopy(reference)
            for module in sharded:
                if isinstance(module, nn.Linear):
                    fully_shard(module)
            fully_shard(sharded)
            _set_grads(reference, _rows_grads())
            expected = gradclip.GradientNormalizer(reference, default, 0.5, overrides).apply()
            _set_grads(sharded, _rows_grads())
            normalizer = gradclip.GradientNormalizer(sharded, default, 0.5, overrides)
            report, n = _counted(normalizer.apply)
            assert n == AGREEMENT + step_collectives, n
            local = {k: bool(v) for k, v in report.changed.items()}
            assert local["0"] is (rank == 0), local  # this rank's rows only
            combined, n = _counted(report.across_ranks)
            assert n == 1, n
            got, ref = combined.to_dict(), expected.to_dict()
            assert got["changed"] == ref["changed"] == want, (got["changed"], ref["changed"])
            for layer, value in ref["layer_norms"].items():
                if value is not None:
                    assert abs(got["layer_norms"][layer] - value) <= RTOL * value
            out[name] = {"ok": True, "collectives": n, "same_on_ranks": json.dumps(got)}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}

    name = "reports:no-in-place-rule-no-collective"
    try:
        model = _rows_model()
        fully_shard(model)
        _set_grads(model, _rows_grads())
        report = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.5).apply()
        combined, n = _counted(report.across_ranks)
        assert combined is report and n == 0, n
        out[name] = {"ok": True, "collectives": n, "same_on_ranks": json.dumps(report.to_dict())}
    except Exception:
        out[name] = {"ok": False, "msg": traceback.format_exc()}


def _mlp() -> nn.Sequential:
    torch.manual_seed(32)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def _shard_whole(model: nn.Sequential) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    fully_shard(model)


def _shard_blocks(model: nn.Sequential) -> None:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])  # the first two blocks only: the last layer and the root stay plain
    fully_shard(model[2])


def _case_built_before_fully_shard(rank: int, out: dict[str, Any]) -> None:
    ways: dict[str, tuple[Callable[[nn.Sequential], None], bool]] = {
        "structure:built-before-whole": (_shard_whole, False),
        "structure:built-before-partial": (_shard_blocks, False),
        "structure:used-before-partial": (_shard_blocks, True),
    }
    gen = torch.Generator().manual_seed(33)
    xs = [torch.randn(4, 6, generator=gen) * (1 + 3 * step) for step in range(4)]

    def rule() -> gradclip.Rule:
        return gradclip.ZClip(warmup_steps=2, z_thresh=0.5, scope="layer")

    for name, (shard, used_before) in ways.items():
        try:
            reference, model = _mlp(), _mlp()
            ref_norm = gradclip.GradientNormalizer(
                reference, rule(), overrides={"4": "ClipL2PerLayer"}
            )
            normalizer = gradclip.GradientNormalizer(
                model, rule(), overrides={"4": "ClipL2PerLayer"}
            )
            steps = xs
            if used_before:
                for m, n in ((reference, ref_norm), (model, normalizer)):
                    m(xs[0]).square().sum().backward()
                    n.apply()
                    m.zero_grad(set_to_none=True)
                steps = xs[1:]
            shard(model)
            counts = []
            for x in steps:
                reference.zero_grad(set_to_none=True)
                reference(x).square().sum().backward()
                ref_norm.apply()
                model.zero_grad(set_to_none=True)
                model(x).square().sum().backward()
                report, n = _counted(normalizer.apply)
                counts.append(n)
                assert sorted(report.layer_names) == ["0", "2", "4"], report.layer_names
                for (k, p), q in zip(model.named_parameters(), reference.parameters()):
                    torch.testing.assert_close(_full(p.grad), q.grad, rtol=RTOL, atol=1e-7, msg=k)
            # the normalizer's engine is rebuilt for the swapped parameters: its
            # first step compares the ranks' configurations
            assert counts == [AGREEMENT + 1] + [1] * (len(steps) - 1), counts
            out[name] = {"ok": True, "collectives": 1}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}

    name = "structure:grouping-refused"
    try:
        model = _mlp()
        grouping = {"first": list(model[0].parameters()), "rest": list(model[4].parameters())}
        normalizer = gradclip.GradientNormalizer(grouping, "ClipL2PerLayer", 0.01)
        _shard_blocks(model)
        model(xs[0]).square().sum().backward()
        before = [_full(p.grad).clone() for p in model.parameters()]
        try:
            normalizer.apply()
        except RuntimeError as err:
            assert "fully_shard" in str(err) and "'first.0', 'first.1'" in str(err), str(err)
        else:
            raise AssertionError("the replaced parameters were silently skipped")
        after = [_full(p.grad) for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before, after))
        out[name] = {"ok": True}
    except Exception:
        out[name] = {"ok": False, "msg": traceback.format_exc()}


CASES: list[Callable[[int, dict[str, Any]], None]] = [
    _case_reports,
    _case_built_before_fully_shard,
]
CASE_NAMES = [
    "reports:agc-with-l2",
    "reports:agc-only-no-step-collective",
    "reports:no-in-place-rule-no-collective",
    "structure:built-before-whole",
    "structure:built-before-partial",
    "structure:used-before-partial",
    "structure:grouping-refused",
]


# -- in pytest ------------------------------------------------------------------------------------
results, test_every_case_ran, test_case = module_tests(
    __name__, CASE_NAMES, same_on_ranks=True
)  # the same report on every rank
