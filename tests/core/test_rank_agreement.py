"""Ranks that disagree about a sharded step are caught inside its one collective.

On two gloo processes (one launch with the other distributed modules, see
`two_ranks`): ranks whose gradients differ in which parameters have one, in how
many there are, in dtype, or a rank with none at all, all raise the same
`RankMismatchError` with every gradient and every state untouched, after
exactly one collective, and the ranks are still in step afterwards; a rank
whose own preparation fails raises its error while the others raise
`RankMismatchError`. Reports are the same on every rank (`across_ranks` for
AGC's per-rank ``changed``), and a normalizer built before ``fully_shard``
follows the swapped parameters, or refuses them for a grouping of tensors.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from two_ranks import AGREEMENT, module_tests

import gradclip
from gradclip.commands.bench_distributed import CollectiveCounter
from gradclip.core.collective import RankMismatchError
from gradclip.core.state import unpack_tensor

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

TIMEOUT_S = 90


# -- in the worker processes ----------------------------------------------------------------------
class _TwoHeads(nn.Module):
    """A body to shard and two plain heads, as in a multi-task model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(20)
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
        self.head_a = nn.Linear(4, 1)
        self.head_b = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, heads: tuple[str, ...]) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        out = h.sum() * 0.0 + h.square().sum()
        for head in heads:
            out = out + getattr(self, head)(h).square().sum()
        return out


def _sharded_two_heads() -> _TwoHeads:
    from torch.distributed.fsdp import fully_shard

    model = _TwoHeads()
    for module in model.body:
        if isinstance(module, nn.Linear):
            fully_shard(module)
    return model


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t  # type: ignore[no-any-return]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n: None if p.grad is None else _local(p.grad).clone() for n, p in model.named_parameters()
    }


def _same(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None]) -> bool:
    return a.keys() == b.keys() and all(
        (a[k] is None and b[k] is None)
        or (a[k] is not None and b[k] is not None and torch.equal(a[k], b[k]))  # type: ignore[arg-type]
        for k in a
    )


def _state(normalizer: gradclip.GradientNormalizer) -> list[Any]:
    flat: list[Any] = []
    for name, slot in sorted(normalizer.state_dict()["rules"].items()):
        flat.append((name, slot["steps"]))
        for row, tensors in sorted(slot["rows"].items()):
            for key, value in sorted(tensors.items()):
                if isinstance(value, dict):  # a growable buffer, packed
                    value = unpack_tensor(value)
                flat.append((name, row, key, value.tolist()))
    return flat


def _expect_mismatch(
    normalizer: gradclip.GradientNormalizer, model: nn.Module
) -> tuple[RankMismatchError, int]:
    """apply() must raise RankMismatchError after one collective, changing nothing."""
    grads, state = _snapshot(model), _state(normalizer)
    counter = CollectiveCounter()
    try:
        with counter:
            normalizer.apply()
    except RankMismatchError as err:
        assert _same(_snapshot(model), grads), "a gradient was modified"
        assert _state(normalizer) == state, "the state was modified"
        return err, len(counter.ops)
    raise AssertionError("ranks that disagree were not detected")


def _rules() -> dict[str, Any]:
    # a stateful rule on the heads: its state must not move on a refused step
    return {"head_a": gradclip.AutoClip(50.0), "head_b": gradclip.AutoClip(50.0)}


def _case_heads(rank: int, out: dict[str, Any]) -> None:
    """Disjoint heads (equal counts), one extra head (unequal counts), no gradients on a rank."""
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(21))
    scenarios: dict[str, Callable[[int], tuple[tuple[str, ...], bool]]] = {
        # name: rank -> (heads used, drop every gradient after backward)
        "agreement:disjoint-heads": lambda r: ((("head_a",), ("head_b",))[r], False),
        "agreement:unequal-counts": lambda r: ((("head_a",), ())[r], False),
        "agreement:rank-without-gradients": lambda r: (("head_a", "head_b"), r == 1),
    }
    expected = {
        "agreement:disjoint-heads": [
            "head_a.bias",
            "head_a.weight",
            "head_b.bias",
            "head_b.weight",
        ],
        "agreement:unequal-counts": ["head_a.bias", "head_a.weight"],
        "agreement:rank-without-gradients": [
            "body.0.bias",
            "body.0.weight",
            "body.2.bias",
            "body.2.weight",
            "head_a.bias",
            "head_a.weight",
            "head_b.bias",
            "head_b.weight",
        ],
    }
    for name, scenario in scenarios.items():
        try:
            model = _sharded_two_heads()
            normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.1, _rules())
            heads, drop = scenario(rank)
            model.zero_grad(set_to_none=True)
            model(x, heads).backward()
            if drop:
                model.zero_grad(set_to_none=True)
            err, n = _expect_mismatch(normalizer, model)
            assert sorted(err.params) == expected[name], err.params
            assert n == AGREEMENT + 1, n
            assert "No gradient or state was modified" in str(err), str(err)
            if name != "agreement:rank-without-gradients":
                assert "a gradient on 1 of 2 ranks" in str(err), str(err)
            # the ranks are still in step: an agreeing step runs normally
            model.zero_grad(set_to_none=True)
            model(x, ("head_a", "head_b")).backward()
            report, n = _counted(normalizer)
            assert n == 1 and sorted(report.layer_names) == ["body.0", "body.2", "head_a", "head_b"]
            out[name] = {"ok": True, "collectives": 1, "same_on_ranks": str(err)}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


