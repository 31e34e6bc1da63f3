"""The findings as text for a terminal, and as strict JSON (non-finite numbers as ``null``)."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["to_json", "to_text"]


def _strict(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def to_json(found: dict[str, Any]) -> str:
    """``found`` as strict JSON: inf and NaN written as ``null``."""
    return json.dumps(_strict(found), indent=2, allow_nan=False)


def _name(layer: str | None) -> str:
    return "(root)" if layer == "" else str(layer)


def to_text(found: dict[str, Any], max_spikes: int = 10) -> str:
    """A summary of ``found`` (from `gradclip.insight.findings`) for a terminal."""
    lines = [
        f"{found['steps']} steps recorded ({found['first_step']}..{found['last_step']}), "
        f"{len(found['layers'])} layers"
    ]
    first = found["first_nonfinite"]
    if first is None:
        lines.append("non-finite gradients: none")
    else:
        where = (
            f"layer {_name(first['layer'])} ({', '.join(first['parameters'])})"
            if first["layer"] is not None
            else "no single layer"
        )
        lines.append(
            f"first non-finite gradient: step {first['step']}, {where}: {first['reason']} "
            f"[{found['nonfinite_steps']} non-finite steps in all]"
        )
    spikes = found["spikes"]
    rules = found["rules"]
    lines.append(
        f"spikes (> {rules['spike_factor']:g}x the median of the previous "
        f"{rules['spike_window']} steps): {len(spikes) or 'none'}"
    )
    for spike in spikes[:max_spikes]:
        lines.append(
            f"  step {spike['step']}: {_name(spike['layer'])} norm {spike['norm']:.3g} "
            f"({spike['ratio']:.3g}x)"
        )
    if len(spikes) > max_spikes:
        lines.append(f"  ... and {len(spikes) - max_spikes} more (--json lists them all)")
    for key, what in (("vanishing", "vanishing"), ("no_gradient", "no gradient")):
        names = found[key]
        lines.append(f"{what}: {', '.join(map(_name, names)) if names else 'none'}")
    dominant = ", ".join(f"{_name(d['layer'])} {100 * d['share']:.0f}%" for d in found["dominant"])
    lines.append(f"largest share of the squared global norm: {dominant or '-'}")
    return "\n".join(lines)
