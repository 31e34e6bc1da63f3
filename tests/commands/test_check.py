"""`gradclip check`: the layer table, and every error on one line of stderr with status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradclip.commands import check
from gradclip.commands.cli import main

MODELS = """
from torch import nn

def build():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

def broken():
    raise RuntimeError("no weights at /data/ckpt.pt")

def silent_failure():
    raise KeyError("ckpt")

def not_a_model():
    return 3

class Zoo:
    small = staticmethod(build)

INSTANCE = nn.Linear(2, 2)
NOT_A_MODEL = 3
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "gc_check_models.py").write_text(MODELS)
    (tmp_path / "gc_check_import_fails.py").write_text("raise ImportError('needs cuda')\n")
    (tmp_path / "gc_check_syntax.py").write_text("def (:\n")
    (tmp_path / "good.json").write_text(
        json.dumps({"gradientNormalization": "ClipL2PerLayer", "layers": {"2": "None"}})
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("gc_check_models", "gc_check_import_fails", "gc_check_syntax"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def _check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(["check", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_prints_the_layer_table(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = _check(capsys, "good.json", "--model", "gc_check_models:build")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "parameters", "mode"]
    assert any(line.startswith("0 ") and "ClipL2PerLayer(threshold=1.0)" in line for line in lines)
    assert any(line.startswith("2 ") and "None()" in line for line in lines)


@pytest.mark.parametrize(
    "model", ["gc_check_models:build", "gc_check_models:Zoo.small", "torch.nn:Tanh"]
)
def test_model_specs(folder: Path, capsys: pytest.CaptureFixture[str], model: str) -> None:
    (folder / "empty.json").write_text("{}")
    assert _check(capsys, "empty.json", "--model", model)[0] == 0


ERRORS = [
    # (config file, --model, what the one line must say)
    ("good.json", "gc_check_models:INSTANCE", "good.json: override key '2' matches no layer"),
    ("bad.json", "gc_check_models:build", "bad.json: config: unknown key 'gradientNormalisation'"),
    ("nope.yaml", "gc_check_models:build", "nope.yaml: No such file or directory"),
    ("broken.yaml", "gc_check_models:build", "broken.yaml: line 2, column 1:"),
    ("twice.json", "gc_check_models:build", "twice.json: duplicate key 'mode'"),
    ("good.json", "gc_check_models:broken", "gc_check_models:broken() raised RuntimeError: no wei"),
    ("good.json", "gc_check_models:silent_failure", "silent_failure() raised KeyError: ckpt"),
    ("good.json", "gc_check_models:not_a_model", "not_a_model() gave a int, not a torch.nn.Module"),
    ("good.json", "gc_check_models:NOT_A_MODEL", "is a int, not a torch.nn.Module or a factory"),
    ("good.json", "gc_check_models:missing", "'gc_check_models' has no attribute 'missing'"),
    ("good.json", "gc_check_models:Zoo.big", "'gc_check_models.Zoo' has no attribute 'big'"),
    ("good.json", "gc_check_import_fails:build", "cannot import 'gc_check_import_fails': Import"),
    ("good.json", "gc_check_syntax:build", "cannot import 'gc_check_syntax': SyntaxError"),
    ("good.json", "no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
    ("good.json", "no_colon", "--model must look like 'package.module:factory'"),
]


@pytest.mark.parametrize(("config", "model", "message"), ERRORS)
def test_every_error_is_one_line_with_status_2(
    folder: Path, capsys: pytest.CaptureFixture[str], config: str, model: str, message: str
) -> None:
    (folder / "bad.json").write_text(json.dumps({"gradientNormalisation": "None"}))
    (folder / "broken.yaml").write_text("mode: None\n- item\n")
    (folder / "twice.json").write_text('{"mode": "None", "mode": "ClipL2PerLayer"}')
    status, out, err = _check(capsys, config, "--model", model)
    assert status == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("gradclip check: error: ")
    assert message in err
    # The file is named once, however the error came about.
    assert err.count(config) <= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["good.json"], "gradclip check: error: the following arguments are required: --model"),
        ([], "gradclip check: error: the following arguments are required: config, --model"),
        # argparse reports unknown options from the top-level parser
        (["good.json", "--model", "m:f", "--bogus"], "gradclip: error: unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line_too(
    folder: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status, out, err = _check(capsys, *argv)
    assert status == 2 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(message)
    assert "--help)" in err  # where to read the usage instead


# -- the usage line says how the command was run ----------------------------------------
def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), *sys.path])}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd, check=False)


