"""DL4J-style configuration: dict, JSON, YAML, TOML; strict validation; ``gradclip check``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradclip
from gradclip.commands import check
from gradclip.config import ConfigError, parse_config


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        self.rnn = nn.RNN(8, 8)
        self.head = nn.Linear(8, 2)


DL4J = {
    "gradientNormalization": "ClipL2PerLayer",
    "gradientNormalizationThreshold": 0.5,
    "layers": {
        "rnn": {
            "gradientNormalization": "ClipElementWiseAbsoluteValue",
            "gradientNormalizationThreshold": 0.25,
        },
        "head": "None",
        "encoder.*": {"gradientNormalizationThreshold": 2.0},
    },
}
SNAKE = {
    "gradient_normalization": "clip_l2_per_layer",
    "gradient_normalization_threshold": 0.5,
    "overrides": {
        "rnn": {"mode": "CLIP_ELEMENT_WISE_ABSOLUTE_VALUE", "threshold": 0.25},
        "head": None,
        "encoder.*": {"threshold": 2.0},
    },
}


def _expected(model: nn.Module) -> gradclip.GradientNormalizer:
    return gradclip.GradientNormalizer(
        model,
        "ClipL2PerLayer",
        0.5,
        overrides={
            "rnn": ("ClipElementWiseAbsoluteValue", 0.25),
            "head": "None",
            "encoder.*": ("ClipL2PerLayer", 2.0),
        },
    )


@pytest.mark.parametrize("config", [DL4J, SNAKE], ids=["dl4j", "snake_case"])
def test_dict_config_matches_the_python_api(config: dict[str, object]) -> None:
    model = Net()
    normalizer = gradclip.GradientNormalizer.from_config(model, config)
    assert normalizer.strategies == _expected(model).strategies
    assert normalizer.describe() == _expected(model).describe()
    assert normalizer.strategies["encoder.0"] == gradclip.ClipL2PerLayer(2.0)
    assert normalizer.strategies["rnn"] == gradclip.ClipElementWiseAbsoluteValue(0.25)
    assert normalizer.strategies["head"] == gradclip.NoNormalization()


def test_config_applies_like_the_python_api() -> None:
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 5, 4) * 10
    for model in (a, b):
        out, _ = model.rnn(model.encoder(x))
        model.head(out).pow(2).sum().backward()
    gradclip.GradientNormalizer.from_config(a, DL4J).apply()
    _expected(b).apply()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad)  # type: ignore[arg-type]


def _write(tmp_path, name: str, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_json_yaml_toml_files_agree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("yaml")
    json_path = _write(tmp_path, "c.json", json.dumps(DL4J))
    yaml_path = _write(
        tmp_path,
        "c.yaml",
        """
        gradientNormalization: ClipL2PerLayer
        gradientNormalizationThreshold: 0.5
        layers:
          rnn:
            gradientNormalization: ClipElementWiseAbsoluteValue
            gradientNormalizationThreshold: 0.25
          head: None
          "encoder.*":
            gradientNormalizationThreshold: 2.0
        """,
    )
    toml_path = _write(
        tmp_path,
        "c.toml",
        """
        gradient_normalization = "ClipL2PerLayer"
        gradient_normalization_threshold = 0.5

        [layers.rnn]
        gradient_normalization = "ClipElementWiseAbsoluteValue"
        gradient_normalization_threshold = 0.25

        [layers]
        head = "None"
        "encoder.*" = { gradient_normalization_threshold = 2.0 }
        """,
    )
    want = parse_config(DL4J)
    for path in (json_path, yaml_path, toml_path, str(yaml_path)):
        assert parse_config(path) == want
    model = Net()
    assert gradclip.GradientNormalizer.from_config(model, toml_path).strategies == (
        _expected(model).strategies
    )


def test_list_of_layer_entries_dl4j_style() -> None:
    config = {
        "gradientNormalization": "RenormalizeL2PerLayer",
        "layers": [
            {"layerName": "rnn", "gradientNormalization": "ClipL2PerParamType"},
            {"name": "head", "gradientNormalization": "None"},
        ],
    }
    normalizer = gradclip.GradientNormalizer.from_config(Net(), config)
    assert normalizer.strategies["rnn"] == gradclip.ClipL2PerParamType(1.0)
    assert normalizer.strategies["head"] == gradclip.NoNormalization()
    assert normalizer.strategies["encoder.0"] == gradclip.RenormalizeL2PerLayer()


def test_defaults() -> None:
    assert parse_config({}) == {
        "mode": "None",
        "threshold": 1.0,
        "overrides": {},
        "measure_all": False,
    }
    assert parse_config({"mode": "ClipL2PerLayer", "measureAll": True})["measure_all"] is True


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"gradientNormalisation": "ClipL2PerLayer"}, "did you mean 'gradientNormalization'"),
        ({"gradientNormalizationTreshold": 1.0}, "did you mean 'gradientNormalizationThreshold'"),
        ({"layer": {}}, "did you mean 'layers'"),
        ({"layers": {"rnn": {"treshold": 1.0}}}, r"layers\['rnn'\]: unknown key 'treshold'"),
        ({"mode": "ClipL2PerLayer", "gradientNormalization": "None"}, "both set mode"),
        ({"mode": "ClipL3"}, "unknown gradient normalization mode 'ClipL3'"),
        ({"mode": 3}, "the mode must be a name"),
        ({"mode": "ClipL2PerLayer", "threshold": -1}, "finite number > 0"),
        ({"mode": "ClipL2PerLayer", "threshold": "1.0"}, "real number"),
        ({"mode": "ClipL2PerLayer", "threshold": True}, "real number"),
        ({"layers": {"rnn": {}}}, "needs gradientNormalization or a threshold"),
        ({"layers": [{"gradientNormalization": "None"}]}, "needs its layerName"),
        ({"layers": "rnn"}, "layers must be a mapping or a list"),
        ({"measure_all": "yes"}, "measure_all must be true or false"),
        (["ClipL2PerLayer"], "a configuration is a mapping"),
    ],
)
def test_strict_validation(config: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(config)  # type: ignore[arg-type]


def test_unknown_layer_lists_the_layers() -> None:
    with pytest.raises(KeyError, match=r"encoder\.0"):
        gradclip.GradientNormalizer.from_config(Net(), {"layers": {"decoder": "None"}})


def test_files_bad_suffix_missing_and_malformed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"ends in \.json"):
        parse_config(_write(tmp_path, "c.ini", "x"))
    with pytest.raises(ConfigError, match="No such file"):
        parse_config(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=r"c\.json"):
        parse_config(_write(tmp_path, "c.json", "{not json"))
    with pytest.raises(ConfigError, match=r"c\.toml"):
        parse_config(_write(tmp_path, "c.toml", "= 1"))


def test_yaml_is_loaded_safely(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("yaml")
    marker = tmp_path / "executed"
    evil = _write(
        tmp_path,
        "evil.yaml",
        f"""
        gradientNormalization: !!python/object/apply:os.system ["touch {marker}"]
        """,
    )
    with pytest.raises(ConfigError, match=r"evil\.yaml"):
        parse_config(evil)
    assert not marker.exists()


# -- the check command ---------------------------------------------------------------


@pytest.fixture
def factory_module(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    _write(
        tmp_path,
        "gc_check_models.py",
        """
        from torch import nn

        def build():
            return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

        INSTANCE = nn.Linear(2, 2)
        NOT_A_MODEL = 3
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _check(config: str, model: str) -> int:
    parser = argparse.ArgumentParser()
    check.add_arguments(parser)
    return check.run(parser.parse_args([config, "--model", model]))


