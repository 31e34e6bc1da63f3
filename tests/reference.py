"""An independent float64 reference of DL4J's six modes, written as plainly as possible.

It shares no code with gradclip: one Python loop per layer, norms with
``math.sqrt(sum(x*x))``-style float64 arithmetic, DL4J's formulas as written
in DESIGN.md §2.
"""

from __future__ import annotations

import torch

MODES = (
    "None",
    "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType",
    "ClipElementWiseAbsoluteValue",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
)


def l2(tensor: torch.Tensor) -> float:
    return float(torch.sqrt((tensor.double() ** 2).sum()))


def reference_layer(grads: list[torch.Tensor], mode: str, threshold: float) -> list[torch.Tensor]:
    """DL4J's result for one layer, in float64."""
    g = [x.detach().double().clone() for x in grads]
    if mode == "None":
        return g
    if mode == "ClipElementWiseAbsoluteValue":
        return [x.clamp(-threshold, threshold) for x in g]
    if mode in ("RenormalizeL2PerLayer", "ClipL2PerLayer"):
        layer = float(
            torch.sqrt(sum(((x**2).sum() for x in g), torch.tensor(0.0, dtype=torch.float64)))
        )
        if mode == "RenormalizeL2PerLayer":
            return [x / layer if layer > 0 else x for x in g]
        return [x * (threshold / layer) if layer > threshold else x for x in g]
    if mode == "RenormalizeL2PerParamType":
        return [x / l2(x) if l2(x) > 0 else x for x in g]
    if mode == "ClipL2PerParamType":
        return [x / (l2(x) / threshold) if l2(x) > threshold else x for x in g]
    raise ValueError(mode)


def layer_norm(grads: list[torch.Tensor]) -> float:
    return float(
        torch.sqrt(
            sum(((x.double() ** 2).sum() for x in grads), torch.tensor(0.0, dtype=torch.float64))
        )
    )
