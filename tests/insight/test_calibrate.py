"""Calibrated thresholds: what they clip, the files they are written to, and who reads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from recorded import LAYERS, net, train
from torch import nn

import gradclip
from gradclip import insight
from gradclip.commands.cli import main

SPIKES = {(250, "4"), (610, "8"), (611, "0")}


@pytest.fixture(scope="module")
def spiked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "run.gcrec"
    model = net()
    model[2].requires_grad_(False)

    def spike(step: int, m: nn.Sequential) -> None:
        for s, name in SPIKES:
            if s == step:
                for p in m[int(name)].parameters():
                    p.grad.mul_(1e4)  # type: ignore[union-attr]

    # a clipping run, so that the spikes do not throw the training off its course
    train(
        path, 800, mode=("ClipL2PerLayer"), model=model, after_backward=spike, record_tensors=True
    )
    return path


@pytest.mark.parametrize("percentile", [90.0, 99.0])
def test_thresholds_clip_the_expected_share_and_every_spike(
    spiked: Path, percentile: float
) -> None:
    run = insight.load(spiked)
    cal = insight.calibrate(run, percentile)
    norms, has = run.norms, run.has_gradient()
    assert cal.layers["2"] is None  # frozen: left alone
    for lid, name in enumerate(LAYERS):
        t = cal.layers[name]
        if t is None:
            continue
        # the percentile of the layer's own norms (numpy's definition, to 4 digits)
        assert t == pytest.approx(np.percentile(norms[has[:, lid], lid], percentile), rel=1e-3)
        normal = [i for i, s in enumerate(run.steps) if (int(s), name) not in SPIKES]
        share = float((norms[normal, lid] > t).mean())
        assert share <= (100 - percentile) / 100 + 1e-9
        assert cal.clipped[name] == int((norms[:, lid] > t).sum())
        for step, spiked_name in SPIKES:
            if spiked_name == name:
                assert norms[step, lid] > t


def test_network_and_param_type_scopes(spiked: Path) -> None:
    run = insight.load(spiked)
    network = insight.calibrate(run, 95, "network").config()
    assert set(network) == {"gradientNormalization", "gradientNormalizationThreshold", "layers"}
    assert network["layers"] == {"2": {"gradientNormalization": "None"}}
    per_type = insight.calibrate(run, 95, "param-type")
    assert per_type.mode == "ClipL2PerParamType"
    weights = run.tensor_norms[:, run.header["params"].index("4.weight")]
    biases = run.tensor_norms[:, run.header["params"].index("4.bias")]
    expected = max(np.percentile(weights, 95), np.percentile(biases, 95))
    assert per_type.layers["4"] == pytest.approx(expected, rel=1e-3)


def test_param_type_needs_per_tensor_norms(tmp_path: Path) -> None:
    train(tmp_path / "r.gcrec", 5)
    with pytest.raises(ValueError, match="record_tensors=True"):
        insight.calibrate(insight.load(tmp_path / "r.gcrec"), 95, "param-type")
    with pytest.raises(ValueError, match="percentile"):
        insight.calibrate(insight.load(tmp_path / "r.gcrec"), 0)


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_the_written_file_loads_and_passes_check(
    spiked: Path,
    tmp_path: Path,
    suffix: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / f"calibrated{suffix}"
    assert main(["calibrate", str(spiked), "--percentile", "99", "-o", str(out)]) == 0
    assert "layer thresholds at the 99th percentile of 800 steps" in capsys.readouterr().out
    cal = insight.calibrate(insight.load(spiked), 99)
    text = out.read_text()
    if suffix == ".json":
        assert json.loads(text)["calibration"]["clipped"] == cal.clipped
    else:
        assert f"would have clipped {cal.clipped['4']} of 800 steps (" in text
    normalizer = gradclip.GradientNormalizer.from_config(net(), out)
    rules = normalizer.rules
    assert rules["2"] == gradclip.NoNormalization()
    assert rules["4"] == gradclip.ClipL2PerLayer(cal.layers["4"])
    (tmp_path / "calmodel.py").write_text("from recorded import net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", str(out), "--model", "calmodel:net"]) == 0
    assert "ClipL2PerLayer(threshold=" in capsys.readouterr().out


def test_calibrated_thresholds_clip_the_spikes_in_a_new_run(spiked: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    assert main(["calibrate", str(spiked), "-o", str(out)]) == 0
    model = net()
    normalizer = gradclip.GradientNormalizer.from_config(model, out)
    model(torch.randn(4, 6)).sum().backward()
    for p in model[4].parameters():
        p.grad.mul_(1e4)  # type: ignore[union-attr]
    assert normalizer.apply().to_dict()["changed"]["4"] is True
