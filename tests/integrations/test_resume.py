"""Resuming from a trainer's checkpoint in a fresh process equals the uninterrupted run.

Every run happens in a subprocess (`resume_runs.py`): the uninterrupted 16-step
run leaves its step-8 checkpoint, and a new process resumes from it. Parameters
must be bit-identical on the CPU, and the rules' state equal, for the adaptive
rules in both scopes and for a stateless rule. A resume from a checkpoint without
gradclip's state shows what the state is for: a warning, and other parameters.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = Path(__file__).with_name("resume_runs.py")
TRAINERS = ("lightning", "transformers")
RULES = ("zclip-global", "zclip-layer", "autoclip-global", "autoclip-layer", "stateless")
STRIPPED = "zclip-global"


def _phase(workdir: Path, *args: str) -> list[tuple[subprocess.Popen[str], list[str]]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    out = []
    for trainer in TRAINERS:
        command = [sys.executable, str(SCRIPT), trainer, args[0], str(workdir), *args[1:]]
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        out.append((process, command))
    return out


def _wait(processes: list[tuple[subprocess.Popen[str], list[str]]]) -> str:
    outputs = []
    for process, command in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
        outputs.append(output)
    return "\n".join(outputs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("resume")
    # Each phase in fresh processes, the two trainers side by side.
    _wait(_phase(workdir, "full", *RULES))
    return workdir, _wait(_phase(workdir, "resume", *RULES, "--strip", STRIPPED))


def _load(workdir: Path, trainer: str, rule: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = torch.load(workdir / f"{trainer}-{rule}" / name, weights_only=True)
    return result


def _assert_equal_states(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_equal_states(a[key], b[key])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal_states(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("trainer", TRAINERS)
def test_resumed_run_equals_uninterrupted(runs: tuple[Path, str], trainer: str, rule: str) -> None:
    workdir, output = runs
    full = _load(workdir, trainer, rule, "full.pt")
    resumed = _load(workdir, trainer, rule, "resumed.pt")
    assert full["params"].keys() == resumed["params"].keys()
    for name, value in full["params"].items():
        assert torch.equal(value, resumed["params"][name]), f"{trainer} {rule}: {name} differs"
    _assert_equal_states(full["state"], resumed["state"])
    assert f"WARNING {trainer}-{rule}:" not in output
    (normalizer_state,) = full["state"]["optimizers"]
    if rule == "stateless":
        assert normalizer_state["rules"] == {}
    else:
        (slot,) = normalizer_state["rules"].values()
        if rule.startswith("zclip"):
            assert all(int(row["count"]) == 16 for row in slot["rows"].values())
        if rule.endswith("layer"):
            assert "*" not in slot["rows"] and len(slot["rows"]) > 1


@pytest.mark.parametrize("trainer", TRAINERS)
def test_resume_without_gradclip_state_warns_and_differs(
    runs: tuple[Path, str], trainer: str
) -> None:
    workdir, output = runs
    full = _load(workdir, trainer, STRIPPED, "full.pt")
    stripped = _load(workdir, trainer, STRIPPED, "stripped.pt")
    warned = [line for line in output.splitlines() if f"{trainer}-{STRIPPED}-stripped:" in line]
    assert warned and "start afresh" in warned[0]
    assert any(not torch.equal(v, stripped["params"][k]) for k, v in full["params"].items())
