"""Checkpointing at scale: the normalizer in ``torch.distributed.checkpoint`` (DCP).

DCP loads a checkpoint into the state dict of fresh objects: tensors in place
(their shapes must match), other values replaced. A normalizer's state dict
has its full structure from construction, and AutoClip's growing history is
stored as bytes, so a fresh normalizer is a valid template at any step count.
Tested in one process (DCP without a process group) and on two gloo
processes with an FSDP2 model and its optimizer (one launch with the other
distributed modules, see `two_ranks`): save, restart with a fresh process
group and fresh objects, load, continue, bit for bit as the uninterrupted run.
"""

from __future__ import annotations

import copy
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.state import pack_tensor, unpack_tensor

dcp = pytest.importorskip("torch.distributed.checkpoint")

TIMEOUT_S = 90
STEPS, SPLIT = 70, 67  # AutoClip's whole history outgrows a fresh one's (64) before the split


def _rules(sharded: bool = False) -> tuple[gradclip.Rule, dict[str, Any]]:
    default = gradclip.AutoClip(40.0, history_size=None, scope="layer")  # a growing buffer
    overrides: dict[str, Any] = {
        "0": gradclip.ZClip(warmup_steps=3, z_thresh=1.0, scope="layer"),
        "1": gradclip.chain(
            gradclip.AdaptiveGradClip(0.05), gradclip.AutoClip(30.0, history_size=None)
        ),
        "5": gradclip.AutoClip(30.0, history_size=8),
    }
    if sharded:  # a chain whose later rule reads norms is refused on sharded gradients
        overrides["1"] = gradclip.AdaptiveGradClip(0.05)
    return default, overrides


def _model() -> nn.Sequential:
    torch.manual_seed(40)
    return nn.Sequential(
        nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    # this rank's piece: equal pieces on every rank are equal full tensors, with no collective
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t  # type: ignore[no-any-return]


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    normalizer: gradclip.GradientNormalizer,
    steps: range,
    rank: int = 0,
) -> Iterator[list[torch.Tensor]]:
    """Train on ``steps``; yield the normalized gradients (this rank's pieces) of each step."""
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * rank + step)
        spike = 25.0 if step % 9 == 8 else 1.0
        x = torch.randn(4, 6, generator=gen) * spike
        optimizer.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        normalizer.apply()
        yield [_local(p.grad).clone() for p in model.parameters()]
        optimizer.step()


def _history_capacity(state: dict[str, Any]) -> int:
    slot = state["rules"]["AutoClip(history_size=None, scope='layer')"]
    return int(slot["rows"]["3"]["history"]["shape"][0])


# -- one process ----------------------------------------------------------------------------------
def _build() -> tuple[nn.Module, torch.optim.Optimizer, gradclip.GradientNormalizer]:
    model = _model()
    default, overrides = _rules()
    return (
        model,
        torch.optim.Adam(model.parameters(), lr=0.01),
        gradclip.GradientNormalizer(model, default, overrides=overrides),
    )


@pytest.fixture(scope="module")
def uninterrupted() -> list[list[torch.Tensor]]:
    model, optimizer, normalizer = _build()
    return list(_train(model, optimizer, normalizer, range(STEPS)))


