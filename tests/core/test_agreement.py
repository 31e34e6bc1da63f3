"""The configuration digest replicas compare (one process; the two-rank cases are in
`test_config_agreement`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.agreement import SETTINGS, Configuration, mismatch_message


def _config(normalizer: gradclip.GradientNormalizer) -> Configuration:
    engine = normalizer._engine
    return Configuration.of(
        [layer.name for layer in engine.layers],
        [layer.param_names for layer in engine.layers],
        [rule.describe() for rule in engine.rules],
        engine.nonfinite,
        engine._measure_all_setting,
    )


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def test_equal_configurations_spelled_differently_have_one_digest() -> None:
    net = _net()
    a = gradclip.GradientNormalizer(net, "ClipL2PerLayer", 0.5, {"2": "None"})
    b = gradclip.GradientNormalizer(
        net, gradclip.ClipL2PerLayer(0.5), overrides={"0": ("ClipL2PerLayer", 0.5), "2": None}
    )
    assert _config(a).digest() == _config(b).digest()


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"threshold": 0.25}, "rules"),
        ({"overrides": {"2": "None"}}, "rules"),
        ({"nonfinite": "zero"}, "nonfinite"),
        ({"measure_all": True}, "measure_all"),
    ],
)
def test_each_setting_has_its_own_hash(kwargs: dict[str, object], setting: str) -> None:
    net = _net()
    base = _config(gradclip.GradientNormalizer(net, "ClipL2PerLayer", 0.5)).digest()
    args: dict[str, object] = {"threshold": 0.5, **kwargs}
    other = _config(gradclip.GradientNormalizer(net, "ClipL2PerLayer", **args)).digest()  # type: ignore[arg-type]
    differing = [s for s, x, y in zip(SETTINGS, base, other) if x != y]
    assert differing == [setting]
    assert all(0 <= h < 2**48 for h in base)


def test_a_fields_value_is_part_of_the_rule() -> None:
    net = _net()
    a = _config(gradclip.GradientNormalizer(net, gradclip.ZClip(z_thresh=2.5)))
    b = _config(gradclip.GradientNormalizer(net, gradclip.ZClip(z_thresh=3.0)))
    assert a.digest()[1] != b.digest()[1] and a.digest()[0] == b.digest()[0]


def test_the_message_names_layers_that_differ_between_ranks() -> None:
    a = Configuration.of(["0", "2"], [("w",), ("w",)], ["R(1)", "R(1)"], "propagate", False)
    b = Configuration.of(["0"], [("w",)], ["R(1)"], "propagate", False)
    message, layers, settings = mismatch_message(["layers"], [a.values(), b.values()])
    assert "the layers differ: rank 1 lacks ['2(w)']" in message, message
    assert layers == [] and settings["layers"][1] == ["0(w)"]


def test_process_group_needs_an_initialized_group() -> None:
    assert not torch.distributed.is_initialized()
    net = _net()
    with pytest.raises(RuntimeError, match="no process group is initialized"):
        gradclip.GradientNormalizer(net, "ClipL2PerLayer", process_group=object())


def test_plain_modules_compare_nothing() -> None:
    normalizer = gradclip.GradientNormalizer(_net(), "ClipL2PerLayer")
    assert normalizer._engine._replicas is None and normalizer._engine._agreed
