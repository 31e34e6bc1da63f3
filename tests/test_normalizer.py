"""The public API: names, layers, overrides, attach, report."""

from __future__ import annotations

import math
from typing import Any

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


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): nn.Linear(4, 4) for i in range(3)})
        self.stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.head: nn.Module = nn.Linear(4, 1)


@pytest.mark.parametrize(
    ("remove", "gone"),
    [
        (lambda m: m.blocks.pop("1"), "blocks.1"),
        (lambda m: m.blocks.__delitem__("2"), "blocks.2"),
        (lambda m: m.stack.__delitem__(0), "stack.2"),  # a ModuleList renumbers the rest
        (lambda m: delattr(m, "head"), "head"),
    ],
    ids=["ModuleDict.pop", "del ModuleDict[k]", "del ModuleList[i]", "del model.head"],
)
def test_a_deleted_submodule_leaves_the_layers_and_its_stale_gradient_alone(
    remove: Any, gone: str
) -> None:
    # deletions call no registration hook: a global rule would keep counting the
    # removed layer's last gradient, and keep scaling it
    model = _Blocks()
    normalizer = gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(1.0))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert gone in normalizer.apply().layer_names
    removed = [p for p in model.parameters()]
    remove(model)
    kept = {id(p) for p in model.parameters()}
    stale = [p for p in removed if id(p) not in kept]
    before = [p.grad.clone() for p in stale]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    report = normalizer.apply()
    assert gone not in report.layer_names
    owners = [n for n, m in model.named_modules() if any(True for _ in m.parameters(False))]
    assert report.layer_names == owners
    assert all(torch.equal(p.grad, b) for p, b in zip(stale, before))
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-6)


def test_an_override_of_a_deleted_module_raises_at_every_step_until_fixed() -> None:
    model = _Blocks()
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.1, {"head": "None"})
    del model.head
    model.out = nn.Linear(4, 3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    for _ in range(2):  # the old layout (with "head", without "out") is never stepped
        with pytest.raises(KeyError, match="override key 'head' matches no layer"):
            normalizer.apply()
        assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    normalizer.reconfigure(overrides={"out": "None"})
    report = normalizer.apply()
    assert report.layer_names[-1] == "out" and "head" not in report.layer_names


def test_a_module_deleted_from_a_custom_grouping_is_seen() -> None:
    stack = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    normalizer = gradclip.GradientNormalizer({"stack": stack}, gradclip.ClipGlobalNorm(1.0))
    for p in stack.parameters():
        p.grad = torch.ones_like(p)
    normalizer.apply()
    del stack[2]
    for p in stack.parameters():
        p.grad = torch.ones_like(p)
    normalizer.apply()
    total = torch.cat([p.grad.flatten() for p in stack.parameters()]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-6)


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


def test_gradients_with_a_graph_are_normalized_without_recording_history() -> None:
    model = mlp(2)
    x = torch.randn(3, 8)
    loss = model(x).pow(2).sum() * 100
    with pytest.warns(UserWarning, match="create_graph=True"):  # torch's own, about the cycle
        loss.backward(create_graph=True)
    assert model[0].weight.grad.requires_grad
    report = gradclip.normalize_(model, "ClipL2PerLayer", 1.0)
    assert report.tensor_norms.grad_fn is None
    norm = torch.cat([p.grad.detach().flatten() for p in model[0].parameters()]).norm()
    assert float(norm) == pytest.approx(1.0, rel=1e-5)
    for p in model.parameters():
        p.grad = None  # break the graph cycle create_graph makes


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
