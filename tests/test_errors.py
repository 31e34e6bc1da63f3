"""Bad input: a clear error, raised before any gradient changes."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from helpers import TinyRNN, backward_once, grads_of, mlp
from torch import nn

import gradclip


def assert_untouched(
    model: nn.Module, action: Callable[[], object], error: type, match: str
) -> None:
    before = grads_of(model)
    with pytest.raises(error, match=match):
        action()
    after = grads_of(model)
    for b, a in zip(before, after):
        if b is None or a is None:
            assert b is None and a is None
        elif a.device.type == "meta":
            assert b.device.type == "meta" and a.shape == b.shape
        elif a.is_sparse:
            assert torch.equal(a.to_dense(), b.to_dense())
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("threshold", "error", "match"),
    [
        (0.0, ValueError, "finite number > 0"),
        (-1.0, ValueError, "finite number > 0"),
        (math.nan, ValueError, "finite number > 0"),
        (math.inf, ValueError, "finite number > 0"),
        ("1.0", TypeError, "real number"),
        (None, TypeError, "real number"),
        (True, TypeError, "real number"),
        (torch.ones(2), TypeError, "real number"),
    ],
)
def test_invalid_threshold(threshold: object, error: type, match: str) -> None:
    model = TinyRNN()
    backward_once(model, scale=100.0)
    assert_untouched(
        model, lambda: gradclip.normalize_(model, "ClipL2PerLayer", threshold), error, match
    )  # type: ignore[arg-type]
    assert_untouched(
        model,
        lambda: gradclip.GradientNormalizer(model, "ClipL2PerLayer", threshold),
        error,
        match,  # type: ignore[arg-type]
    )
    assert_untouched(
        model,
        lambda: gradclip.GradientNormalizer(
            model, "ClipL2PerLayer", 1.0, overrides={"rnn": ("ClipL2PerParamType", threshold)}
        ),
        error,
        match,
    )


def test_threshold_as_0d_tensor_is_accepted() -> None:
    model = mlp(1)
    backward_once_linear(model)
    gradclip.normalize_(model, "ClipL2PerLayer", torch.tensor(0.5))  # type: ignore[arg-type]


def backward_once_linear(model: nn.Module) -> None:
    model(torch.randn(3, 8)).pow(2).sum().backward()


def test_unknown_mode_lists_both_spellings() -> None:
    model = TinyRNN()
    backward_once(model)
    with pytest.raises(
        ValueError, match="unknown gradient normalization mode 'ClipL2PerLayr'"
    ) as info:
        gradclip.normalize_(model, "ClipL2PerLayr")
    message = str(info.value)
    assert "(did you mean 'ClipL2PerLayer'?)" in message
    assert "'ClipL2PerLayer' / 'CLIP_L2_PER_LAYER'" in message
    for typo, meant in [
        ("clip_l2_per_param", "ClipL2PerParamType"),
        ("renorm_l2_per_layer", "RenormalizeL2PerLayer"),
    ]:
        with pytest.raises(ValueError, match=rf"\(did you mean '{meant}'\?\)"):
            gradclip.GradientNormalization.parse(typo)
    with pytest.raises(ValueError) as far:
        gradclip.GradientNormalization.parse("xyz")
    assert "did you mean" not in str(far.value)  # nothing close: no guess
    assert "'RenormalizeL2PerParamType'" in message
    assert_untouched(model, lambda: gradclip.normalize_(model, 3), TypeError, "mode must be")  # type: ignore[arg-type]
    assert_untouched(
        model,
        lambda: gradclip.normalize_(model, gradclip.ClipL2PerLayer),
        TypeError,
        "strategy object",  # type: ignore[arg-type]
    )
    assert_untouched(
        model,
        lambda: gradclip.GradientNormalizer(model, "ClipL2PerLayer", overrides={"rnn": "Clip"}),
        ValueError,
        "unknown gradient normalization mode",
    )


def test_override_key_matching_nothing_lists_layer_names() -> None:
    model = TinyRNN()
    backward_once(model)
    with pytest.raises(KeyError, match="'encoder' matches no layer") as info:
        gradclip.GradientNormalizer(model, "ClipL2PerLayer", overrides={"encoder": "None"})
    assert "'embed', 'rnn', 'head'" in str(info.value)
    with pytest.raises(KeyError, match="matches no layer"):
        gradclip.GradientNormalizer(model, "ClipL2PerLayer", overrides={"blocks.*": "None"})


def test_malformed_override_value() -> None:
    model = TinyRNN()
    with pytest.raises(ValueError, match=r"\(mode, threshold\) pair"):
        gradclip.GradientNormalizer(
            model, "ClipL2PerLayer", overrides={"rnn": ("ClipL2PerLayer", 1.0, 2)}
        )
    with pytest.raises(ValueError, match="'mode'"):
        gradclip.GradientNormalizer(model, "ClipL2PerLayer", overrides={"rnn": {"threshold": 1.0}})


def test_sparse_gradient_is_refused_before_anything_changes() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(10, 4, sparse=True))
    model[0](torch.randn(2, 4)).pow(2).sum().mul(100).backward()
    model[1](torch.tensor([1, 2])).sum().backward()
    assert model[1].weight.grad.is_sparse
    assert_untouched(
        model,
        lambda: gradclip.normalize_(model, "ClipL2PerLayer", 0.1),
        TypeError,
        "dense gradients only",
    )


def test_complex_gradient_is_refused_before_anything_changes() -> None:
    model = mlp(2)
    backward_once_linear(model)
    complex_param = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    complex_param.grad = torch.ones(3, dtype=torch.complex64)
    model.register_parameter("z", complex_param)
    assert_untouched(
        model, lambda: gradclip.normalize_(model, "ClipL2PerLayer", 0.1), TypeError, "complex"
    )


def test_layer_on_two_devices_is_refused_before_anything_changes() -> None:
    model = mlp(2)
    backward_once_linear(model)
    meta = nn.Parameter(torch.zeros(3, device="meta"))
    meta.grad = torch.zeros(3, device="meta")
    model[1].register_parameter("extra", meta)
    assert_untouched(
        model,
        lambda: gradclip.normalize_(model, "ClipL2PerLayer", 1e-3),
        RuntimeError,
        "different devices",
    )


def test_error_on_a_later_step_also_leaves_gradients_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Embedding(10, 4, sparse=False))
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1e-3)
    model[0](torch.randn(2, 4)).pow(2).sum().backward()
    model[1](torch.tensor([1, 2])).sum().backward()
    normalizer.apply()
    model[1].weight.grad = model[1].weight.grad.to_sparse()
    model[0].weight.grad.mul_(1e6)
    assert_untouched(model, normalizer.apply, TypeError, "dense gradients only")


def test_target_that_is_not_parameters() -> None:
    with pytest.raises(TypeError, match="target must be"):
        gradclip.normalize_(42, "ClipL2PerLayer")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a tensor"):
        gradclip.normalize_([[1.0, 2.0]], "ClipL2PerLayer")  # type: ignore[list-item]
    with pytest.raises(TypeError, match="mixes tensors and lists"):
        gradclip.normalize_([nn.Parameter(torch.zeros(1)), [nn.Parameter(torch.zeros(1))]], "None")  # type: ignore[list-item]
    with pytest.raises(TypeError, match="layer names must be strings"):
        gradclip.normalize_({1: [nn.Parameter(torch.zeros(1))]}, "None")  # type: ignore[dict-item]


def test_attach_to_something_that_is_not_an_optimizer() -> None:
    normalizer = gradclip.GradientNormalizer(mlp(1), "ClipL2PerLayer")
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        normalizer.attach("sgd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        normalizer.attach(mlp(1))  # type: ignore[arg-type]
