"""The rules on cases their own tests do not build, against independent references.

References are written here, in float64, from the authors' definitions: DL4J's
modes, ``torch.nn.utils.clip_grad_norm_``'s formula for any p, timm's
``adaptive_clip_grad`` (unit norms over every dim but the first, ``eps`` on the
weight norm) and, for the per-layer adaptive rules, one global-scope normalizer
per layer fed the same gradients.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.rule import Rule
from gradclip.rules.dl4j import resolve_rule

# The relative error each gradient dtype holds: one multiply rounded in that dtype
# (2 ulp), against the largest element of the tensor.
TOLERANCE = {torch.float64: 1e-14, torch.float32: 3e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}


class Odd(nn.Module):
    """Parameters of every shape a rule meets: conv, embedding, norm gains, 0-d, 1 element."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3).to(dtype)
        self.conv1d = nn.Conv1d(2, 4, 5).to(dtype)
        self.embed = nn.Embedding(11, 6).to(dtype)
        self.norm = nn.LayerNorm(6).to(dtype)
        self.one = nn.Linear(1, 1, bias=False).to(dtype)
        self.scalar = nn.Parameter(torch.tensor(0.7, dtype=dtype))


def _fill(model: nn.Module, scale: float, seed: int) -> list[torch.Tensor]:
    """Gradients drawn in float64, then cast; returns them in float64."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
        p.grad = g.to(p.dtype)
        out.append(p.grad.double().clone())  # a copy even when already float64
    return out


def _layers(model: nn.Module) -> dict[str, list[int]]:
    """Layer name → indices into model.parameters(), as gradclip groups them."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    layers: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        own = [index[id(p)] for p in module.parameters(recurse=False)]
        if own:
            layers[name] = own
    return layers


def _dl4j_reference(mode: str, t: float, grads: list[torch.Tensor], layer: list[int]) -> None:
    """DL4J's preApply on one layer's float64 gradients, in place."""
    layer_norm = math.sqrt(sum(float(grads[i].square().sum()) for i in layer))
    for i in layer:
        g, norm = grads[i], float(grads[i].norm())
        if mode == "RenormalizeL2PerLayer" and layer_norm > 0:
            grads[i] = g / layer_norm
        elif mode == "RenormalizeL2PerParamType" and norm > 0:
            grads[i] = g / norm
        elif mode == "ClipL2PerLayer" and layer_norm > t:
            grads[i] = g * (t / layer_norm)
        elif mode == "ClipL2PerParamType" and norm > t:
            grads[i] = g / (norm / t)
        elif mode == "ClipElementWiseAbsoluteValue":
            grads[i] = g.clamp(-t, t)


def _assert_close(model: nn.Module, expected: list[torch.Tensor], tol: float) -> None:
    for (name, p), e in zip(model.named_parameters(), expected):
        assert p.grad is not None
        scale = max(float(e.abs().max()), 1e-300)
        err = float((p.grad.double() - e).abs().max()) / scale
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


