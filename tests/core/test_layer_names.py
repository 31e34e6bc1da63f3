"""Layer names and override keys as users write them: wrappers, tied modules, near misses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.layers import build_layers, match_overrides, tied_layers


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.alias = self.body  # one module under a second name
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight
        self.biased = nn.Linear(4, 10)  # tied weight, a bias of its own: a layer
        self.biased.weight = self.wte.weight


def test_tied_layers_maps_modules_without_parameters_of_their_own() -> None:
    model = Tied()
    assert [layer.name for layer in build_layers(model)] == ["wte", "body", "biased"]
    assert tied_layers(model) == {"alias": "body", "lm_head": "wte"}


def test_wrapper_components_are_left_out_of_names_and_keys() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = nn.Sequential(
        nn.ModuleDict({"inner": torch.compile(nn.Linear(3, 3), backend="eager")}),
        checkpoint_wrapper(nn.Linear(3, 3)),
    )
    names = [layer.name for layer in build_layers(model)]
    assert names == ["0.inner", "1"]
    assert match_overrides(
        names, {"0.inner._orig_mod": "x", "1._checkpoint_wrapped_module": "y"}
    ) == {
        "0.inner": "0.inner._orig_mod",
        "1": "1._checkpoint_wrapped_module",
    }


NAMES = ["encoder.0", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "blocks.3.mlp.fc"]


@pytest.mark.parametrize(
    ("key", "closest"),
    [
        ("encodr", "encoder.0"),
        ("transformer.h.0.atn.c_attn", "transformer.h.0.attn.c_attn"),
        ("blocks.3.mpl", "blocks.3.mlp.fc"),
    ],
)
def test_key_of_no_layer_names_the_closest(key: str, closest: str) -> None:
    with pytest.raises(KeyError, match=f"closest layer is '{closest}'"):
        match_overrides(NAMES, {key: "None"})


def test_key_far_from_every_layer_names_none() -> None:
    with pytest.raises(KeyError) as info:
        match_overrides(["embed", "rnn", "head"], {"zzzzzz": "None"})
    assert "closest" not in str(info.value) and "'embed', 'rnn', 'head'" in str(info.value)


def test_a_plain_normalizer_accepts_the_name_of_a_tied_module() -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"wte": emb, "lm_head": head})
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", overrides={"lm_head": None})
    assert normalizer.rules == {"wte": gradclip.NoNormalization()}
    with pytest.raises(ValueError, match="both name layer 'wte'"):
        gradclip.GradientNormalizer(
            model, "ClipL2PerLayer", overrides={"lm_head": None, "wte": "ClipL2PerParamType"}
        )
