"""DL4J-style configuration: dict, JSON, YAML, TOML; strict validation; bounded, one-line errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradclip
from gradclip.config import MAX_DEPTH, MAX_FILE_BYTES, ConfigError, load_config, parse_config


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


# -- errors name the file once, on one line ------------------------------------------------
def _error(source: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(source)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("missing.json", None),
        ("c.json", "{not json"),
        ("c.toml", "= 1"),
        ("c.yaml", "a: [1,\n b: 2\n"),
        ("c.yaml", "gradientNormalization: !!python/name:os.system\n"),
        ("c.json", '{"gradientNormalisation": "None"}'),
        ("c.yaml", "layers:\n  rnn: {treshold: 1.0}\n"),
        ("c.json", b"\xff\xfe{}"),
    ],
)
def test_file_errors_name_the_file_once_on_one_line(
    tmp_path: Path, name: str, text: str | bytes | None
) -> None:
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    message = str(_error(path))
    assert message.startswith(f"{path}: ")
    assert message.count(name) == 1, message
    assert "\n" not in message
    assert _error(path).source == str(path)


def test_errors_of_a_mapping_name_no_file() -> None:
    error = _error({"gradientNormalisation": "None"})
    assert error.source is None
    assert str(error).startswith("config: unknown key 'gradientNormalisation'")


# -- repeated keys --------------------------------------------------------------------------
def test_json_refuses_a_repeated_key_by_name(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"mode": "ClipL2PerLayer", "layers": {"rnn": "None", "rnn": "None"}}')
    assert str(_error(path)) == f"{path}: duplicate key 'rnn'"


def test_yaml_refuses_a_repeated_key_by_name_and_line(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = _write(
        tmp_path,
        "c.yaml",
        """\
        gradientNormalization: ClipL2PerLayer
        layers:
          rnn: None
          head: None
          rnn: ClipL2PerParamType
        """,
    )
    assert str(_error(path)) == f"{path}: duplicate key 'rnn' (line 5)"
    top = _write(tmp_path, "top.yaml", "threshold: 1.0\nthreshold: 2.0\n")
    assert str(_error(top)) == f"{top}: duplicate key 'threshold' (line 2)"


def test_yaml_equal_keys_in_different_mappings_are_fine(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = _write(
        tmp_path,
        "c.yaml",
        """\
        gradientNormalizationThreshold: 2.0
        layers:
          rnn: {gradientNormalizationThreshold: 0.5}
          head: {gradientNormalizationThreshold: 0.25}
        """,
    )
    assert parse_config(path)["overrides"]["head"]["threshold"] == 0.25


def test_toml_refuses_a_repeated_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.toml", 'mode = "None"\nmode = "ClipL2PerLayer"\n')
    assert "line 2" in str(_error(path))


# -- YAML numbers -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("written", "value"),
    [("1e-3", 1e-3), ("1E3", 1e3), ("+2.5e-1", 0.25), ("5e+0", 5.0), ("1.0e-3", 1e-3), ("3", 3.0)],
)
def test_yaml_reads_exponent_numbers_as_floats(tmp_path: Path, written: str, value: float) -> None:
    pytest.importorskip("yaml")
    path = _write(
        tmp_path,
        "c.yaml",
        f"gradientNormalization: ClipL2PerLayer\ngradientNormalizationThreshold: {written}\n"
        f"layers:\n  head: {{gradientNormalizationThreshold: {written}}}\n",
    )
    args = parse_config(path)
    assert args["threshold"] == value and isinstance(args["threshold"], float)
    assert args["overrides"]["head"]["threshold"] == value


def test_yaml_quoted_numbers_stay_strings(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = _write(tmp_path, "c.yaml", "mode: ClipL2PerLayer\nthreshold: '1e-3'\n")
    assert "real number" in str(_error(path))
    # A layer named like a number in exponent form is still a name once quoted.
    named = _write(tmp_path, "n.yaml", "layers:\n  '1e3': None\n")
    assert list(parse_config(named)["overrides"]) == ["1e3"]


# -- bounds -----------------------------------------------------------------------------------
def test_a_file_over_the_size_bound_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    # Valid JSON, so only the size can be what is refused.
    path.write_text('{"mode": "None", "pad": "' + "x" * MAX_FILE_BYTES + '"}')
    message = str(_error(path))
    assert message.startswith(f"{path}: larger than 1024 KiB")
    assert "\n" not in message


def test_a_file_at_the_size_bound_is_read(tmp_path: Path) -> None:
    path = tmp_path / "edge.json"
    head = '{"mode": "ClipL2PerLayer"}'
    path.write_text(head + " " * (MAX_FILE_BYTES - len(head)))
    assert path.stat().st_size == MAX_FILE_BYTES
    assert parse_config(path)["mode"] == "ClipL2PerLayer"


def _nested_json(depth: int) -> str:
    return '{"layers": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100, 100_000])
def test_deep_json_is_refused_with_a_clear_message(tmp_path: Path, depth: int) -> None:
    path = tmp_path / "deep.json"
    path.write_text(_nested_json(depth))
    message = str(_error(path))
    assert message == (
        f"{path}: nested more than {MAX_DEPTH} levels deep; a configuration needs 3 "
        "(the top level, layers, one layer's entry)"
    )


def test_nesting_up_to_the_bound_reaches_validation(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text(_nested_json(MAX_DEPTH))
    # Not refused for its depth: the layer list's first entry is what is wrong.
    assert "layers[0]" in str(_error(path))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.yaml", "layers: " + "[" * 50_000 + "]" * 50_000 + "\n"),
        ("deep.yaml", "".join(f"{'  ' * i}k{i}:\n" for i in range(400)) + "  " * 400 + "v\n"),
        ("deep.toml", "layers = " + "[" * 50_000 + "]" * 50_000 + "\n"),
        ("deep.toml", "[" + ".".join(f"k{i}" for i in range(50)) + "]\nx = 1\n"),
    ],
)
def test_deep_yaml_and_toml_are_refused(tmp_path: Path, name: str, text: str) -> None:
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(text)
    assert f"nested more than {MAX_DEPTH} levels deep" in str(_error(path))


def test_a_deep_mapping_is_refused_without_recursion() -> None:
    data: dict[str, object] = {}
    inner = data
    for _ in range(100_000):
        inner["layers"] = {}
        inner = inner["layers"]  # type: ignore[assignment]
    assert "nested more than" in str(_error(data))


def test_load_config_returns_the_data_unvalidated(tmp_path: Path) -> None:
    path = _write(tmp_path, "c.json", '{"anything": [1, 2]}')
    assert load_config(path) == {"anything": [1, 2]}


def test_missing_pyyaml_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "c.yaml", "mode: None\n")
    monkeypatch.setitem(__import__("sys").modules, "yaml", None)  # import yaml -> ImportError
    message = str(_error(path))
    assert (
        message
        == f"{path}: reading YAML needs PyYAML (pip install pyyaml); JSON and TOML need nothing"
    )