DL4J_MODES = [
    "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
    "ClipElementWiseAbsoluteValue",
]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("mode", DL4J_MODES)
def test_dl4j_modes_on_odd_shapes_and_dtypes(dtype: torch.dtype, mode: str) -> None:
    model = Odd(dtype)
    expected = _fill(model, 1.0, seed=1)
    threshold = 0.5
    for layer in _layers(model).values():
        _dl4j_reference(mode, threshold, expected, layer)
    gradclip.normalize_(model, mode, threshold)
    _assert_close(model, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("scale", [1e-30, 1e30, 1e-150, 1e150])
@pytest.mark.parametrize("mode", DL4J_MODES)
def test_dl4j_modes_on_tiny_and_huge_float64_norms(scale: float, mode: str) -> None:
    model = Odd(torch.float64)
    expected = _fill(model, scale, seed=2)
    for layer in _layers(model).values():
        _dl4j_reference(mode, 0.5 * scale, expected, layer)
    gradclip.normalize_(model, mode, 0.5 * scale)
    _assert_close(model, expected, 1e-14)


@pytest.mark.parametrize("mode", DL4J_MODES[:4])
def test_all_zero_gradients_stay_zero_and_unchanged(mode: str) -> None:
    # DL4J divides a zero norm by 1e-5 instead: 0 / 1e-5 is 0 again
    model = Odd(torch.float32)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    report = gradclip.normalize_(model, mode, 1.0)
    assert all(not bool(p.grad.any()) for p in model.parameters())
    assert not any(report.to_dict()["changed"].values())


def _agc_reference(
    model: nn.Module, grads: list[torch.Tensor], clipping: float, eps: float
) -> None:
    """timm.utils.agc.adaptive_clip_grad, in float64, in place on ``grads``."""
    for i, p in enumerate(model.parameters()):
        g, w = grads[i], p.detach().double()
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
        w_norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
        bound = w_norm.clamp(min=eps) * clipping
        grads[i] = torch.where(g_norm < bound, g, g * (bound / g_norm.clamp(min=1e-6)))


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_agc_unitwise_on_conv_embedding_and_0d_params(dtype: torch.dtype) -> None:
    model = Odd(dtype)
    with torch.no_grad():
        model.conv.weight[2].zero_()  # a zero unit: its bound is eps * clipping
        model.norm.weight.normal_()
    expected = _fill(model, 0.1, seed=3)
    before = list(expected)
    _agc_reference(model, expected, clipping=0.05, eps=1e-3)
    report = gradclip.normalize_(model, gradclip.AdaptiveGradClip(clipping=0.05))
    _assert_close(model, expected, TOLERANCE[dtype])
    clipped = [
        name
        for name, ids in _layers(model).items()
        if any(not torch.equal(expected[i], before[i]) for i in ids)
    ]
    assert "conv" in clipped and report.changed_layers() == clipped


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_global_norm_over_mixed_dtypes_matches_float64(p: float) -> None:
    model = nn.Sequential(
        nn.Linear(4, 3).double(),
        nn.Linear(3, 2).bfloat16(),
        nn.Linear(2, 2).half(),
        nn.Linear(2, 2),
    )
    expected = _fill(model, 1.0, seed=4)
    total = (
        max(float(g.abs().max()) for g in expected)
        if p == math.inf
        else (sum(float(g.abs().pow(p).sum()) for g in expected) ** (1 / p))
    )
    coef = min(1.0, 0.5 / (total + 1e-6))
    report = gradclip.normalize_(model, gradclip.ClipGlobalNorm(0.5, norm_type=p))
    assert report.to_dict()["stats"]["global_norm"] == pytest.approx(total, rel=1e-6)
    for param, e in zip(model.parameters(), expected):
        # the half-precision tensors' norms are float32 (far better than torch's, which
        # are rounded to their dtype): the shared coefficient holds float32's precision
        _assert_close_one(param, e * coef, max(TOLERANCE[param.dtype], 3e-7))
    # float64 alone: torch's own function, to the last bits
    single = nn.Linear(5, 3).double()
    twin = copy.deepcopy(single)
    for param, g in zip(twin.parameters(), _fill(single, 3.0, seed=5)):
        param.grad = g
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5, norm_type=p)
    gradclip.normalize_(single, gradclip.ClipGlobalNorm(0.5, norm_type=p))
    for param, e in zip(single.parameters(), twin.parameters()):
        torch.testing.assert_close(param.grad, e.grad, rtol=1e-14, atol=0)


