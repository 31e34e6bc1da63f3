"""The step's measurements: per-layer norms of any order from per-tensor ones."""

from __future__ import annotations

import math

import pytest
import torch

from gradclip.core.measure import layer_norms, p_norm_parts, p_norms_from


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_layer_norms_combine_tensor_norms_as_one_vector_would(norm_type: float) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (3, 4, 2, 5)]
    owner = torch.tensor([0, 1, 0, 2])
    per_tensor = torch.stack([torch.linalg.vector_norm(t, norm_type) for t in tensors])
    got = layer_norms(per_tensor, owner, 3, norm_type)
    for layer in range(3):
        joined = torch.cat([t for t, o in zip(tensors, owner.tolist()) if o == layer])
        want = torch.linalg.vector_norm(joined, norm_type)
        assert float(got[layer]) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_p_norms_split_over_ranks_sum_back_to_the_whole(norm_type: float) -> None:
    # two "ranks" holding halves of each tensor; the sum of their parts is the whole
    gen = torch.Generator().manual_seed(1)
    whole = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(3)]
    weights = torch.ones(3, dtype=torch.float64)
    parts = [
        p_norm_parts(
            torch.stack([torch.linalg.vector_norm(t[half], norm_type) for t in whole]),
            norm_type,
            weights,
        )
        for half in (slice(0, 3), slice(3, 6))
    ]
    reduced = type(parts[0])(
        sums=None if parts[0].sums is None else parts[0].sums + parts[1].sums,  # type: ignore[operator]
        maxima=None if parts[0].maxima is None else torch.maximum(parts[0].maxima, parts[1].maxima),  # type: ignore[arg-type]
    )
    got = p_norms_from(reduced, norm_type)
    want = torch.stack([torch.linalg.vector_norm(t, norm_type) for t in whole])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