def test_check_prints_the_layer_table(factory_module, capsys) -> None:  # type: ignore[no-untyped-def]
    config = _write(
        factory_module,
        "c.json",
        json.dumps({"gradientNormalization": "ClipL2PerLayer", "layers": {"2": "None"}}),
    )
    assert _check(str(config), "gc_check_models:build") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "parameters", "mode"]
    assert any(line.startswith("0 ") and "ClipL2PerLayer(threshold=1.0)" in line for line in lines)
    assert any(line.startswith("2 ") and "None()" in line for line in lines)
    # "2" is not a layer of nn.Linear(2, 2): the unmatched key is an error listing the layers.
    assert _check(str(config), "gc_check_models:INSTANCE") == 2
    assert "'2'" in capsys.readouterr().err


def test_check_reports_errors(factory_module, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = _write(factory_module, "bad.json", json.dumps({"gradientNormalisation": "None"}))
    assert _check(str(bad), "gc_check_models:build") == 2
    assert "did you mean 'gradientNormalization'" in capsys.readouterr().err
    good = _write(factory_module, "good.json", "{}")
    assert _check(str(good), "gc_check_models:NOT_A_MODEL") == 2
    assert "not a torch.nn.Module" in capsys.readouterr().err
    assert _check(str(good), "no_colon") == 2
    assert _check(str(good), "gc_check_models:INSTANCE") == 0


@pytest.mark.skipif(
    importlib.util.find_spec("gradclip.commands.demo") is None
    or importlib.util.find_spec("gradclip.commands.bench") is None,
    reason="the CLI imports every subcommand; demo/bench not in this tree yet",
)
def test_python_m_gradclip_check(factory_module) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("yaml")
    config = _write(factory_module, "c.yaml", "gradientNormalization: ClipL2PerParamType\n")
    env = {
        **os.environ,
        "PYTHONPATH": f"{factory_module}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradclip",
            "check",
            str(config),
            "--model",
            "gc_check_models:build",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ClipL2PerParamType(threshold=1.0)" in done.stdout
