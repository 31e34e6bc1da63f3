"""Short rule names for the command line."""

from __future__ import annotations

import pytest

import gradclip
from gradclip.commands.rule_names import RULE_FACTORIES, rule_from_name


def test_rule_factories_by_short_name() -> None:
    assert set(RULE_FACTORIES) == {"agc", "autoclip", "zclip", "global"}
    assert rule_from_name("AGC") == gradclip.AdaptiveGradClip()
    assert rule_from_name("global") == gradclip.ClipGlobalNorm(1.0)
    with pytest.raises(ValueError, match="known: agc, autoclip, global, zclip"):
        rule_from_name("nope")
