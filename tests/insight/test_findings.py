"""Faults injected at known steps are found: spikes, the NaN origin, frozen and vanishing layers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from recorded import LAYERS, net, train
from torch import nn

from gradclip import insight


def test_two_spikes_among_a_thousand_noisy_steps_are_exactly_the_spikes(tmp_path: Path) -> None:
    path = tmp_path / "run.gcrec"
    spiked = {(300, "4"), (731, "4")}

    def spike(step: int, model: nn.Sequential) -> None:
        if (step, "4") in spiked:
            for p in model[4].parameters():
                p.grad.mul_(1e4)  # type: ignore[union-attr]

    train(path, 1000, after_backward=spike)
    found = insight.findings(insight.load(path))
    assert {(s["step"], s["layer"]) for s in found["spikes"]} == spiked
    assert all(s["ratio"] > 1e3 for s in found["spikes"])
    assert found["first_nonfinite"] is None and found["nonfinite_steps"] == 0


@pytest.mark.parametrize("origin", [2, 4, 6])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nan_born_in_backward_is_traced_to_the_layer_it_entered(
    tmp_path: Path, origin: int, bad: float
) -> None:
    """The hook poisons the gradient of layer `origin`'s output: it reaches that layer's
    parameters and every layer below; the layers above (nearer the loss) stay finite."""
    path = tmp_path / "run.gcrec"

    def poison(step: int, model: nn.Sequential, acts: list[torch.Tensor]) -> None:
        if step == 77:
            acts[origin].register_hook(lambda g: g * bad)

    train(path, 120, before_backward=poison)
    run = insight.load(path)
    row = list(run.steps).index(77)
    below = [LAYERS.index(str(k)) for k in range(0, origin + 1, 2)]
    assert not torch.isfinite(torch.from_numpy(run.norms[row, below].copy())).any()
    found = insight.findings(run)
    first = found["first_nonfinite"]
    assert first["step"] == 77 and first["layer"] == str(origin)
    assert first["parameters"] == [f"{origin}.weight", f"{origin}.bias"]


def test_a_nan_in_the_loss_names_no_layer(tmp_path: Path) -> None:
    path = tmp_path / "run.gcrec"
    train(path, 60, loss_scale=lambda step: math.nan if step == 40 else 1.0)
    first = insight.findings(insight.load(path))["first_nonfinite"]
    assert first["step"] == 40 and first["layer"] is None
    assert "every layer" in first["reason"]


def test_backward_order_is_observed_not_guessed_from_the_module_tree(tmp_path: Path) -> None:
    """Modules registered in the reverse of the order they run in."""

    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.last = nn.Linear(8, 1)
            self.middle = nn.Linear(8, 8)
            self.first = nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))

    import gradclip

    model = Reversed()
    path = tmp_path / "run.gcrec"
    normalizer = gradclip.GradientNormalizer(model, None, record=path)
    for step in range(20):
        h = model.first(torch.randn(4, 4))
        if step == 9:
            h.register_hook(lambda g: g * math.nan)
        model.zero_grad()
        model.last(torch.tanh(model.middle(torch.tanh(h)))).sum().backward()
        normalizer.apply()
    normalizer.close()
    run = insight.load(path)
    assert [run.layers[i] for i in run.backward_order()[0]] == ["last", "middle", "first"]
    assert insight.findings(run)["first_nonfinite"]["layer"] == "first"


def test_frozen_and_vanishing_layers(tmp_path: Path) -> None:
    path = tmp_path / "run.gcrec"
    model = net()
    model[2].requires_grad_(False)

    def shrink(step: int, m: nn.Sequential) -> None:
        for p in m[6].parameters():
            p.grad.mul_(1e-12)  # type: ignore[union-attr]

    train(path, 200, model=model, after_backward=shrink)
    found = insight.findings(insight.load(path))
    assert found["no_gradient"] == ["2"]
    assert found["vanishing"] == ["6"]
    assert found["spikes"] == []


def test_the_dominant_layer_has_the_largest_share(tmp_path: Path) -> None:
    path = tmp_path / "run.gcrec"

    def boost(step: int, m: nn.Sequential) -> None:
        for p in m[0].parameters():
            p.grad.mul_(100.0)  # type: ignore[union-attr]

    train(path, 100, after_backward=boost)
    dominant = insight.findings(insight.load(path))["dominant"]
    assert dominant[0]["layer"] == "0" and dominant[0]["share"] > 0.9
    assert len(dominant) == 3 and dominant[0]["share"] >= dominant[1]["share"] > 0


def test_the_rules_refuse_bad_parameters() -> None:
    with pytest.raises(ValueError, match="spike_factor"):
        insight.Rules(spike_factor=0.5)
    with pytest.raises(ValueError, match="spike_window"):
        insight.Rules(spike_window=1)


def test_findings_of_a_long_recording_match_those_read_in_one_block(tmp_path: Path) -> None:
    """The findings walk the file in blocks of steps; a block edge changes nothing."""
    path = tmp_path / "run.gcrec"
    spiked = {(3201, "8"), (3299, "0")}

    def spike(step: int, m: nn.Sequential) -> None:
        for s, name in spiked:
            if s == step:
                for p in m[int(name)].parameters():
                    p.grad.mul_(1e5)  # type: ignore[union-attr]

    train(path, 3400, mode="ClipL2PerLayer", after_backward=spike, record_every=500)
    found = insight.findings(insight.load(path))
    assert {(s["step"], s["layer"]) for s in found["spikes"]} == spiked
    assert net is not None
