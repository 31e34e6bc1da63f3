"""What the documentation tests share: code blocks of Markdown pages, the doctest setup.

Conventions for the code blocks of `README.md` and `docs/*.md` (see `test_docs.py`):

- a `python` block runs, in page order, in one namespace per page, in a fresh
  working directory;
- a `text` block right after a `python` block (only blank lines between) is what
  that block prints, compared exactly;
- a block with a `title="name"` attribute is a file: it is written under that
  name in the page's working directory before the page runs, and not executed;
- a `console` block holds `$ command` lines, each followed by its output; the
  commands run in the page's working directory and their output is compared;
- `yaml`, `toml` and `json` blocks without a title are gradclip configurations
  and must pass `gradclip.config.parse_config`;
- `bash`, `java` and other blocks are shown, never run.

Docstring examples (`Examples:` sections with `>>>` lines) run as doctests
against the setup shown at the top of `docs/api.md` (`api_setup_code`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

_FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})[ ]*(?P<info>[^`]*?)[ ]*$")
_ATTR = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page.

    Attributes:
        page: the page it is on.
        start: 1-based line of the opening fence.
        end: 1-based line of the closing fence.
        lang: the first word of the info string (`python`, `text`, ...), lower case.
        attrs: `key="value"` attributes of the info string (`title`).
        code: the content, dedented by the fence's indentation.
        after_blank: only blank lines separate it from the previous block.
    """

    page: Path
    start: int
    end: int
    lang: str
    attrs: dict[str, str] = field(default_factory=dict)
    code: str = ""
    after_blank: bool = False

    @property
    def title(self) -> str | None:
        return self.attrs.get("title")

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.start}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order (tabbed content included)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    previous_end = 0
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"]
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            line = lines[j]
            closing = line.strip() == fence and line[: len(line) - len(line.lstrip())] == indent
            if closing:
                break
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        else:
            raise ValueError(f"{page}:{i + 1}: code block never closed")
        words = info.split()
        between = lines[previous_end:i] if found else ["x"]
        found.append(
            Block(
                page=page,
                start=i + 1,
                end=j + 1,
                lang=words[0].lower().lstrip(".{") if words else "",
                attrs=dict(_ATTR.findall(info)),
                code="\n".join(body) + "\n",
                after_blank=all(not line.strip() for line in between),
            )
        )
        previous_end = j + 1
        i = j + 1
    return found


def api_setup_code() -> str:
    """The setup every docstring example runs against: the first python block of docs/api.md."""
    for block in blocks(DOCS / "api.md"):
        if block.lang == "python":
            return block.code
    raise LookupError("docs/api.md shows no python setup block for the docstring examples")
