"""MkDocs hook: render the pages' LaTeX to MathML at build time, so the site needs no script.

`pymdownx.arithmatex` (generic mode) finds the maths in Markdown and in the
docstrings mkdocstrings renders, and wraps it as `<span class="arithmatex">\\(...\\)</span>`
or `<div class="arithmatex">\\[...\\]</div>`. This hook replaces each with the
MathML that `latex2mathml` writes, which browsers render natively: no MathJax,
no network. A formula `latex2mathml` cannot convert fails the build.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

_INLINE = re.compile(r'<span class="arithmatex">\\\((?P<tex>.*?)\\\)</span>', re.DOTALL)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(?P<tex>.*?)\\\]</div>', re.DOTALL)


def _render(match: re.Match[str], display: str, page: Any) -> str:
    tex = html.unescape(match["tex"]).strip()
    try:
        mathml = convert(tex, display=display)
    except Exception as error:  # latex2mathml raises plain exceptions for bad input
        raise ValueError(f"{page.file.src_path}: cannot render ${tex}$: {error}") from error
    tag = "div" if display == "block" else "span"
    return f'<{tag} class="arithmatex">{mathml}</{tag}>'


def on_page_content(html_text: str, page: Any, **_: Any) -> str:
    html_text = _BLOCK.sub(lambda m: _render(m, "block", page), html_text)
    return _INLINE.sub(lambda m: _render(m, "inline", page), html_text)
