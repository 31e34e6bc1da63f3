"""Per-layer norms to TensorBoard (read back from the event file) and to CSV."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

import gradclip
from gradclip.integrations.writers import CSVNormWriter, layer_norm_values, write_tensorboard


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(5, 4, generator=g)).pow(2).sum().backward()


def _layer_norm(model: nn.Module, layer: str) -> float:
    module = dict(model.named_modules())[layer]
    grads = [p.grad.flatten() for p in module.parameters(recurse=False)]  # type: ignore[union-attr]
    return float(torch.cat(grads).double().norm())


def test_layer_norm_values_match_the_gradients() -> None:
    model = _model()
    _backward(model, 0)
    expected = {name: _layer_norm(model, name) for name in ("0", "2")}
    values = layer_norm_values(gradclip.normalize_(model, "ClipL2PerLayer", 0.1))
    assert values.keys() == expected.keys()
    for name, value in values.items():
        assert value == pytest.approx(expected[name], rel=1e-6)


def test_tensorboard_scalars_and_histogram(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tb = pytest.importorskip("torch.utils.tensorboard")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.1)
    expected: list[dict[str, float]] = []
    with tb.SummaryWriter(str(tmp_path)) as writer:
        for step in range(3):
            _backward(model, step)
            expected.append({name: _layer_norm(model, name) for name in ("0", "2")})
            write_tensorboard(normalizer.apply(), writer, step)
    events = accumulator.EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {"grad_norm/0", "grad_norm/2"}
    assert tags["histograms"] == ["grad_norm/layers"]
    for name in ("0", "2"):
        scalars = events.Scalars(f"grad_norm/{name}")
        assert [s.step for s in scalars] == [0, 1, 2]
        for s, want in zip(scalars, expected):
            assert s.value == pytest.approx(want[name], rel=1e-5)
    histograms = events.Histograms("grad_norm/layers")
    assert [h.step for h in histograms] == [0, 1, 2]
    for h, want in zip(histograms, expected):
        assert h.histogram_value.num == 2
        assert h.histogram_value.min == pytest.approx(min(want.values()), rel=1e-5)
        assert h.histogram_value.max == pytest.approx(max(want.values()), rel=1e-5)


class _FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int | None]] = []
        self.histograms: list[tuple[str, list[float], int | None]] = []

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        self.scalars.append((tag, scalar_value, global_step))

    def add_histogram(self, tag: str, values: torch.Tensor, global_step: int | None = None) -> None:
        self.histograms.append((tag, values.tolist(), global_step))


def test_unmeasured_layers_are_left_out() -> None:
    model = _model()
    _backward(model, 0)
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.1, overrides={"2": None})
    writer = _FakeWriter()
    write_tensorboard(normalizer.apply(), writer, 7, prefix="g/")
    assert [(t, s) for t, _, s in writer.scalars] == [("g/0", 7)]
    assert len(writer.histograms) == 1 and len(writer.histograms[0][1]) == 1


def test_csv_one_row_per_step_one_column_per_layer(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 0.1, overrides={"2": "None"})
    path = tmp_path / "norms.csv"
    expected = []
    with CSVNormWriter(path) as log:
        for step in range(4):
            _backward(model, step)
            expected.append(_layer_norm(model, "0"))
            log.write(normalizer.apply(), step)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "0", "2"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    for row, want in zip(rows[1:], expected):
        assert float(row[1]) == pytest.approx(want, rel=1e-6)
        assert row[2] == ""  # "None" layers are not measured


def test_csv_params_columns_and_append(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    path = tmp_path / "p.csv"
    _backward(model, 0)
    with CSVNormWriter(path, params=True) as log:
        log.write(gradclip.normalize_(model, "ClipL2PerParamType", 0.1), 0)
    _backward(model, 1)
    want = float(model[0].weight.grad.double().norm())  # type: ignore[union-attr]
    with CSVNormWriter(path, params=True, append=True) as log:
        log.write(gradclip.normalize_(model, "ClipL2PerParamType", 0.1), 1)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(rows) == 3 and float(rows[2][1]) == pytest.approx(want, rel=1e-6)
    assert all(math.isfinite(float(x)) for x in rows[2][1:])


def test_csv_rejects_a_layer_that_is_not_a_column(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    _backward(model, 0)
    report = gradclip.normalize_(model, "ClipL2PerLayer", 0.1)
    log = CSVNormWriter(tmp_path / "x.csv", columns=["0"])
    with pytest.raises(ValueError, match=r"layers \['2'\] are not columns"):
        log.write(report, 0)
    log.close()


def test_csv_append_refuses_a_different_header(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "x.csv"
    path.write_text("step,a,b\n")
    model = _model()
    _backward(model, 0)
    with pytest.raises(ValueError, match="has the columns"):
        CSVNormWriter(path, append=True).write(gradclip.normalize_(model, "ClipL2PerLayer"), 0)
