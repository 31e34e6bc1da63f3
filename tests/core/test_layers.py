"""What a layer is: modules owning parameters, tied and frozen parameters, groupings, overrides."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyRNN, backward_once, fill_grads, mlp
from torch import nn

import gradclip


def test_default_layers_are_modules_owning_parameters() -> None:
    model = TinyRNN()
    layers = gradclip.build_layers(model)
    assert [layer.name for layer in layers] == ["embed", "rnn", "head"]
    assert layers[1].param_names == ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


def test_root_module_with_own_parameters_is_named_empty() -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.fc = nn.Linear(3, 3)

    assert [layer.name for layer in gradclip.build_layers(Root())] == ["", "fc"]


def test_tied_parameters_are_normalized_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5)
            self.head.weight = self.embed.weight

    model = Tied()
    layers = gradclip.build_layers(model)
    assert [(layer.name, layer.param_names) for layer in layers] == [
        ("embed", ("weight",)),
        ("head", ("bias",)),
    ]
    model.embed.weight.grad = torch.full((5, 4), 2.0)
    model.head.bias.grad = torch.zeros(5)
    gradclip.normalize_(model, "RenormalizeL2PerParamType")
    assert float(model.embed.weight.grad.norm()) == pytest.approx(1.0)  # once, not twice


def test_frozen_and_missing_gradients_are_skipped() -> None:
    model = mlp(3)
    grads = fill_grads(model)
    model[0].weight.requires_grad_(False)  # stale gradient stays untouched
    model[1].weight.grad = None
    model[2].weight.grad = None
    model[2].bias.grad = None
    report = gradclip.normalize_(model, "RenormalizeL2PerLayer")
    assert torch.equal(model[0].weight.grad, grads[0])
    assert report.layer_names == ["0", "1"]
    assert float(model[0].bias.grad.norm()) == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:a per-layer rule was given a flat list")  # on purpose
def test_custom_groupings() -> None:
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(4))
    c = nn.Parameter(torch.zeros(2))
    for p in (a, b, c):
        p.grad = torch.full(p.shape, 10.0)
    report = gradclip.normalize_({"first": [a, b], "second": {"w": c}}, "ClipL2PerLayer", 1.0)
    assert report.layer_names == ["first", "second"]
    assert set(report.param_names) == {"first.0", "first.1", "second.w"}
    assert float(torch.cat([a.grad, b.grad]).norm()) == pytest.approx(1.0)
    for p in (a, b, c):
        p.grad = torch.full(p.shape, 10.0)
    report = gradclip.normalize_([[a], [b, c]], "ClipL2PerLayer", 1.0)
    assert report.layer_names == ["0", "1"]
    assert float(torch.cat([b.grad, c.grad]).norm()) == pytest.approx(1.0)
    # a flat list of parameters is one layer, as in clip_grad_norm_
    for p in (a, b, c):
        p.grad = torch.full(p.shape, 10.0)
    gradclip.normalize_([a, b, c], "ClipL2PerLayer", 1.0)
    assert float(torch.cat([a.grad, b.grad, c.grad]).norm()) == pytest.approx(1.0)


def test_overrides_by_name_prefix_and_pattern() -> None:
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    model.add_module("rnn", nn.RNN(4, 4))
    model.add_module("head", nn.Linear(4, 2))
    normalizer = gradclip.GradientNormalizer(
        model,
        mode="ClipL2PerLayer",
        threshold=2.0,
        overrides={
            "encoder": "ClipL2PerParamType",  # every layer inside encoder
            "encoder.1": ("RenormalizeL2PerLayer", 1.0),  # exact name beats the prefix
            "rnn": ("ClipElementWiseAbsoluteValue", 0.5),
            "h*": None,  # glob pattern; None is DL4J's None
        },
    )
    chosen = {name: s.describe() for name, s in normalizer.strategies.items()}
    assert chosen == {
        "encoder.0": "ClipL2PerParamType(threshold=2.0)",  # default threshold, as in DL4J
        "encoder.1": "RenormalizeL2PerLayer()",
        "rnn": "ClipElementWiseAbsoluteValue(threshold=0.5)",
        "head": "None()",
    }
    text = normalizer.describe()
    assert (
        "rnn" in text and "weight_hh_l0 (4, 4)" in text and "ClipElementWiseAbsoluteValue" in text
    )
    assert str(normalizer) == text


def test_compiled_and_ddp_style_wrappers_keep_names() -> None:
    model = mlp(2)
    wrapped = nn.DataParallel(model)
    assert [layer.name for layer in gradclip.build_layers(wrapped)] == ["0", "1"]


def test_compiled_module_keeps_the_names_of_the_original() -> None:
    model = TinyRNN()
    compiled = torch.compile(model)
    assert [layer.name for layer in gradclip.build_layers(compiled)] == ["embed", "rnn", "head"]
    normalizer = gradclip.GradientNormalizer(compiled, "ClipL2PerLayer", overrides={"rnn": None})
    backward_once(model, scale=100.0)
    report = normalizer.apply()
    assert report.layer_names == ["embed", "rnn", "head"]


def test_a_torchscript_module_is_grouped_and_clipped_as_its_eager_module() -> None:
    eager = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    scripted = torch.jit.script(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    scripted.load_state_dict(eager.state_dict())
    assert [layer.name for layer in gradclip.build_layers(scripted)] == ["0", "2"]
    normalizers = [gradclip.GradientNormalizer(m, "ClipL2PerLayer", 0.5) for m in (eager, scripted)]
    for step in range(3):  # the later steps check the structure of a script module too
        for model, normalizer in zip((eager, scripted), normalizers, strict=True):
            fill_grads(model, scale=2.0 + step, seed=step)
            normalizer.apply()
        for p, q in zip(eager.parameters(), scripted.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)


def test_layer_with_mixed_dtypes_is_clipped_as_one_layer() -> None:
    layer = nn.Linear(16, 16)
    layer.bias.data = layer.bias.data.to(torch.bfloat16)
    layer.weight.grad = torch.full((16, 16), 1.0)
    layer.bias.grad = torch.full((16,), 2.0, dtype=torch.bfloat16)
    expected_norm = math.sqrt(256 * 1.0 + 16 * 4.0)
    report = gradclip.normalize_(layer, "ClipL2PerLayer", 1.0)
    assert float(report.layer_norms[""]) == pytest.approx(expected_norm, rel=1e-6)
    total = math.sqrt(
        float(layer.weight.grad.double().norm()) ** 2 + float(layer.bias.grad.double().norm()) ** 2
    )
    assert total == pytest.approx(1.0, rel=1e-2)
    assert layer.bias.grad.dtype == torch.bfloat16
    assert float(layer.weight.grad[0, 0]) == pytest.approx(1.0 / expected_norm, rel=1e-6)


def test_model_without_parameters() -> None:
    normalizer = gradclip.GradientNormalizer(nn.ReLU(), "ClipL2PerLayer")
    report = normalizer.apply()
    assert report.layer_names == [] and report.to_dict()["param_norms"] == {}
    assert "layer" in normalizer.describe()


def test_an_exhausted_generator_warns_as_torch_does() -> None:
    model = mlp(2)
    fill_grads(model)
    params = model.parameters()
    list(params)
    with pytest.warns(UserWarning, match="empty iterable"):
        gradclip.normalize_(params, "ClipL2PerLayer")


def test_explicitly_listed_tensors_are_clipped_even_without_requires_grad() -> None:
    # as torch.nn.utils.clip_grad_norm_ does; a module walk still skips frozen parameters
    t = torch.ones(4, requires_grad=False)
    t.grad = torch.full((4,), 10.0)
    gradclip.normalize_([t], gradclip.ClipGlobalNorm(1.0))
    assert float(t.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    model = mlp(2)
    model[0].weight.requires_grad_(False)
    fill_grads(model)
    frozen = model[0].weight.grad.clone()
    gradclip.normalize_(model, "ClipL2PerParamType", 0.1)
    assert torch.equal(model[0].weight.grad, frozen)