def _counted(normalizer: gradclip.GradientNormalizer) -> tuple[gradclip.NormReport, int]:
    counter = CollectiveCounter()
    with counter:
        report = normalizer.apply()
    return report, len(counter.ops)


def _case_no_gradients_anywhere(rank: int, out: dict[str, Any]) -> None:
    """Ranks that agree on having no gradient: an empty report, still one collective."""
    model = _sharded_two_heads()
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.1, _rules())
    counter = CollectiveCounter()
    with counter:
        report = normalizer.apply()
    ops = len(counter.ops)
    assert report.layer_names == [] and ops == AGREEMENT + 1, (report.layer_names, counter.ops)
    # what one step sends: 8 fingerprint floats (one per parameter), the failure
    # count, and the 8 squared norms (zeros here): the same with gradients or without;
    # before it, the configurations' digest (2 integers per setting)
    assert counter.elements == [8, 8 + 1 + 8], counter.elements
    out["agreement:no-gradients-anywhere"] = {"ok": True, "collectives": 1}


def _hand_made(rank: int, dtype_c: torch.dtype, partial_b: bool) -> dict[str, nn.Parameter]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(22)
    a = nn.Parameter(distribute_tensor(torch.randn(4, 3, generator=gen), mesh, [Shard(0)]))
    a.grad = distribute_tensor(torch.randn(4, 3, generator=gen), mesh, [Shard(0)])
    b = nn.Parameter(distribute_tensor(torch.randn(5, generator=gen), mesh, [Shard(0)]))
    full_b = torch.randn(5, generator=gen)
    b.grad = distribute_tensor(full_b, mesh, [Shard(0)])  # a collective: on every rank
    if partial_b:  # then this rank alone holds a Partial one (made without communicating)
        b.grad = DTensor.from_local(full_b, mesh, [Partial()], run_check=False)
    c = nn.Parameter(torch.randn(2, 2, generator=gen).to(dtype_c))
    c.grad = torch.randn(2, 2, generator=gen).to(dtype_c)
    return {"a": a, "b": b, "c": c}


def _case_dtype_and_failure(rank: int, out: dict[str, Any]) -> None:
    """A parameter of another dtype on one rank; a layout refused on one rank only."""
    name = "agreement:dtype-differs"
    try:
        params = _hand_made(rank, (torch.float32, torch.float64)[rank], partial_b=False)
        normalizer = gradclip.GradientNormalizer(
            {"ab": [params["a"], params["b"]], "c": [params["c"]]}, "ClipL2PerLayer", 0.1
        )
        holder = nn.ParameterDict(params)
        err, n = _expect_mismatch(normalizer, holder)
        assert err.params == ["c.0"] and n == AGREEMENT + 1, (err.params, n)
        assert "different dtypes" in str(err), str(err)
        out[name] = {"ok": True, "collectives": n - AGREEMENT, "same_on_ranks": str(err)}
    except Exception:
        out[name] = {"ok": False, "msg": traceback.format_exc()}

    name = "agreement:failure-on-one-rank"
    try:
        params = _hand_made(rank, torch.float32, partial_b=rank == 0)
        holder = nn.ParameterDict(params)
        grads = _snapshot(holder)
        normalizer = gradclip.GradientNormalizer(
            {"ab": [params["a"], params["b"]], "c": [params["c"]]}, "ClipL2PerLayer", 0.1
        )
        counter = CollectiveCounter()
        try:
            with counter:
                normalizer.apply()
        except (ValueError, RankMismatchError) as err:
            if rank == 0:  # its own error: the Partial gradient it holds
                assert isinstance(err, ValueError) and "Partial" in str(err), repr(err)
            else:
                assert isinstance(err, RankMismatchError) and err.failed_ranks == 1, repr(err)
                assert "1 of 2 ranks raised an error" in str(err), str(err)
        else:
            raise AssertionError("the failure on rank 0 went unnoticed")
        assert _same(_snapshot(holder), grads)
        assert len(counter.ops) == AGREEMENT + 1, counter.ops
        out[name] = {"ok": True, "collectives": 1}
    except Exception:
        out[name] = {"ok": False, "msg": traceback.format_exc()}


CASES: list[Callable[[int, dict[str, Any]], None]] = [
    _case_heads,
    _case_no_gradients_anywhere,
    _case_dtype_and_failure,
]
CASE_NAMES = [
    "agreement:disjoint-heads",
    "agreement:unequal-counts",
    "agreement:rank-without-gradients",
    "agreement:no-gradients-anywhere",
    "agreement:dtype-differs",
    "agreement:failure-on-one-rank",
]


# -- in pytest ------------------------------------------------------------------------------------
results, test_every_case_ran, test_case = module_tests(
    __name__, CASE_NAMES, same_on_ranks=True
)  # the same error on every rank
