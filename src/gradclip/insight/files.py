"""Writing a `Calibration` as a YAML, JSON or TOML configuration file, with what it clips.

YAML and TOML carry each layer's count of steps its threshold would have
clipped as a comment; JSON, which has no comments, under the top-level key
``calibration`` (``{"source", "steps", "percentile", "scope", "clipped":
{layer: steps}, "observed": {layer: steps with a finite norm}, "notes":
{layer: why it is left alone}}``), which `gradclip.config` accepts and ignores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gradclip.insight.calibrate import Calibration

__all__ = ["FORMATS", "render", "write_config"]

FORMATS = (".yaml", ".yml", ".json", ".toml")


def _number(value: float) -> str:
    return repr(float(value))


def _header(cal: Calibration, source: str) -> list[str]:
    return [
        f"calibrated by gradclip from {source}: {cal.steps} steps,",
        f"{cal.scope} thresholds at the {cal.percentile:g}th percentile of the observed norms",
    ]


def _entry(cal: Calibration, name: str) -> dict[str, Any]:
    config = cal.config().get("layers", {})
    entry: dict[str, Any] = config.get(name, {})
    return entry


def render(cal: Calibration, suffix: str, source: str) -> str:
    """The configuration file's text for ``suffix`` (one of `FORMATS`)."""
    config = cal.config()
    if suffix == ".json":
        data = dict(config)
        data["calibration"] = {
            "source": source,
            "steps": cal.steps,
            "percentile": cal.percentile,
            "scope": cal.scope,
            "clipped": dict(cal.clipped),
            "observed": dict(cal.observed),
            "notes": dict(cal.notes),
        }
        return json.dumps(data, indent=2) + "\n"
    lines: list[str] = ["# " + line for line in _header(cal, source)]
    hash_ = "#"
    if suffix == ".toml":
        lines += [
            f'gradientNormalization = "{config["gradientNormalization"]}"',
            f"gradientNormalizationThreshold = {_number(config['gradientNormalizationThreshold'])}",
        ]
        for name in cal.layers:
            entry = _entry(cal, name)
            lines.append(f"{hash_} {name or '(root)'}: {cal.comment(name)}")
            if entry:
                lines.append(f"[layers.{json.dumps(name)}]")
                for key, value in entry.items():
                    shown = json.dumps(value) if isinstance(value, str) else _number(value)
                    lines.append(f"{key} = {shown}")
        return "\n".join(lines) + "\n"
    lines += [
        f"gradientNormalization: {config['gradientNormalization']}",
        f"gradientNormalizationThreshold: {_number(config['gradientNormalizationThreshold'])}",
    ]
    if "layers" in config:
        lines.append("layers:")
    for name in cal.layers:
        entry = _entry(cal, name)
        if not entry:
            lines.append(f"{hash_} {name or '(root)'}: {cal.comment(name)}")
            continue
        lines.append(f"  {json.dumps(name)}:  {hash_} {cal.comment(name)}")
        for key, value in entry.items():
            shown = value if isinstance(value, str) else _number(value)
            lines.append(f"    {key}: {shown}")
    return "\n".join(lines) + "\n"


def write_config(cal: Calibration, path: str | os.PathLike[str], source: str) -> Path:
    """Write ``cal`` to ``path``, in the format its suffix names.

    Raises:
        ValueError: a suffix other than `FORMATS`.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"the output file must end in .yaml, .yml, .json or .toml, got {str(p)!r}")
    p.write_text(render(cal, suffix, source))
    return p
