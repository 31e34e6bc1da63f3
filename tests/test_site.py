"""The built documentation site: docstring examples render as code, maths needs no network.

Builds the site once (`mkdocs build --strict` into a temporary folder) and
reads its HTML with the standard library's parser.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from docs_support import DOCS, ROOT

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")
griffe = pytest.importorskip("griffe")

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


@dataclass
class Quote:
    """A `<blockquote>`: its text, whether it sits directly in another, its doc object."""

    text: str = ""
    nested: bool = False
    owner: str | None = None


@dataclass
class Page(HTMLParser):
    """The facts of one HTML page the tests check."""

    quotes: list[Quote] = field(default_factory=list)
    code: list[str] = field(default_factory=list)  # text of every <pre>
    external: list[str] = field(default_factory=list)  # scripts, styles, images from the web
    maths: int = 0
    unrendered: int = 0  # arithmatex output left as TeX

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)
        # open elements: (tag, attributes, doc-object id, quote index, pre buffer)
        self._stack: list[tuple[str, dict[str, str], list[str | None], Quote | None]] = []
        self._pre: list[list[str]] = []

    def _owner(self) -> str | None:
        for _, _, owner, _ in reversed(self._stack):
            if owner[0] is not None:
                return owner[0]
        return None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        classes = attributes.get("class", "").split()
        if tag in {"script", "img"} and attributes.get("src", "").startswith(("http:", "https:")):
            self.external.append(attributes["src"])
        loads = attributes.get("rel") in {"stylesheet", "preload", "preconnect"}
        if tag == "link" and loads and attributes.get("href", "").startswith(("http:", "https:")):
            self.external.append(attributes["href"])
        if tag == "math":
            self.maths += 1
        if tag in VOID:
            return
        if re.fullmatch(r"h[1-6]", tag) and "doc-heading" in classes:
            # The heading names the doc object (mkdocstrings' enclosing div).
            for _, attributes_up, owner, _ in reversed(self._stack):
                if "doc-object" in attributes_up.get("class", "").split():
                    owner[0] = attributes.get("id")
                    break
        quote = None
        if tag == "blockquote":
            parent = self._stack[-1][0] if self._stack else None
            quote = Quote(nested=parent == "blockquote", owner=self._owner())
            self.quotes.append(quote)
        if tag == "pre":
            self._pre.append([])
        self._stack.append((tag, attributes, [None], quote))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        while self._stack:
            open_tag, _, _, _ = self._stack.pop()
            if open_tag == "pre" and self._pre:
                self.code.append("".join(self._pre.pop()))
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, _, _, quote in self._stack:
            if quote is not None:
                quote.text += data
        for buffer in self._pre:
            buffer.append(data)
        if "\\(" in data or "\\[" in data:
            classes = [a.get("class", "") for _, a, _, _ in self._stack]
            if any("arithmatex" in c for c in classes):
                self.unrendered += 1


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Page]:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages: dict[str, Page] = {}
    for path in sorted(out.rglob("*.html")):
        page = Page()
        page.feed(path.read_text(encoding="utf-8"))
        pages[str(path.relative_to(out))] = page
    return pages


@functools.cache
def _package() -> object:
    return griffe.load("gradclip", search_paths=[str(ROOT / "src")], resolve_aliases=True)


@functools.cache
def _source_file(object_id: str) -> str | None:
    """The source file (relative to the repository) of a documented object, e.g. `gradclip.X`."""
    package: Any = _package()
    try:
        obj = package if object_id == "gradclip" else package[object_id.removeprefix("gradclip.")]
        return str(Path(obj.filepath).resolve().relative_to(ROOT))
    except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError):
        return None


def test_docstring_examples_are_not_rendered_as_blockquotes(site: dict[str, Page]) -> None:
    wrong = []
    for name, page in site.items():
        for quote in page.quotes:
            # `>>>` read as Markdown is three nested quotes whose `>>>` is gone;
            # a `>>>` left in a quote's text is the same mistake.
            if quote.nested or ">>>" in quote.text:
                source = _source_file(quote.owner) if quote.owner else None
                owner = quote.owner or "(page text)"
                wrong.append(f"{name}: {owner} ({source}): {quote.text[:80]!r}")
    assert not wrong, "examples rendered as blockquotes:\n" + "\n".join(wrong)


def test_converted_docstring_examples_render_as_code(site: dict[str, Page]) -> None:
    api = site["api/index.html"]
    code = "\n".join(api.code)
    package: Any = _package()
    documented = re.findall(r"^::: (gradclip\.config)$", (DOCS / "api.md").read_text(), re.M)
    assert documented, "the API page documents gradclip.config"
    module = package["config"]
    first_lines = []
    for obj in [module, *module.members.values()]:
        if obj.is_alias or obj.docstring is None or obj.name.startswith("_"):
            continue
        for section in obj.docstring.parse("google"):
            if section.kind.value == "examples":
                first_lines += [
                    text.splitlines()[0] for kind, text in section.value if kind.value == "examples"
                ]
    assert first_lines, "gradclip.config has Examples: sections"
    for line in first_lines:
        assert line in code, f"{line!r} is not in a code block of the API page"


def test_the_site_loads_nothing_from_the_network(site: dict[str, Page]) -> None:
    external = {name: page.external for name, page in site.items() if page.external}
    assert not external


def test_maths_is_rendered_at_build_time(site: dict[str, Page]) -> None:
    assert site["modes/index.html"].maths >= 6
    assert site["strategies/index.html"].maths >= 2
    assert all(page.unrendered == 0 for page in site.values())
