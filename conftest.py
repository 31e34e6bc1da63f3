"""Doctests of `src/gradclip`: every `Examples:` section runs against the setup of docs/api.md.

`python -m pytest` collects the docstring examples of the package
(`--doctest-modules` over `src/gradclip`, see pyproject.toml). Before each one,
the setup block at the top of docs/api.md runs in a fresh namespace, so every
example sees the names that page documents (`torch`, `nn`, `gradclip`, `Net`,
`model` with gradients from one backward pass, `optimizer`, `x`, `y`, `loss`)
and no example sees what another one changed.
"""

from __future__ import annotations

from typing import Any

import pytest
from _pytest.doctest import DoctestItem
from docs_support import api_setup_code

_SETUP: Any = None


@pytest.fixture(autouse=True)
def _docstring_example_setup(request: pytest.FixtureRequest) -> None:
    if not isinstance(request.node, DoctestItem):
        return
    global _SETUP
    if _SETUP is None:
        _SETUP = compile(api_setup_code(), "docs/api.md (setup)", "exec")
    namespace: dict[str, Any] = {}
    exec(_SETUP, namespace)
    namespace.pop("__builtins__", None)
    request.getfixturevalue("doctest_namespace").update(namespace)
