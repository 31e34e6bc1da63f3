"""No host synchronization in any rule, under the propagate and zero policies."""

from __future__ import annotations

import math

import pytest
from helpers import SYNC_OPS, HostReadCounter, OpCounter, fill_grads
from torch import nn

import gradclip

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]


# -- no host synchronization -----------------------------------------------------------
ALL_STRATEGIES = [
    gradclip.ClipGlobalNorm(1.0),
    gradclip.ClipGlobalNorm(1.0, 3.0),
    gradclip.ClipGlobalNorm(1.0, math.inf),
    gradclip.AdaptiveGradClip(),
    gradclip.AutoClip(),
    gradclip.AutoClip(25.0, history_size=3, scope="layer"),
    gradclip.ZClip(warmup_steps=2),
    gradclip.ZClip(warmup_steps=2, max_grad_norm=1.0, scope="layer"),
    gradclip.chain(("ClipElementWiseAbsoluteValue", 0.5), gradclip.ZClip(warmup_steps=2)),
]


@pytest.mark.parametrize("strategy", ALL_STRATEGIES, ids=str)
@pytest.mark.parametrize("nonfinite", ["propagate", "zero"])
def test_no_host_sync_in_apply(strategy: gradclip.Rule, nonfinite: str) -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 2))
    normalizer = gradclip.GradientNormalizer(model, strategy, nonfinite=nonfinite)
    for step in range(5):  # warm-up steps, the step that ends warm-up, and later ones
        fill_grads(model, scale=1.0 + step, seed=step)
        with OpCounter() as counter, HostReadCounter() as reads:
            normalizer.apply()
        assert counter.syncs == 0, {op: n for op, n in counter.ops.items() if op in SYNC_OPS}
        assert sum(reads.calls.values()) == 0, reads.calls
