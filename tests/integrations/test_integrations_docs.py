"""The examples of the integrations page's trainer sections run and print what the page says.

Each ``python`` block of those sections runs in a fresh namespace in a temporary
directory. What a block promises is in its comments: ``print(x)  # 8: why`` promises
a line ``8``, and comment lines after a ``print`` without one (in a loop) promise
those lines; they must appear in the output, in order.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning.pytorch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PAGE = Path(__file__).parents[2] / "docs" / "integrations.md"
SECTIONS = ("Checkpoints and resuming", "Several optimizers", "Logging in the trainers")


def _blocks() -> list[tuple[str, str]]:
    text = PAGE.read_text()
    out = []
    for match in re.finditer(r"^## (.+)$", text, re.M):
        if match.group(1) not in SECTIONS:
            continue
        end = text.find("\n## ", match.end())
        body = text[match.end() : end if end >= 0 else len(text)]
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", body, re.S)):
            out.append((f"{match.group(1)} [{i}]", block))
    return out


def _promised(block: str) -> list[str]:
    lines, out, after_print = block.splitlines(), [], False
    for line in lines:
        stripped = line.strip()
        if "print(" in line and "  # " in line:
            out.append(line.split("  # ", 1)[1].split(": ", 1)[0].strip())
            after_print = False
        elif "print(" in line:
            after_print = True
        elif after_print and stripped.startswith("# "):
            out.append(stripped[2:])
        elif stripped and not stripped.startswith("#") and not line.startswith(" "):
            after_print = False
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend
    yield
    torch.set_num_threads(threads)


def test_the_sections_have_examples() -> None:
    names = [name.split(" [")[0] for name, _ in _blocks()]
    assert set(names) == set(SECTIONS) and len(names) >= 4


@pytest.mark.parametrize(("name", "block"), _blocks(), ids=[n for n, _ in _blocks()])
@pytest.mark.usefixtures("one_thread")
def test_example_prints_what_the_page_says(
    name: str, block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    promised = _promised(block)
    assert promised, f"{name} promises no output"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, name, "exec"), {"__name__": "__docs__"})
    printed = [line.strip() for line in out.getvalue().splitlines()]
    at = 0
    for line in promised:
        assert line in printed[at:], f"{name}: expected {line!r} in the output {printed}"
        at = printed.index(line, at) + 1