def _assert_close_one(param: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert param.grad is not None
    err = float((param.grad.double() - expected).abs().max()) / float(expected.abs().max())
    assert err <= tol


PER_LAYER: list[tuple[Callable[[str], Rule], str]] = [
    (lambda scope: gradclip.ZClip(warmup_steps=4, scope=scope), "zclip"),  # type: ignore[arg-type]
    (lambda scope: gradclip.AutoClip(30, history_size=7, scope=scope), "ring"),  # type: ignore[arg-type]
    (lambda scope: gradclip.AutoClip(0, history_size=None, scope=scope), "p0"),  # type: ignore[arg-type]
    (lambda scope: gradclip.AutoClip(100, history_size=3, scope=scope), "p100"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize("make", [m for m, _ in PER_LAYER], ids=[i for _, i in PER_LAYER])
def test_per_layer_state_follows_layers_removed_added_and_idle(make: Callable[[str], Rule]) -> None:
    """scope="layer" is one global-scope rule per layer, whatever the model does."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 2), "c": nn.Linear(2, 2)})
    twins: dict[str, tuple[nn.Module, gradclip.GradientNormalizer]] = {}

    def twin(name: str) -> None:
        copy_ = copy.deepcopy(model[name])
        twins[name] = (copy_, gradclip.GradientNormalizer(copy_, make("global")))

    for name in model:
        twin(name)
    normalizer = gradclip.GradientNormalizer(model, make("layer"))
    gen = torch.Generator().manual_seed(5)
    for step in range(90):
        if step == 30:
            del model["c"]
            del twins["c"]
        if step in (45, 60):  # a new layer, then "c" again: both start afresh
            name = "d" if step == 45 else "c"
            model[name] = nn.Linear(2, 2)
            twin(name)
        for name, layer in model.items():
            idle = name == "b" and 15 <= step < 25  # no gradient: its statistics wait
            for p, q in zip(layer.parameters(), twins[name][0].parameters()):
                g = torch.randn(p.shape, generator=gen) * (1 + 20 * (step % 13 == 0))
                p.grad = q.grad = None if idle else g
                if not idle:
                    q.grad = g.clone()
        normalizer.apply()
        for name, (copy_, alone) in twins.items():
            if any(q.grad is not None for q in copy_.parameters()):
                alone.apply()
            for p, q in zip(model[name].parameters(), copy_.parameters()):
                if p.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def _spiky_grads(model: nn.Module, step: int, gen: torch.Generator) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * (1 + 10 * (step % 37 == 0))
    if step in (5, 50, 333, 350):
        model[1].weight.grad[0, 0] = math.nan if step % 2 else math.inf


@pytest.mark.parametrize("nonfinite", ["zero", "skip"])
@pytest.mark.parametrize(
    "rule",
    [
        gradclip.chain(
            gradclip.ZClip(warmup_steps=5, scope="layer"),
            None,
            gradclip.AutoClip(50, history_size=20),
        ),
        gradclip.AutoClip(10, history_size=None, scope="layer"),
    ],
    ids=["chain", "autoclip-unbounded"],
)
def test_resume_continues_identically_through_bad_steps(rule: Rule, nonfinite: str) -> None:
    def build() -> tuple[nn.Module, gradclip.GradientNormalizer]:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(3, 2))
        return model, gradclip.GradientNormalizer(model, rule, nonfinite=nonfinite)

    first, one = build()
    gen = torch.Generator().manual_seed(3)
    for step in range(200):  # past the unbounded history's growth at 64 and 128
        _spiky_grads(first, step, gen)
        one.apply()
    buffer = io.BytesIO()
    torch.save(one.state_dict(), buffer)
    buffer.seek(0)
    second, two = build()
    two.load_state_dict(torch.load(buffer))
    gen_two = copy.deepcopy(gen)
    for step in range(200, 400):
        _spiky_grads(first, step, gen)
        _spiky_grads(second, step, gen_two)
        a, b = one.apply().to_dict(), two.apply().to_dict()
        assert a["stats"] == b["stats"]
        for p, q in zip(first.parameters(), second.parameters()):
            assert torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())
            if nonfinite == "zero":  # a skipped step leaves its gradients as they are
                assert bool(p.grad.isfinite().all())
    assert all(math.isfinite(v) for v in _flat(a["stats"]))


def _flat(stats: dict[str, float | list[float]]) -> list[float]:
    return [v for value in stats.values() for v in (value if isinstance(value, list) else [value])]


REPORTED: list[object] = [
    "ClipL2PerLayer",
    "RenormalizeL2PerParamType",
    ("ClipL2PerParamType", 0.3),
    gradclip.ClipGlobalNorm(1.0, norm_type=math.inf),
    gradclip.ClipGlobalNorm(1.0, norm_type=1),
    gradclip.AdaptiveGradClip(),
    gradclip.AutoClip(50),
    gradclip.AutoClip(0, scope="layer"),
    gradclip.ZClip(warmup_steps=1),
    gradclip.chain(gradclip.ClipGlobalNorm(0.5), ("ClipL2PerLayer", 0.1)),
    gradclip.chain(("ClipL2PerLayer", 0.3), ("ClipL2PerLayer", 0.3)),
    gradclip.chain(None, ("ClipL2PerLayer", 0.3)),
    gradclip.chain(("ClipElementWiseAbsoluteValue", 0.5), gradclip.ClipGlobalNorm(0.5)),
    gradclip.chain(("ClipL2PerLayer", 0.3), ("ClipElementWiseAbsoluteValue", 100.0)),
    ("ClipElementWiseAbsoluteValue", 0.5),
]


@pytest.mark.parametrize("mode", REPORTED, ids=lambda m: str(m)[:40])
def test_changed_flags_say_what_happened_to_the_gradients(mode: object) -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3), nn.Conv2d(2, 3, 3))
    rule = resolve_rule(*mode) if isinstance(mode, tuple) else resolve_rule(mode)
    normalizer = gradclip.GradientNormalizer(model, rule)
    gen = torch.Generator().manual_seed(7)
    for _ in range(4):
        for i, p in enumerate(model.parameters()):  # the conv's gradients are small
            p.grad = torch.randn(p.shape, generator=gen) * (1.0 if i < 4 else 0.01)
        before = [p.grad.clone() for p in model.parameters()]
        report = normalizer.apply()
        flags, device = report.to_dict()["changed"], report.changed
        for name, layer in model.named_children():
            changed = any(
                not torch.equal(p.grad, before[j])
                for j, p in enumerate(model.parameters())
                if any(p is q for q in layer.parameters())
            )
            # None: the rule cannot tell (element-wise clipping); then the device flag
            # is only a lower bound
            assert flags[name] in (changed, None)
            assert bool(device[name]) == changed or (flags[name] is None and changed)
