"""Exact resume: save the normalizer's state, load it in a fresh process, continue bit for bit."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.state import unpack_tensor

# Runs training steps [start, stop) and records the normalized gradients of each step.
# Executed in fresh interpreters (python -c) and, for the uninterrupted run, in this one.
WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    import gradclip

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        normalizer = gradclip.GradientNormalizer(
            model,
            gradclip.ZClip(warmup_steps=3, scope="layer"),
            overrides={
                "0": gradclip.chain(gradclip.AdaptiveGradClip(0.05), gradclip.AutoClip(20.0)),
                "4": gradclip.AutoClip(30.0, history_size=4),
            },
        )
        return model, optimizer, normalizer

    def run(start, stop, load=None, save=None):
        model, optimizer, normalizer = build()
        if load is not None:
            saved = torch.load(load)  # weights_only=True: plain containers and tensors
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            normalizer.load_state_dict(saved["normalizer"])
        grads = []
        for step in range(start, stop):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(16, 4, generator=gen)
            y = torch.randn(16, 2, generator=gen)
            spike = 40.0 if step % 5 == 4 else 1.0
            optimizer.zero_grad()
            (spike * (model(x) - y).pow(2).mean()).backward()
            normalizer.apply()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
        if save is not None:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "normalizer": normalizer.state_dict(),
                },
                save,
            )
        return grads

    if __name__ == "__main__":
        start, stop, load, save, out = sys.argv[1:6]
        grads = run(int(start), int(stop), load or None, save or None)
        torch.save(grads, out)
    """
)


def _in_fresh_process(tmp: Path, *args: object) -> None:
    subprocess.run(
        [sys.executable, "-c", WORKER, *map(str, args)], check=True, cwd=tmp, timeout=300
    )


@pytest.mark.parametrize("split", [2, 9])  # during the warm-up, and after it
def test_resume_in_fresh_process_is_bit_identical(tmp_path: Path, split: int) -> None:
    total = 16
    namespace: dict[str, object] = {"__name__": "worker"}
    exec(WORKER, namespace)
    uninterrupted = namespace["run"](0, total)  # type: ignore[operator]

    checkpoint, first, second = tmp_path / "ckpt.pt", tmp_path / "a.pt", tmp_path / "b.pt"
    _in_fresh_process(tmp_path, 0, split, "", checkpoint, first)
    _in_fresh_process(tmp_path, split, total, checkpoint, "", second)
    resumed = torch.load(first) + torch.load(second)

    assert len(resumed) == len(uninterrupted) == total
    for step, (a, b) in enumerate(zip(resumed, uninterrupted)):
        for ga, gb in zip(a, b):
            assert torch.equal(ga, gb), f"step {step} differs"
    # and the rules did act: some step was clipped
    raw_namespace: dict[str, object] = {"__name__": "worker"}
    exec(WORKER.replace("normalizer.apply()", "pass"), raw_namespace)
    raw = raw_namespace["run"](0, 3)  # type: ignore[operator]
    assert not all(torch.equal(x, y) for x, y in zip(raw[2], uninterrupted[2]))


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))


def _step(model: nn.Module, normalizer: gradclip.GradientNormalizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * (1 + seed)
    normalizer.apply()


def test_state_dict_is_plain_and_loads_with_weights_only(tmp_path: Path) -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(
        model, gradclip.AutoClip(history_size=None, scope="layer")
    )
    for seed in range(3):
        _step(model, normalizer, seed)
    torch.save(normalizer.state_dict(), tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert loaded["format"] == "gradclip.GradientNormalizer" and loaded["version"] == 3
    assert loaded["layers"] == ["0", "1"]
    (slot,) = loaded["rules"].values()
    assert slot["steps"] == 3
    assert set(slot["rows"]) == {"0", "1"}  # keyed by layer name
    assert int(slot["rows"]["0"]["count"]) == 3
    # the whole history grows with the run: packed as bytes (see gradclip.core.state)
    history = unpack_tensor(slot["rows"]["1"]["history"])
    assert history.shape == (64,) and history[:3].tolist() != [0.0, 0.0, 0.0]


def test_state_dict_has_its_full_structure_before_the_first_step() -> None:
    model = _model()
    fresh = gradclip.GradientNormalizer(model, gradclip.ZClip(scope="layer")).state_dict()
    trained = gradclip.GradientNormalizer(model, gradclip.ZClip(scope="layer"))
    _step(model, trained, 0)
    after = trained.state_dict()
    assert fresh.keys() == after.keys() and fresh["rules"].keys() == after["rules"].keys()
    for name, slot in fresh["rules"].items():
        assert slot["rows"].keys() == after["rules"][name]["rows"].keys()
        for row, tensors in slot["rows"].items():
            for key, value in tensors.items():
                assert value.shape == after["rules"][name]["rows"][row][key].shape


def test_state_dict_for_another_model_is_rejected() -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip())
    _step(model, normalizer, 0)
    state = normalizer.state_dict()
    wider = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(
        ValueError,
        match=r"different model.*covers \['0: weight\(3, 3\).*here the row covers "
        r"\['0: weight\(4, 3\)",
    ):
        gradclip.GradientNormalizer(wider, gradclip.ZClip()).load_state_dict(state)
    deeper = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="different model"):
        gradclip.GradientNormalizer(deeper, gradclip.ZClip()).load_state_dict(state)
    with pytest.raises(ValueError, match=r"not a gradclip\.GradientNormalizer state dict"):
        normalizer.load_state_dict({"layers": []})


