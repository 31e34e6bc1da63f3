"""One launch of two gloo processes for every distributed test module collected."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import two_ranks


@pytest.fixture(scope="session")
def two_rank_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, dict[str, Any]]]:
    """Per rank, per module (``CASES``), the cases' results; a hang fails every test."""
    modules = sorted(
        {
            item.module.__name__
            for item in request.session.items
            if getattr(getattr(item, "module", None), "CASES", None)
        }
    )
    timeout = sum(getattr(sys.modules[name], "TIMEOUT_S", 120) for name in modules)
    try:
        return two_ranks.run(modules, tmp_path_factory.mktemp("two_ranks"), timeout)
    except TimeoutError as err:
        pytest.fail(str(err))