def test_python_m_gradclip_names_itself_so(folder: Path) -> None:
    done = _run([sys.executable, "-m", "gradclip", "check", "nope.json", "--model", "x:y"], folder)
    assert done.returncode == 2
    assert done.stderr.startswith("python -m gradclip check: error: cannot load the model")
    usage = _run([sys.executable, "-m", "gradclip", "check"], folder)
    assert usage.returncode == 2
    assert usage.stderr.startswith("python -m gradclip check: error: the following arguments")
    helped = _run([sys.executable, "-m", "gradclip", "--help"], folder)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m gradclip ")


def test_the_console_script_names_itself_gradclip(folder: Path) -> None:
    script = Path(sys.executable).with_name("gradclip")
    if not script.exists():
        pytest.skip("the gradclip console script is not installed next to this Python")
    helped = _run([str(script), "--help"], folder)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: gradclip ")
    failed = _run([str(script), "check", "nope.json", "--model", "x:y"], folder)
    assert failed.stderr.startswith("gradclip check: error: cannot load the model")
    usage = _run([str(script), "check"], folder)
    assert usage.returncode == 2
    assert usage.stderr.startswith("gradclip check: error: the following arguments")


def test_python_m_gradclip_check_end_to_end(folder: Path) -> None:
    pytest.importorskip("yaml")
    (folder / "c.yaml").write_text(
        textwrap.dedent(
            """\
            gradientNormalization: ClipL2PerParamType
            gradientNormalizationThreshold: 1e-3
            """
        )
    )
    done = _run(
        [sys.executable, "-m", "gradclip", "check", "c.yaml", "--model", "gc_check_models:build"],
        folder,
    )
    assert done.returncode == 0, done.stderr
    assert "ClipL2PerParamType(threshold=0.001)" in done.stdout


def test_an_unexpected_error_building_the_normalizer_is_one_line_too(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("layout\nexploded")

    monkeypatch.setattr(check.GradientNormalizer, "from_config", broken)
    status, out, err = _check(capsys, "good.json", "--model", "gc_check_models:build")
    assert (status, out) == (2, "")
    assert err == "gradclip check: error: good.json: RuntimeError: layout exploded\n"


def test_load_model_errors_are_model_errors() -> None:
    with pytest.raises(check.ModelError, match="no_colon"):
        check.load_model("no_colon")


def test_the_console_script_imports_the_model_from_the_current_directory(folder: Path) -> None:
    """As `python -m` does; nothing on PYTHONPATH but gradclip itself (not the folder)."""
    script = Path(sys.executable).with_name("gradclip")
    if not script.exists():
        pytest.skip("the gradclip console script is not installed next to this Python")
    package_root = str(Path(check.__file__).parents[2])  # src/, where gradclip is
    env = {**os.environ, "PYTHONPATH": package_root}
    done = subprocess.run(
        [str(script), "check", "good.json", "--model", "gc_check_models:build"],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ClipL2PerLayer(threshold=1.0)" in done.stdout


@pytest.mark.parametrize(
    ("name", "text", "says"),
    [
        ("empty.json", "", "the file is empty;"),
        ("empty.toml", "\n\n", "the file is empty;"),
        ("empty.yaml", "", "the file is empty;"),
        ("comments.yaml", "# mode: ClipL2PerLayer\n", "the file holds no configuration"),
    ],
)
def test_an_empty_configuration_file_says_so(
    folder: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, says: str
) -> None:
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    (folder / name).write_text(text)
    status, out, err = _check(capsys, name, "--model", "gc_check_models:build")
    assert (status, out) == (2, "")
    assert err.startswith(f"gradclip check: error: {name}: {says}")
    assert '"mode": "ClipL2PerLayer"' in err and "NoneType" not in err
