"""Argument checks that run before any gradient is touched."""

from __future__ import annotations

import math

import pytest
import torch

from gradclip.core.validation import check_gradient, check_threshold


@pytest.mark.parametrize("value", [1, 0.5, 1e-12, torch.tensor(2.0), torch.tensor([3.0])])
def test_thresholds_accepted_as_floats(value: object) -> None:
    assert isinstance(check_threshold(value), float)
    assert check_threshold(value) == pytest.approx(float(value))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (True, TypeError),
        ("1.0", TypeError),
        (None, TypeError),
        (torch.ones(2), TypeError),
        (torch.tensor(1.0 + 1j), TypeError),
    ],
)
def test_thresholds_refused_with_their_name(value: object, error: type) -> None:
    with pytest.raises(error, match="max_norm"):
        check_threshold(value, what="max_norm")


def test_sparse_and_complex_gradients_are_refused_with_what_to_do() -> None:
    check_gradient("ok", torch.zeros(3))
    with pytest.raises(TypeError, match=r"'emb.weight'.*dense embedding"):
        check_gradient("emb.weight", torch.zeros(3, 2).to_sparse())
    with pytest.raises(TypeError, match=r"'z'.*complex.*view_as_real"):
        check_gradient("z", torch.zeros(3, dtype=torch.complex64))