@pytest.mark.parametrize("form", ["stateful", "entry"])
def test_dcp_resume_in_one_process_is_bit_identical(
    tmp_path: Path, uninterrupted: list[list[torch.Tensor]], form: str
) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer, normalizer = _build()
    first = list(_train(model, optimizer, normalizer, range(SPLIT)))
    assert _history_capacity(normalizer.state_dict()) == 128  # grown past a fresh one's 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        model_sd, optim_sd = get_state_dict(model, optimizer)
        clip: Any = normalizer if form == "stateful" else normalizer.state_dict()
        dcp.save({"model": model_sd, "optim": optim_sd, "clip": clip}, checkpoint_id=tmp_path)
        model, optimizer, normalizer = _build()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        clip = normalizer if form == "stateful" else normalizer.state_dict()
        state = {"model": model_sd, "optim": optim_sd, "clip": clip}
        dcp.load(state, checkpoint_id=tmp_path)
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    if form == "entry":
        normalizer.load_state_dict(state["clip"])
    normalizer.state_dict()  # at any moment: right after loading, before any step
    resumed = first + list(_train(model, optimizer, normalizer, range(SPLIT, STEPS)))
    for step, (a, b) in enumerate(zip(resumed, uninterrupted)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {step} differs"


def _states_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_states_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return bool(a == b)


RULES: dict[str, Callable[[], gradclip.Rule]] = {
    "AutoClip-whole-history": lambda: gradclip.AutoClip(30.0, history_size=None, scope="layer"),
    "AutoClip-ring": lambda: gradclip.AutoClip(30.0, history_size=4),
    "ZClip": lambda: gradclip.ZClip(warmup_steps=2, scope="layer"),
    "chain": lambda: gradclip.chain(gradclip.AdaptiveGradClip(0.05), gradclip.AutoClip()),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_state_dict_at_any_moment(rule: str) -> None:
    model = _model()
    trained = gradclip.GradientNormalizer(model, RULES[rule]())
    fresh = gradclip.GradientNormalizer(_model(), RULES[rule]()).state_dict()  # construction
    for step in range(70):
        model.zero_grad()
        (
            model(torch.randn(2, 6, generator=torch.Generator().manual_seed(step))) * step
        ).sum().backward()
        trained.apply()
    saved = trained.state_dict()  # after steps
    assert fresh.keys() == saved.keys() and fresh["rules"].keys() == saved["rules"].keys()
    restored = gradclip.GradientNormalizer(_model(), RULES[rule]())
    restored.load_state_dict(saved)
    assert _states_equal(restored.state_dict(), saved)  # right after loading
    restored.load_state_dict(copy.deepcopy(fresh))  # and back to a fresh state
    assert _states_equal(restored.state_dict(), fresh)


def test_a_growable_buffer_given_as_a_tensor_loads_too() -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, RULES["AutoClip-whole-history"]())
    for step in range(3):
        model.zero_grad()
        model(torch.randn(2, 6, generator=torch.Generator().manual_seed(step))).sum().backward()
        normalizer.apply()
    state = normalizer.state_dict()
    old = copy.deepcopy(state)
    for slot in old["rules"].values():
        for row in slot["rows"].values():
            row["history"] = unpack_tensor(row["history"])  # e.g. edited by hand
    other = gradclip.GradientNormalizer(_model(), RULES["AutoClip-whole-history"]())
    other.load_state_dict(old)
    assert _states_equal(other.state_dict(), state)


@pytest.mark.parametrize("damage", ["short data", "unknown dtype", "negative shape"])
def test_a_damaged_packed_history_is_refused_and_changes_nothing(damage: str) -> None:
    normalizer = gradclip.GradientNormalizer(_model(), RULES["AutoClip-whole-history"]())
    state = normalizer.state_dict()
    bad = copy.deepcopy(state)
    packed = next(iter(bad["rules"].values()))["rows"]["0"]["history"]
    if damage == "short data":
        packed["data"] = packed["data"][:-8]
    elif damage == "unknown dtype":
        packed["dtype"] = "float1024"
    else:
        packed["shape"] = [-64]
    with pytest.raises(ValueError, match="packed tensor"):
        normalizer.load_state_dict(bad)
    assert _states_equal(normalizer.state_dict(), state)


def test_pack_round_trip_is_exact() -> None:
    values = torch.tensor(
        [[1.0, -0.0, float("inf")], [float("nan"), 1e-300, -2.5]], dtype=torch.float64
    )
    back = unpack_tensor(pack_tensor(values))
    assert back.dtype == values.dtype and back.shape == values.shape
    assert torch.equal(back.view(torch.int64), values.view(torch.int64))  # bit for bit
    assert unpack_tensor(pack_tensor(torch.zeros(0, 3))).shape == (0, 3)


# -- two processes: FSDP2 model, optimizer and normalizer through DCP --------------------------
def _build_sharded() -> tuple[nn.Module, torch.optim.Optimizer, gradclip.GradientNormalizer]:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model)  # one FSDP group: few collectives per step, uneven and empty shards
    default, overrides = _rules(sharded=True)
    normalizer = gradclip.GradientNormalizer(model, default, overrides=overrides)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), normalizer


def _shared_dir() -> str:
    import torch.distributed as dist

    box = [tempfile.mkdtemp() if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _case_fsdp2_dcp(rank: int, out: dict[str, Any]) -> None:
    """One checkpoint holds the normalizer both ways: as a DCP ``Stateful`` and as a state dict."""
    import two_ranks
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optimizer, normalizer = _build_sharded()
    uninterrupted = list(_train(model, optimizer, normalizer, range(STEPS), rank))
    model, optimizer, normalizer = _build_sharded()
    first = list(_train(model, optimizer, normalizer, range(SPLIT), rank))
    assert _history_capacity(normalizer.state_dict()) == 128
    path = _shared_dir()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    saved = {"model": model_sd, "optim": optim_sd, "stateful": normalizer}
    dcp.save({**saved, "entry": normalizer.state_dict()}, checkpoint_id=path)
    del model, optimizer, normalizer, saved, model_sd, optim_sd
    two_ranks.restart()  # a fresh process group, fresh objects
    for form in ("stateful", "entry"):
        name = f"dcp:fsdp2-model-optimizer-normalizer:{form}"
        try:
            model, optimizer, normalizer = _build_sharded()
            model_sd, optim_sd = get_state_dict(model, optimizer)
            clip: Any = normalizer if form == "stateful" else normalizer.state_dict()
            state = {"model": model_sd, "optim": optim_sd, form: clip}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
            if form == "entry":
                normalizer.load_state_dict(state["entry"])
            normalizer.state_dict()  # right after loading, before any step
            resumed = first + list(_train(model, optimizer, normalizer, range(SPLIT, STEPS), rank))
            for step, (a, b) in enumerate(zip(resumed, uninterrupted)):
                assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {step} differs"
            out[name] = {"ok": True}
        except Exception:
            out[name] = {"ok": False, "msg": traceback.format_exc()}


CASES: list[Callable[[int, dict[str, Any]], None]] = [_case_fsdp2_dcp]
CASE_NAMES = [f"dcp:fsdp2-model-optimizer-normalizer:{form}" for form in ("stateful", "entry")]


@pytest.fixture(scope="module")
def results(two_rank_results: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [per_rank.get(__name__, {}) for per_rank in two_rank_results]


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_two_ranks(results: list[dict[str, Any]], case: str) -> None:
    for rank, out in enumerate(results):
        crashed = {k: v["msg"] for k, v in out.items() if k not in CASE_NAMES}
        assert not crashed, f"rank {rank}: " + "\n".join(f"{k}:\n{m}" for k, m in crashed.items())
        result = out.get(case, {"ok": False, "msg": "did not run"})
        assert result["ok"], f"rank {rank}:\n{result.get('msg')}"
