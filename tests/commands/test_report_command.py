"""`gradclip report`: the summary, the JSON contract, the plot and clean errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradclip.commands.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "insight"))
from recorded import train

KEYS = {"steps", "layers", "first_nonfinite", "spikes", "vanishing", "no_gradient", "dominant"}


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rep") / "run.gcrec"

    def faults(step: int, model: nn.Sequential) -> None:
        if step == 150:
            for p in model[6].parameters():
                p.grad.mul_(1e4)  # type: ignore[union-attr]
        if step == 180:
            model[4].weight.grad[0, 0] = math.inf  # type: ignore[index]

    train(path, 200, mode="ClipL2PerLayer", after_backward=faults)
    return path


def test_json_has_the_contract_keys_and_is_strict(
    recording: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(recording), "--json"]) == 0
    text = capsys.readouterr().out
    found = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert set(found) >= KEYS
    assert found["steps"] == 200 and found["layers"] == ["0", "2", "4", "6", "8"]
    assert found["first_nonfinite"] == {
        "step": 180,
        "layer": "4",
        "parameters": ["4.weight", "4.bias"],
        "reason": "the non-finite layer nearest the loss, by the observed backward order",
    }
    assert [(s["step"], s["layer"]) for s in found["spikes"]] == [(150, "6")]
    assert {"layer", "share"} == set(found["dominant"][0])


def test_the_summary_and_the_plot(
    recording: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    image = tmp_path / "run.png"
    assert main(["report", str(recording), "--plot", str(image)]) == 0
    out = capsys.readouterr().out
    assert "first non-finite gradient: step 180, layer 4 (4.weight, 4.bias)" in out
    assert "step 150: 6 norm" in out
    assert image.stat().st_size > 10_000
    assert image.read_bytes()[:4] == b"\x89PNG"


def test_a_plot_of_300_layers_groups_its_rows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import gradclip
    from gradclip import insight
    from gradclip.insight.plot import plot_run

    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(300)])
    normalizer = gradclip.GradientNormalizer(model, None, record=tmp_path / "big.gcrec")
    for _ in range(30):
        model.zero_grad()
        model(torch.randn(3, 2)).sum().backward()
        normalizer.apply()
    normalizer.close()
    run = insight.load(tmp_path / "big.gcrec")
    plot_run(run, tmp_path / "big.png", max_rows=60)
    assert (tmp_path / "big.png").stat().st_size > 10_000


def test_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.gcrec").write_bytes(b"\x00\xff garbage")
    assert main(["report", str(tmp_path / "bad.gcrec")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a gradclip recording" in err
    assert main(["calibrate", str(tmp_path / "bad.gcrec"), "-o", str(tmp_path / "x.txt")]) == 2
    assert main(["report", str(tmp_path / "missing.gcrec")]) == 2
