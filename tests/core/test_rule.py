"""The rule contract: rules are values; a new rule takes a dozen lines and works everywhere."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import OpCounter, fill_grads, mlp
from torch import nn

import gradclip


@dataclasses.dataclass(frozen=True)
class ClipRMS(gradclip.ScalingRule):
    """Scale each gradient tensor whose root-mean-square exceeds ``bound`` down to it."""

    bound: float = 1e-2

    def scale(
        self, m: gradclip.Measured, state: gradclip.State
    ) -> tuple[torch.Tensor, gradclip.State]:
        assert m.norms is not None
        rms = m.norms / m.numel.sqrt()
        return torch.where(rms > self.bound, self.bound / rms, 1.0), state


@dataclasses.dataclass(frozen=True)
class CountSteps(gradclip.InPlaceRule):
    """Changes nothing; counts the steps each layer had gradients in."""

    norm_type = None

    @property
    def per_layer_state(self) -> bool:
        return True

    def init_state(self, rows: int, device: torch.device, dtype: torch.dtype) -> gradclip.State:
        return {"steps": torch.zeros(rows, dtype=torch.long, device=device)}

    def transform_(
        self, m: gradclip.Measured, state: gradclip.State
    ) -> tuple[torch.Tensor | None, gradclip.State]:
        unchanged = torch.zeros(len(m.layout.layer_names), dtype=torch.bool)
        return unchanged, {"steps": state["steps"] + 1}


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def test_a_custom_scaling_rule_against_a_plain_reference() -> None:
    model = mlp(3, width=16)
    fill_grads(model, scale=0.05)
    before = [p.grad.clone() for p in model.parameters()]
    gradclip.normalize_(model, ClipRMS(0.02))
    for b, p in zip(before, model.parameters()):
        r = _rms(b)
        expected = b.double() * (0.02 / r) if r > 0.02 else b.double()
        torch.testing.assert_close(p.grad.double(), expected, rtol=1e-6, atol=0)
        if r <= 0.02:
            assert torch.equal(p.grad, b)  # untouched, bit for bit


def test_a_custom_rule_in_overrides_and_chains_costs_no_extra_launches_per_layer() -> None:
    counts = []
    for layers in (4, 40):
        model = mlp(layers)
        rule = gradclip.chain(ClipRMS(0.5), "ClipL2PerLayer")
        normalizer = gradclip.GradientNormalizer(model, rule, overrides={"0": ClipRMS(0.1)})
        fill_grads(model)
        normalizer.apply()
        fill_grads(model, seed=1)
        with OpCounter() as counter:
            normalizer.apply()
        assert counter.syncs == 0
        counts.append(counter.ops)
    assert counts[0] == counts[1]


def test_rules_are_values() -> None:
    assert ClipRMS(0.1) == ClipRMS(0.1) and hash(ClipRMS(0.1)) == hash(ClipRMS(0.1))
    assert ClipRMS(0.1) != ClipRMS(0.2)
    assert gradclip.ZClip() == gradclip.ZClip() and gradclip.ZClip() != gradclip.ZClip(alpha=0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        gradclip.ClipL2PerLayer(1.0).threshold = 2.0  # type: ignore[misc]
    assert gradclip.ClipL2PerLayer(1.0) != gradclip.ClipL2PerParamType(1.0)
    # thresholds are per-layer fields: the layers of both run as one group
    assert gradclip.ClipL2PerLayer(1.0).group_key() == gradclip.ClipL2PerLayer(3.0).group_key()
    assert ClipRMS(0.1).group_key() != ClipRMS(0.2).group_key()
    assert ClipRMS(0.1).describe() == "ClipRMS(bound=0.1)"


def test_a_custom_stateful_rule_keeps_a_row_per_layer_name() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    normalizer = gradclip.GradientNormalizer({"a": [a], "b": [b]}, CountSteps())
    for step in range(5):
        a.grad = torch.ones(3)
        b.grad = torch.ones(2) if step % 2 == 0 else None
        normalizer.apply()
    (slot,) = normalizer.state_dict()["rules"].values()
    assert {name: int(row["steps"]) for name, row in slot["rows"].items()} == {"a": 5, "b": 3}


def test_a_rule_that_returns_other_state_entries_is_told_so() -> None:
    @dataclasses.dataclass(frozen=True)
    class Forgetful(CountSteps):
        def transform_(
            self, m: gradclip.Measured, state: gradclip.State
        ) -> tuple[torch.Tensor | None, gradclip.State]:
            return None, {}

    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="returns the same state entries"):
        gradclip.normalize_([p], Forgetful())


def test_a_rule_implementing_neither_method_is_refused_before_anything_changes() -> None:
    @dataclasses.dataclass(frozen=True)
    class Nothing(gradclip.Rule):
        pass

    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.full((2,), 3.0)
    with pytest.raises(TypeError, match="ScalingRule or an InPlaceRule"):
        gradclip.normalize_([p], Nothing())
    assert torch.equal(p.grad, torch.full((2,), 3.0))


def test_measured_helpers() -> None:
    seen: dict[str, object] = {}

    @dataclasses.dataclass(frozen=True)
    class Spy(gradclip.ScalingRule):
        def scale(
            self, m: gradclip.Measured, state: gradclip.State
        ) -> tuple[torch.Tensor, gradclip.State]:
            assert m.norms is not None and m.layer_norms is not None
            seen["total"] = float(m.total_norm())
            seen["layers"] = m.layer_norms.tolist()
            seen["spread"] = m.per_tensor(m.layer_norms).tolist()
            seen["numel"] = m.numel.tolist()
            return torch.ones_like(m.norms), state

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1, bias=False))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    gradclip.normalize_(model, Spy())
    assert seen["total"] == pytest.approx(math.sqrt(8))
    assert seen["layers"] == pytest.approx([math.sqrt(6), math.sqrt(2)])
    assert seen["spread"] == pytest.approx([math.sqrt(6)] * 2 + [math.sqrt(2)])
    assert seen["numel"] == [4.0, 2.0, 2.0]


@dataclasses.dataclass(frozen=True)
class _Returns(gradclip.ScalingRule):
    """A custom rule that returns what it is told to (built per test)."""

    what: str = "per_layer"

    def scale(self, m: gradclip.Measured, state: gradclip.State):  # type: ignore[no-untyped-def]
        layers = len(m.layout.layer_names)
        made = {
            "per_layer": (torch.full((layers,), 0.5), state),
            "0-d": (torch.tensor(0.5), state),
            "column": (torch.full((len(m.grads), 1), 0.5), state),
            "float": (0.5, state),
            "bare": torch.full((len(m.grads),), 0.5),
        }
        return made[self.what]


@pytest.mark.parametrize(
    ("what", "error", "says"),
    [
        ("per_layer", ValueError, r"shape \(2,\), expected \(4,\).*m\.per_tensor"),
        ("0-d", ValueError, r"shape \(\), expected \(4,\).*expand\(len\(m\.grads\)\)"),
        ("column", ValueError, r"shape \(4, 1\), expected \(4,\)"),
        ("float", TypeError, "coefficients of type float"),
        ("bare", TypeError, r"must return a \(coefficients, state\) pair, got Tensor"),
    ],
)
def test_a_custom_rule_with_wrong_coefficients_is_told_what_to_return(
    what: str, error: type[Exception], says: str
) -> None:
    model = mlp(2)
    grads = fill_grads(model)
    with pytest.raises(error, match=says):
        gradclip.normalize_(model, _Returns(what))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
