"""A parametrized module (``torch.nn.utils.parametrize``) is one layer with its parametrizations."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from reference import layer_norm, reference_layer
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import gradclip
from gradclip.core.layers import Layer, build_layers, resolve_override_keys, tied_layers


class Scaled(nn.Module):
    """A learnable parametrization: a parameter of its own, one scale per row."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, rows).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Positive(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.exp()

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x.log()


class Flat(nn.Module):
    """Stores an ``(8, 4)`` weight as a flat ``(32,)`` tensor: needs ``unsafe=True``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(8, 4)

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)


def _weight_norm(m: nn.Linear) -> nn.Module:
    return parametrizations.weight_norm(m)


def _spectral_norm(m: nn.Linear) -> nn.Module:
    return parametrizations.spectral_norm(m)


def _orthogonal(m: nn.Linear) -> nn.Module:
    return parametrizations.orthogonal(m)


def _scaled(m: nn.Linear) -> nn.Module:
    return parametrize.register_parametrization(m, "weight", Scaled(m.out_features))


def _unsafe(m: nn.Linear) -> nn.Module:
    return parametrize.register_parametrization(m, "weight", Flat(), unsafe=True)


PARAMETRIZE: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "weight_norm": _weight_norm,
    "spectral_norm": _spectral_norm,
    "orthogonal": _orthogonal,
    "learnable": _scaled,
    "unsafe": _unsafe,
}

WEIGHT_PARAMS = {
    "weight_norm": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
    "spectral_norm": ("parametrizations.weight.original",),
    "orthogonal": ("parametrizations.weight.original",),
    "learnable": ("parametrizations.weight.original", "parametrizations.weight.0.scale"),
    "unsafe": ("parametrizations.weight.original",),
}


def _model(kind: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model[0] = PARAMETRIZE[kind](model[0])
    return model


def _backward(model: nn.Module, seed: int = 0, scale: float = 10.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(16, 4, generator=gen).to(dtype), torch.randn(16, 2, generator=gen).to(dtype)
    model.zero_grad(set_to_none=True)
    (scale * (model(x) - y).pow(2).mean()).backward()


def _check_owners(layers: list[Layer]) -> None:
    # each owner is the mapping that really holds the parameter, under its key
    for layer in layers:
        assert len(layer.owners) == len(layer.params)
        for (owner, key), param in zip(layer.owners, layer.params):
            assert owner[key] is param


def _as_named(model: nn.Module, layers: list[Layer]) -> None:
    # the layers' qualified names are exactly the model's named_parameters()
    named = {layer.qualified(k): p for layer in layers for k, p in enumerate(layer.params)}
    assert named.keys() == dict(model.named_parameters()).keys()
    assert all(named[n] is p for n, p in model.named_parameters())


# -- the grouping --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(PARAMETRIZE))
def test_a_parametrized_module_is_one_layer_named_as_pytorch_names_its_parameters(
    kind: str,
) -> None:
    model = _model(kind)
    layers = build_layers(model)
    assert [(layer.name, layer.param_names) for layer in layers] == [
        ("0", ("bias", *WEIGHT_PARAMS[kind])),
        ("2", ("weight", "bias")),
    ]
    _check_owners(layers)
    _as_named(model, layers)


def test_a_module_whose_only_parameter_is_parametrized_is_still_its_own_layer() -> None:
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 8, bias=False)))
    assert [(layer.name, layer.param_names) for layer in build_layers(model)] == [
        ("0", ("parametrizations.weight.original0", "parametrizations.weight.original1"))
    ]

    class Gain(nn.Module):  # no buffers, one parameter, parametrized
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.ones(3))

    root = parametrize.register_parametrization(Gain(), "g", Positive())
    layers = build_layers(root)
    assert [(layer.name, layer.param_names) for layer in layers] == [
        ("", ("parametrizations.g.original",))
    ]
    _check_owners(layers)


def test_a_parametrized_buffer_leaves_only_the_parametrizations_own_parameters() -> None:
    class Buffered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.ones(8, 4))

    module = parametrize.register_parametrization(Buffered(), "table", Scaled(8))
    model = nn.Sequential(nn.Linear(2, 2), module)
    layers = build_layers(model)
    assert [(layer.name, layer.param_names) for layer in layers] == [
        ("0", ("weight", "bias")),
        ("1", ("parametrizations.table.0.scale",)),
    ]
    _check_owners(layers)


def test_nested_parametrized_modules_and_a_parametrized_parametrization() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(8))
            self.inner = parametrizations.weight_norm(nn.Linear(4, 8))

    block = parametrize.register_parametrization(Block(), "gain", Positive())
    outer = nn.Linear(8, 8)
    scaled = Scaled(8)
    parametrize.register_parametrization(scaled, "scale", Positive())
    parametrize.register_parametrization(outer, "weight", scaled)
    model = nn.Sequential(block, outer)
    layers = build_layers(model)
    assert [(layer.name, layer.param_names) for layer in layers] == [
        ("0", ("parametrizations.gain.original",)),
        (
            "0.inner",
            ("bias", "parametrizations.weight.original0", "parametrizations.weight.original1"),
        ),
        (
            "1",
            (
                "bias",
                "parametrizations.weight.original",
                "parametrizations.weight.0.parametrizations.scale.original",
            ),
        ),
    ]
    _check_owners(layers)
    _as_named(model, layers)
    tied = tied_layers(model)
    assert tied["0.parametrizations.gain"] == "0"
    assert tied["0.inner.parametrizations.weight"] == "0.inner"
    assert tied["1.parametrizations.weight.0"] == "1"
    assert tied["1.parametrizations.weight.0.parametrizations.scale"] == "1"
    assert "0.inner" not in tied


def test_a_users_own_child_named_parametrizations_is_a_module_like_any_other() -> None:
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))
            self.parametrizations = nn.ModuleDict({"proj": nn.Linear(4, 4)})

    layers = build_layers(nn.Sequential(Mixer()))
    assert [(layer.name, layer.param_names) for layer in layers] == [
        ("0", ("gain",)),
        ("0.parametrizations.proj", ("weight", "bias")),
    ]
    assert tied_layers(nn.Sequential(Mixer())) == {}


def test_a_tied_original_belongs_to_the_first_module_that_owns_it() -> None:
    first = parametrizations.weight_norm(nn.Linear(4, 8))
    second = nn.Linear(4, 8)
    second.weight = first.parametrizations.weight.original1
    model = nn.ModuleDict({"first": first, "second": second})
    assert [(layer.name, layer.param_names) for layer in build_layers(model)] == [
        (
            "first",
            ("bias", "parametrizations.weight.original0", "parametrizations.weight.original1"),
        ),
        ("second", ("bias",)),
    ]
    # the other order: the plain module owns the shared tensor, the parametrized one the rest
    model = nn.ModuleDict({"second": second, "first": first})
    layers = build_layers(model)
    assert [(layer.name, layer.param_names) for layer in layers] == [
        ("second", ("weight", "bias")),
        ("first", ("bias", "parametrizations.weight.original0")),
    ]
    _check_owners(layers)
    # its parametrization's name still names the parametrized module's layer
    assert tied_layers(model)["first.parametrizations.weight"] == "first"
    # the shared tensor is normalized once: its norm is 1, not 1 / its norm
    for param in model.parameters():
        param.grad = torch.full_like(param, 3.0)
    gradclip.normalize_(model, "RenormalizeL2PerParamType")
    for param in model.parameters():
        assert param.grad is not None
        assert float(param.grad.norm()) == pytest.approx(1.0, rel=1e-6)


def test_a_parametrized_module_under_a_second_name_is_tied_to_its_layer() -> None:
    linear = parametrizations.weight_norm(nn.Linear(4, 4, bias=False))
    model = nn.ModuleDict({"a": linear, "b": linear})
    assert [layer.name for layer in build_layers(model)] == ["a"]
    tied = tied_layers(model)
    assert tied["b"] == "a" and tied["b.parametrizations.weight"] == "a"


def test_a_parametrized_module_given_as_one_layer_of_a_custom_grouping() -> None:
    encoder = parametrizations.weight_norm(nn.Linear(4, 8))
    head = nn.Linear(8, 2)
    layers = build_layers({"enc": encoder, "head": head})
    assert [(layer.name, layer.param_names) for layer in layers] == [
        ("enc", ("bias", "parametrizations.weight.original0", "parametrizations.weight.original1")),
        ("head", ("weight", "bias")),
    ]
    _check_owners(layers)


# -- names that meant the split-off part ---------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["0.parametrizations.weight", "0.parametrizations", "0.parametrizations.weight.0"]
)
def test_the_name_of_the_split_off_part_names_the_layer(key: str) -> None:
    model = _model("learnable")
    assert resolve_override_keys(model, {key: "None"}) == {"0": "None"}
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.1, {key: "None"})
    assert normalizer.rules == {
        "0": gradclip.NoNormalization(),
        "2": gradclip.ClipL2PerLayer(0.1),
    }
    config = gradclip.GradientNormalizer.from_config(
        model,
        {
            "gradientNormalization": "ClipL2PerLayer",
            "gradientNormalizationThreshold": 0.1,
            "layers": {key: "ClipElementWiseAbsoluteValue"},
        },
    )
    assert list(config.rules) == ["0", "2"]
    assert type(config.rules["0"]).__name__ == "ClipElementWiseAbsoluteValue"


def test_the_split_off_name_and_the_layer_with_different_rules_are_refused() -> None:
    model = _model("weight_norm")
    overrides = {"0": "None", "0.parametrizations.weight": "ClipL2PerParamType"}
    with pytest.raises(ValueError, match=r"\(0\.parametrizations\.weight shares its parameters"):
        gradclip.GradientNormalizer(model, "ClipL2PerLayer", overrides=overrides)
    same = {"0": "None", "0.parametrizations.weight": "None"}
    assert resolve_override_keys(model, same) == {"0": "None"}


def test_the_callbacks_layer_selection_resolves_the_split_off_name() -> None:
    from gradclip.integrations._optimizers import PerOptimizer

    model = _model("weight_norm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    per = PerOptimizer("ClipL2PerLayer", 1.0, lambda report: None)
    per.bind(model, {"0.parametrizations.weight": "None"})
    per.sync([optimizer])
    (entry,) = per.entries
    assert entry.normalizer.rules == {
        "0": gradclip.NoNormalization(),
        "2": gradclip.ClipL2PerLayer(1.0),
    }
    per.cancel()


# -- DL4J's arithmetic on a parametrized layer ---------------------------------------------------


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "learnable"])
@pytest.mark.parametrize("mode", ["ClipL2PerLayer", "RenormalizeL2PerLayer", "ClipL2PerParamType"])
def test_dl4j_modes_treat_every_tensor_of_the_parametrized_layer_as_one_layer(
    kind: str, mode: str
) -> None:
    model = _model(kind, seed=3)
    _backward(model, seed=4)
    # the reference groups by module, independently of gradclip: all of a module's parameters
    groups = {name: list(model.get_submodule(name).parameters()) for name in ("0", "2")}
    grads = {name: [p.grad.clone() for p in params] for name, params in groups.items()}
    threshold = 0.05
    report = gradclip.normalize_(model, mode, threshold)
    for name, params in groups.items():
        want = reference_layer(grads[name], mode, threshold)
        for param, expected in zip(params, want):
            assert param.grad is not None
            torch.testing.assert_close(param.grad.double(), expected, rtol=2e-6, atol=1e-9)
    assert list(report.layer_norms) == ["0", "2"]
    for name in groups:
        norm = float(report.layer_norms[name])
        assert norm == pytest.approx(layer_norm(grads[name]), rel=1e-6)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float64, 1e-12), (torch.bfloat16, 2**-7), (torch.float16, 2**-10)]
)
def test_a_parametrized_layer_is_clipped_as_one_in_every_dtype(
    dtype: torch.dtype, rtol: float
) -> None:
    model = _model("weight_norm", seed=7).to(dtype)
    _backward(model, seed=8)
    groups = {name: list(model.get_submodule(name).parameters()) for name in ("0", "2")}
    grads = {name: [p.grad.clone() for p in params] for name, params in groups.items()}
    gradclip.normalize_(model, "ClipL2PerLayer", 0.05)
    for name, params in groups.items():
        want = reference_layer(grads[name], "ClipL2PerLayer", 0.05)
        for param, expected in zip(params, want):
            assert param.grad is not None and param.grad.dtype == dtype
            # one rounding of the scaled gradient to the dtype, on top of the float64 result
            tiny = torch.finfo(dtype).smallest_normal  # below it, fp16 rounds absolutely
            torch.testing.assert_close(param.grad.double(), expected, rtol=rtol, atol=tiny)
        assert layer_norm(grads[name]) > 0.05  # every layer was clipped, as one


def test_a_training_step_end_to_end_matches_a_float64_reference() -> None:
    model = _model("weight_norm", seed=5)
    model.append(parametrizations.spectral_norm(nn.Linear(2, 2)))
    reference = copy.deepcopy(model).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.2)
    handle = normalizer.attach(optimizer)
    # spectral_norm's power iteration runs in training mode; the reference must follow it
    for step in range(4):
        _backward(model, seed=step)
        optimizer.step()
        _backward(reference, seed=step)
        with torch.no_grad():
            for index in ("0", "2", "3"):
                params = list(reference.get_submodule(index).parameters())
                clipped = reference_layer([p.grad for p in params], "ClipL2PerLayer", 0.2)
                for p, g in zip(params, clipped):
                    p.sub_(0.05 * g)
    handle.remove()
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=name)
    report = normalizer.last_report
    assert report is not None and list(report.layer_norms) == ["0", "2", "3"]


def test_repr_and_report_show_the_layer_with_its_parametrizations() -> None:
    model = _model("weight_norm")
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.1)
    rows = str(normalizer).splitlines()
    assert rows[2].split()[:4] == ["0", "bias", "(8,),", "parametrizations.weight.original0"]
    assert len(rows) == 4
    _backward(model)
    report = normalizer.apply()
    assert report.param_names[:3] == [
        "0.bias",
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
    ]
    assert str(report).splitlines()[2].startswith("0 ")


def test_state_dict_round_trip_of_a_per_layer_adaptive_rule() -> None:
    model = _model("weight_norm")
    normalizer = gradclip.GradientNormalizer(model, gradclip.AutoClip(scope="layer"))
    for step in range(3):
        _backward(model, seed=step)
        normalizer.apply()
    state = normalizer.state_dict()
    assert state["layers"] == ["0", "2"]
    assert state["params"][:3] == [
        "0.bias(8,)",
        "0.parametrizations.weight.original0(8, 1)",
        "0.parametrizations.weight.original1(8, 4)",
    ]
    fresh_model = copy.deepcopy(model)
    fresh = gradclip.GradientNormalizer(fresh_model, gradclip.AutoClip(scope="layer"))
    result = fresh.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    _backward(model, seed=9)
    _backward(fresh_model, seed=9)
    normalizer.apply()
    fresh.apply()
    for got, want in zip(fresh_model.parameters(), model.parameters()):
        assert got.grad is not None and want.grad is not None
        assert torch.equal(got.grad, want.grad)


def test_a_state_saved_with_the_split_layout_is_refused_and_the_rest_restored() -> None:
    model = _model("weight_norm")
    holder = model[0].parametrizations.weight
    split = {  # the layers a parametrized module used to give
        "0": {"bias": model[0].bias},
        "0.parametrizations.weight": {"original0": holder.original0, "original1": holder.original1},
        "2": model[2],
    }
    old = gradclip.GradientNormalizer(split, gradclip.AutoClip(scope="layer"))
    _backward(model)
    old.apply()
    normalizer = gradclip.GradientNormalizer(model, gradclip.AutoClip(scope="layer"))
    with pytest.raises(ValueError, match="no group here has this row"):
        normalizer.load_state_dict(old.state_dict())
    result = normalizer.load_state_dict(old.state_dict(), strict=False)
    assert [key.rsplit("[", 1)[1] for key in result.missing_keys] == ["'0']"]
    assert sorted(key.rsplit("[", 1)[1] for key in result.unexpected_keys) == [
        "'0']",
        "'0.parametrizations.weight']",
    ]


# -- structure changes ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["weight_norm", "orthogonal"])
def test_remove_parametrizations_after_building_relays_the_layer(kind: str) -> None:
    model = _model(kind)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.05)
    assert normalizer.layers[0].param_names == ("bias", *WEIGHT_PARAMS[kind])
    parametrize.remove_parametrizations(model[0], "weight")
    _backward(model, seed=1)
    grads = [model[0].bias.grad.clone(), model[0].weight.grad.clone()]
    report = normalizer.apply()
    layers = normalizer.layers
    assert [(layer.name, layer.param_names) for layer in layers] == [
        ("0", ("bias", "weight")),
        ("2", ("weight", "bias")),
    ]
    assert layers[0].params[1] is model[0].weight
    _check_owners(layers)
    assert float(report.layer_norms["0"]) == pytest.approx(layer_norm(grads), rel=1e-6)
    for param, want in zip(
        (model[0].bias, model[0].weight), reference_layer(grads, "ClipL2PerLayer", 0.05)
    ):
        torch.testing.assert_close(param.grad.double(), want, rtol=2e-6, atol=1e-9)


def test_an_override_by_a_removed_parametrizations_name_raises_as_for_a_removed_module() -> None:
    model = _model("weight_norm")
    key = "0.parametrizations.weight"
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.05, {key: "None"})
    parametrize.remove_parametrizations(model[0], "weight")
    _backward(model)
    grads = [p.grad.clone() for p in model.parameters()]
    for _ in range(2):  # every step, and nothing is normalized with the old layers
        with pytest.raises(
            KeyError, match=r"override key '0\.parametrizations\.weight' matches no"
        ):
            normalizer.apply()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    normalizer.reconfigure(overrides={"0": "None"})
    assert normalizer.rules["0"] == gradclip.NoNormalization()
    assert normalizer.layers[0].param_names == ("bias", "weight")


def test_a_parametrization_registered_after_building_joins_the_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.05)
    parametrizations.weight_norm(model[0])
    _backward(model)
    report = normalizer.apply()
    layer = normalizer.layers[0]
    assert (layer.name, layer.param_names) == ("0", ("bias", *WEIGHT_PARAMS["weight_norm"]))
    assert list(report.layer_norms) == ["0", "2"]


def test_an_original_replaced_behind_the_hooks_is_followed() -> None:
    model = _model("weight_norm")
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.05)
    holder = model[0].parametrizations.weight
    replacement = nn.Parameter(holder.original1.detach().clone())
    holder._parameters["original1"] = replacement  # no registration hook sees this
    _backward(model)
    normalizer.apply()
    layer = normalizer.layers[0]
    assert layer.name == "0" and layer.params[2] is replacement
    assert float(layer_norm([p.grad for p in layer.params])) == pytest.approx(0.05, rel=1e-5)


def test_wav2vec2s_weight_normed_positional_convolution_is_one_layer() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(config)
    name = "encoder.pos_conv_embed.conv"
    key = f"{name}.parametrizations.weight"
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", 1e-3, {key: "RenormalizeL2PerLayer"}
    )
    assert type(normalizer.rules[name]).__name__ == "RenormalizeL2PerLayer"
    conv = model.get_submodule(name)
    model(torch.randn(2, 400)).last_hidden_state.pow(2).sum().backward()
    before = [p.grad.clone() for p in conv.parameters()]
    report = normalizer.apply()
    assert float(report.layer_norms[name]) == pytest.approx(layer_norm(before), rel=1e-5)
    assert layer_norm([p.grad for p in conv.parameters()]) == pytest.approx(1.0, rel=1e-5)
    # the Hugging Face callback resolves the part's name for the Trainer's model too
    from gradclip.integrations.transformers import GradientNormalizationCallback

    callback = GradientNormalizationCallback("ClipL2PerLayer", 1e-3, {key: "None"})
    callback._ensure(model)
    assert callback.normalizer is not None
    assert callback.normalizer.rules[name] == gradclip.NoNormalization()
