"""The public API: names, layers, overrides, attach, report."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TinyRNN, backward_once, fill_grads, mlp
from torch import nn

import gradclip
from gradclip import GradientNormalization


def test_enum_accepts_dl4j_and_python_spellings() -> None:
    member = GradientNormalization.CLIP_L2_PER_LAYER
    assert GradientNormalization("ClipL2PerLayer") is member
    assert GradientNormalization("clip_l2_per_layer") is member
    assert GradientNormalization("CLIP_L2_PER_LAYER") is member
    assert GradientNormalization("None") is GradientNormalization.NONE
    assert [m.value for m in GradientNormalization] == [
        "None",
        "RenormalizeL2PerLayer",
        "RenormalizeL2PerParamType",
        "ClipElementWiseAbsoluteValue",
        "ClipL2PerLayer",
        "ClipL2PerParamType",
    ]


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


def test_single_layer_clip_equals_torch_clip_grad_norm() -> None:
    torch.manual_seed(0)
    ours, theirs = nn.Linear(16, 8), nn.Linear(16, 8)
    theirs.load_state_dict(ours.state_dict())
    for scale in (0.01, 1.0, 100.0):
        for m in (ours, theirs):
            torch.manual_seed(1)
            m.zero_grad()
            (m(torch.randn(5, 16)) * scale).pow(2).sum().backward()
        report = gradclip.normalize_(ours, "ClipL2PerLayer", 1.0)
        total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        assert float(report.layer_norms[""]) == pytest.approx(float(total), rel=1e-6)
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


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


def test_mixed_modes_in_one_apply_match_each_mode_alone() -> None:
    model = TinyRNN()
    backward_once(model, scale=1e3)
    original = {n: p.grad.clone() for n, p in model.named_parameters()}
    gradclip.GradientNormalizer(
        model,
        "ClipL2PerLayer",
        0.3,
        overrides={
            "rnn": ("ClipElementWiseAbsoluteValue", 0.01),
            "head": "RenormalizeL2PerParamType",
        },
    ).apply()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters()}
    for layer, mode, t in (
        ("embed", "ClipL2PerLayer", 0.3),
        ("rnn", "ClipElementWiseAbsoluteValue", 0.01),
        ("head", "RenormalizeL2PerParamType", 1.0),
    ):
        module = getattr(model, layer)
        for n, p in module.named_parameters():
            p.grad = original[f"{layer}.{n}"].clone()
        gradclip.normalize_(module, mode, t)
        for n, p in module.named_parameters():
            assert torch.equal(p.grad, mixed[f"{layer}.{n}"]), (layer, n)


def test_attach_applies_before_every_step_and_detaches() -> None:
    model = mlp(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    normalizer = gradclip.GradientNormalizer(model, "RenormalizeL2PerLayer")
    handle = normalizer.attach(optimizer)
    fill_grads(model)
    optimizer.step()
    assert normalizer.last_report is not None
    assert float(
        model[0].weight.grad.norm() ** 2 + model[0].bias.grad.norm() ** 2
    ) == pytest.approx(1.0, rel=1e-5)
    handle.remove()
    grads = fill_grads(model)
    optimizer.step()
    assert torch.equal(model[0].weight.grad, grads[0])


def test_attach_with_grad_scaler_sees_unscaled_gradients() -> None:
    model = mlp(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1.0)
    normalizer.attach(optimizer)
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    scaler.scale(model(x).pow(2).sum() * 100).backward()
    unscaled = [p.grad / 1024.0 for p in model.parameters()]
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    reported = normalizer.last_report.to_dict()["layer_norms"]
    expected = math.sqrt(sum(float(g.double().norm()) ** 2 for g in unscaled[:2]))
    assert reported["0"] == pytest.approx(expected, rel=1e-5)
    assert float(
        torch.cat([p.grad.flatten() for p in model[0].parameters()]).norm()
    ) == pytest.approx(1.0, rel=1e-5)


def test_report_is_device_resident_and_readable() -> None:
    model = TinyRNN()
    backward_once(model, scale=100.0)
    report = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", 1.0, overrides={"head": ("ClipElementWiseAbsoluteValue", 0.1)}
    ).apply()
    assert isinstance(report.layer_norms["rnn"], torch.Tensor)
    assert report.layer_norms["rnn"].dim() == 0
    assert report.tensor_norms.dtype == torch.float32
    data = report.to_dict()
    assert set(data["layer_norms"]) == {"embed", "rnn", "head"}
    assert data["layer_norms"]["head"] is None  # element-wise clipping measures no norm
    assert data["changed"]["head"] is None  # ... and cannot tell if it changed anything
    assert data["changed"]["rnn"] is True
    assert data["param_norms"]["rnn.weight_hh_l0"] > 0
    text = str(report)
    assert "rnn" in text and "weight_hh_l0=" in text and "?" in text
    assert report.changed_layers() == ["embed", "rnn"]


def test_measure_all_reports_every_norm() -> None:
    model = mlp(2)
    grads = fill_grads(model)
    report = gradclip.GradientNormalizer(
        model, "ClipElementWiseAbsoluteValue", 0.1, overrides={"1": None}, measure_all=True
    ).apply()
    data = report.to_dict()
    assert data["layer_norms"]["1"] == pytest.approx(
        float(torch.cat([g.flatten() for g in grads[2:]]).double().norm()), rel=1e-6
    )
    assert torch.equal(model[1].weight.grad, grads[2])


def test_half_precision_norms_in_float32_and_no_overflow() -> None:
    layer = nn.Linear(64, 64, bias=False).half()
    layer.weight.grad = torch.full((64, 64), 6e4, dtype=torch.float16)
    torch_copy = layer.weight.grad.clone()
    torch_norm = torch.linalg.vector_norm(torch_copy)
    assert torch.isinf(torch_norm)  # torch's own fp16 norm overflows here
    report = gradclip.normalize_(layer, "ClipL2PerLayer", 1.0)
    assert report.layer_norm_vector.dtype == torch.float32
    assert float(report.layer_norms[""]) == pytest.approx(64 * 6e4, rel=1e-5)
    assert layer.weight.grad.dtype == torch.float16
    assert float(layer.weight.grad.float().norm()) == pytest.approx(1.0, rel=2e-3)


def test_bfloat16_gradients() -> None:
    layer = nn.Linear(32, 32).to(torch.bfloat16)
    for p in layer.parameters():
        p.grad = torch.full(p.shape, 1e15, dtype=torch.bfloat16)
    gradclip.normalize_(layer, "ClipL2PerLayer", 2.0)
    norm = float(torch.cat([p.grad.float().flatten() for p in layer.parameters()]).norm())
    assert norm == pytest.approx(2.0, rel=2e-2)


def test_float32_norm_overflow_gives_zeros_not_nan() -> None:
    p = nn.Parameter(torch.zeros(1000))
    p.grad = torch.full((1000,), 1e20)
    report = gradclip.normalize_([p], "ClipL2PerLayer", 1.0)
    assert math.isinf(report.to_dict()["layer_norms"][""])
    assert torch.equal(p.grad, torch.zeros(1000))
    p.grad = torch.full((1000,), 1e20)
    gradclip.normalize_([p], "RenormalizeL2PerParamType")
    assert not torch.isnan(p.grad).any()


def test_all_zero_layer_stays_zero_under_renormalization() -> None:
    model = mlp(1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for mode in ("RenormalizeL2PerLayer", "RenormalizeL2PerParamType"):
        report = gradclip.normalize_(model, mode)
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
        assert report.to_dict()["changed"]["0"] is False


def test_nan_gradients_propagate_by_default() -> None:
    model = mlp(2)
    fill_grads(model)
    model[0].weight.grad[0, 0] = float("nan")
    gradclip.normalize_(model, "ClipL2PerLayer", 1.0)
    assert torch.isnan(model[0].weight.grad[0, 0])
    assert float(
        torch.cat([p.grad.flatten() for p in model[1].parameters()]).norm()
    ) == pytest.approx(1.0, rel=1e-5)


def test_compiled_and_ddp_style_wrappers_keep_names() -> None:
    model = mlp(2)
    wrapped = nn.DataParallel(model)
    assert [layer.name for layer in gradclip.build_layers(wrapped)] == ["0", "1"]


def test_no_gradient_at_all_gives_an_empty_report() -> None:
    model = mlp(2)
    report = gradclip.GradientNormalizer(model, "ClipL2PerLayer").apply()
    assert report.layer_names == []
    assert report.to_dict()["layer_norms"] == {}
    model[1].weight.grad = torch.ones(8, 8)
    report = gradclip.normalize_(model, "ClipL2PerLayer", 1.0)
    assert report.layer_names == ["1"]
    assert float(model[1].weight.grad.norm()) == pytest.approx(1.0)


def test_attach_refuses_gradients_still_scaled_for_a_fused_optimizer() -> None:
    model = mlp(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    gradclip.GradientNormalizer(model, "ClipL2PerLayer").attach(optimizer)
    grads = fill_grads(model)
    optimizer.grad_scale = torch.tensor(1024.0)  # what GradScaler sets for fused optimizers
    with pytest.raises(RuntimeError, match="unscale_"):
        optimizer.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    del optimizer.grad_scale
    optimizer.step()


def test_parameters_swapped_behind_the_hooks_are_found() -> None:
    model = mlp(2)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1.0)
    for name in ("weight", "bias"):  # as fully_shard does: straight into _parameters
        old = model[0]._parameters[name]
        model[0]._parameters[name] = nn.Parameter(old.detach().clone())
    for p in model[0].parameters():
        p.grad = torch.full_like(p, 10.0)
    report = normalizer.apply()
    assert report.layer_names == ["0"]
    assert float(
        torch.cat([p.grad.flatten() for p in model[0].parameters()]).norm()
    ) == pytest.approx(1.0)


def test_normalize_cache_does_not_keep_the_model_alive() -> None:
    import gc
    import weakref

    model = mlp(2)
    fill_grads(model)
    gradclip.normalize_(model, "ClipL2PerLayer", 1.0)
    gradclip.normalize_(model, gradclip.ZClip())
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_compiled_module_keeps_the_names_of_the_original() -> None:
    model = TinyRNN()
    compiled = torch.compile(model)
    assert [layer.name for layer in gradclip.build_layers(compiled)] == ["embed", "rnn", "head"]
    normalizer = gradclip.GradientNormalizer(compiled, "ClipL2PerLayer", overrides={"rnn": None})
    backward_once(model, scale=100.0)
    report = normalizer.apply()
    assert report.layer_names == ["embed", "rnn", "head"]


def test_gradients_with_a_graph_are_normalized_without_recording_history() -> None:
    model = mlp(2)
    x = torch.randn(3, 8)
    loss = model(x).pow(2).sum() * 100
    loss.backward(create_graph=True)
    assert model[0].weight.grad.requires_grad
    report = gradclip.normalize_(model, "ClipL2PerLayer", 1.0)
    assert report.tensor_norms.grad_fn is None
    norm = torch.cat([p.grad.detach().flatten() for p in model[0].parameters()]).norm()
    assert float(norm) == pytest.approx(1.0, rel=1e-5)
    for p in model.parameters():
        p.grad = None  # break the graph cycle create_graph makes


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


# -- copies, pickling, threads ----------------------------------------------------------------
def test_deep_copy_of_model_and_normalizer_drives_the_copy() -> None:
    import copy

    model = mlp(2)
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(warmup_steps=2))
    fill_grads(model)
    normalizer.apply()
    bundle = copy.deepcopy({"model": model, "normalizer": normalizer})
    twin, twin_normalizer = bundle["model"], bundle["normalizer"]
    fill_grads(model, seed=1)
    original = [p.grad.clone() for p in model.parameters()]
    fill_grads(twin, seed=1)
    twin_normalizer.apply()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), original))  # untouched
    normalizer.apply()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))
    # the normalizer alone, copied, brings its own copy of the model
    alone = copy.deepcopy(normalizer)
    assert all(p is not q for p, q in zip(alone.layers[0].params, normalizer.layers[0].params))


def test_a_normalizer_pickles_with_its_model_and_state() -> None:
    import pickle

    model = mlp(2)
    normalizer = gradclip.GradientNormalizer(model, gradclip.AutoClip(50.0, history_size=4))
    for seed in range(3):
        fill_grads(model, seed=seed)
        normalizer.apply()
    restored = pickle.loads(pickle.dumps(normalizer))
    twin = restored._module()
    assert twin is not None and twin is not model
    fill_grads(model, seed=7)
    fill_grads(twin, seed=7)
    normalizer.apply()
    restored.apply()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), twin.parameters()))


def test_steps_from_several_threads_are_not_lost() -> None:
    import threading

    model = mlp(2)
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(warmup_steps=1000))
    fill_grads(model)
    threads = [
        threading.Thread(target=lambda: [normalizer.apply() for _ in range(25)]) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (slot,) = normalizer.state_dict()["rules"].values()
    assert int(slot["rows"]["*"]["count"]) == 100


# -- configuration details ----------------------------------------------------------------------
def test_explicit_default_threshold_reaches_overrides_under_a_rule_default() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    normalizer = gradclip.GradientNormalizer(
        model, gradclip.AdaptiveGradClip(0.01), threshold=5.0, overrides={"1": "ClipL2PerLayer"}
    )
    assert normalizer.rules["1"] == gradclip.ClipL2PerLayer(5.0)
    assert normalizer.rules["0"] == gradclip.AdaptiveGradClip(0.01)


def test_a_parameter_replaced_behind_the_hooks_is_normalized() -> None:
    model = mlp(2)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerParamType", 0.5)
    fill_grads(model)
    normalizer.apply()
    model[1]._parameters["weight"] = nn.Parameter(torch.randn(8, 8))  # no hook sees this
    fill_grads(model, seed=2)
    normalizer.apply()
    assert float(model[1].weight.grad.norm()) == pytest.approx(0.5, rel=1e-6)


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