def test_state_dict_for_another_rule_is_rejected() -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(alpha=0.9))
    _step(model, normalizer, 0)
    state = normalizer.state_dict()
    other = gradclip.GradientNormalizer(_model(), gradclip.ZClip(alpha=0.8))
    with pytest.raises(ValueError, match=r"ZClip\(alpha=0.8.*no saved state of this rule"):
        other.load_state_dict(state)


def test_a_version_1_state_is_refused_with_the_reason() -> None:
    normalizer = gradclip.GradientNormalizer(_model(), gradclip.ZClip())
    with pytest.raises(ValueError, match=r"version 1.*reads version 2 or 3"):
        normalizer.load_state_dict({"format": "gradclip.GradientNormalizer", "version": 1})


def _damage(state: dict, how: str) -> dict:  # type: ignore[type-arg]
    damaged = copy.deepcopy(state)
    (slot,) = damaged["rules"].values()
    row = slot["rows"]["*"]
    if how == "missing tensor":
        del row["mean"]
    elif how == "wrong shape":
        row["warmup"] = torch.zeros(7, dtype=torch.float64)
    elif how == "not a tensor":
        row["var"] = 1.0
    elif how == "missing row":
        slot["rows"] = {}
    elif how == "bad steps":
        slot["steps"] = -1
    elif how == "extra rule":
        damaged["rules"]["AutoClip()"] = slot
    return damaged


@pytest.mark.parametrize(
    "how",
    ["missing tensor", "wrong shape", "not a tensor", "missing row", "bad steps", "extra rule"],
)
def test_a_damaged_state_dict_is_refused_and_changes_nothing(how: str) -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(warmup_steps=3))
    for seed in range(2):
        _step(model, normalizer, seed)
    good = normalizer.state_dict()
    other = gradclip.GradientNormalizer(_model(), gradclip.ZClip(warmup_steps=3))
    before = other.state_dict()
    with pytest.raises(ValueError):
        other.load_state_dict(_damage(good, how))
    after = other.state_dict()
    (b,), (a,) = before["rules"].values(), after["rules"].values()
    assert a["steps"] == b["steps"]
    assert all(torch.equal(a["rows"]["*"][k], v) for k, v in b["rows"]["*"].items())


def test_inline_normalize_keeps_the_rule_state_across_calls() -> None:
    model_a, model_b = _model(), _model()
    gen = torch.Generator().manual_seed(1)
    sequence = [
        [torch.randn(p.shape, generator=gen) * (1 + 50 * (i == 5)) for p in model_a.parameters()]
        for i in range(7)
    ]
    normalizer = gradclip.GradientNormalizer(model_b, gradclip.ZClip(warmup_steps=3))
    for i, grads in enumerate(sequence):
        for a, b, g in zip(model_a.parameters(), model_b.parameters(), grads):
            a.grad, b.grad = g.clone(), g.clone()
        gradclip.normalize_(model_a, gradclip.ZClip(warmup_steps=3))  # a new, equal rule each call
        normalizer.apply()
        assert all(
            torch.equal(a.grad, b.grad) for a, b in zip(model_a.parameters(), model_b.parameters())
        )
        if i == 5:  # the spike after the warm-up is clipped by the inline form too
            assert float(torch.cat([p.grad.flatten() for p in model_a.parameters()]).norm()) < 20


def test_load_into_a_running_normalizer_rewinds_it() -> None:
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, gradclip.AutoClip(history_size=3))
    _step(model, normalizer, 0)
    state = normalizer.state_dict()
    _step(model, normalizer, 1)
    after_one = [p.grad.clone() for p in model.parameters()]
    normalizer.load_state_dict(state)
    _step(model, normalizer, 1)
    assert all(torch.equal(a, p.grad) for a, p in zip(after_one, model.parameters()))


# -- non-finite steps never enter the statistics --------------------------------------------
STATEFUL = [
    gradclip.AutoClip(30.0),
    gradclip.AutoClip(30.0, history_size=5, scope="layer"),
    gradclip.ZClip(warmup_steps=4),
    gradclip.ZClip(warmup_steps=4, max_grad_norm=50.0, scope="layer"),
    gradclip.chain(("ClipElementWiseAbsoluteValue", 100.0), gradclip.ZClip(warmup_steps=4)),
]


def _sequence(steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (4,), (2, 4), (2,)]
    return [
        [
            torch.randn(s, generator=gen, dtype=torch.float64) * (1 + 40 * (i == steps - 2))
            for s in shapes
        ]
        for i in range(steps)
    ]


@pytest.mark.parametrize("rule", STATEFUL, ids=lambda r: r.describe()[:40])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("at", [2, 8])  # in the warm-up, and after it
def test_a_nonfinite_step_leaves_the_statistics_as_if_it_never_happened(
    rule: gradclip.Rule, bad: float, at: int
) -> None:
    per_layer = "layer" in rule.describe()
    steps = _sequence(14)

    def run(poison: bool) -> list[list[torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
        normalizer = gradclip.GradientNormalizer(model, rule)
        out = []
        for i, grads in enumerate(steps):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            if i == at:
                if not poison and not per_layer:
                    continue  # the reference run never sees this step
                if poison:
                    model[0].weight.grad[0, 0] = bad
                else:  # per layer: layer "0" has no gradient at that step, "1" does
                    model[0].weight.grad = model[0].bias.grad = None
            normalizer.apply()
            out.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        return out

    poisoned, reference = run(True), run(False)
    if not per_layer:
        del poisoned[at]
    for i, (a, b) in enumerate(zip(poisoned, reference)):
        if per_layer and i == at:
            assert all(torch.equal(x, y) for x, y in zip(a[2:], b))  # layer "1" went on
            continue
        assert all(torch.equal(x, y) for x, y in zip(a, b)), i
    assert all(torch.isfinite(g).all() for g in poisoned[-1])
