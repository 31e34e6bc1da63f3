"""DL4J-style configuration from a dict or a JSON, YAML or TOML file.

The keys are DL4J's builder names or their snake_case spelling:

```yaml
# gradclip.yaml
gradientNormalization: ClipL2PerLayer        # or gradient_normalization / mode
gradientNormalizationThreshold: 1.0          # or gradient_normalization_threshold / threshold
layers:                                      # or overrides: per-layer entries
  rnn:
    gradientNormalization: ClipElementWiseAbsoluteValue
    gradientNormalizationThreshold: 0.5
  head: None                                 # a bare mode name is fine too
  "encoder.*":                               # glob patterns, as for overrides
    gradientNormalizationThreshold: 5.0      # mode inherited from the network
```

As in DL4J, a layer entry that gives only a mode takes the network's threshold,
and one that gives only a threshold takes the network's mode. `layers` may
also be a list of entries that carry their layer's name (`name` or
`layerName`), the shape of a DL4J `.list().layer(...)` configuration.

A top-level `calibration` entry (written by `gradclip calibrate`) is accepted
and ignored. Validation is strict: an unknown key is rejected with the closest valid name,
a key given twice is rejected with its name, and every value is checked before
a normalizer is built. Files are read with safe loaders only (`json`, a
`yaml.SafeLoader` subclass, `tomllib`): a configuration is data and never
executes code. A file over `MAX_FILE_BYTES` or nested deeper than `MAX_DEPTH`
is refused before it is used. In YAML files, numbers written in exponent form
without a dot (`1e-3`) are read as floats, as YAML 1.2 and JSON read them
(PyYAML's YAML 1.1 rules would read a string).

Examples:
    >>> from gradclip.config import parse_config
    >>> args = parse_config({
    ...     "gradientNormalization": "ClipL2PerLayer",
    ...     "gradientNormalizationThreshold": 0.5,
    ...     "layers": {"head": "None"}})
    >>> args["mode"], args["threshold"], args["overrides"]
    ('ClipL2PerLayer', 0.5, {'head': {'mode': 'None', 'threshold': 0.5}})
    >>> parse_config({"gradientNormalisation": "ClipL2PerLayer"})
    Traceback (most recent call last):
    ...
    gradclip.config.ConfigError: config: unknown key 'gradientNormalisation'; did you mean ...
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from gradclip.config.errors import MAX_DEPTH, MAX_FILE_BYTES, ConfigError, check_depth
from gradclip.config.files import load_config
from gradclip.core.validation import check_threshold
from gradclip.rules.dl4j import GradientNormalization, resolve_rule

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "ConfigError",
    "load_config",
    "parse_config",
]

ConfigSource = Mapping[str, Any] | str | os.PathLike[str]

# canonical name -> accepted spellings (DL4J's camelCase first)
_TOP_KEYS: dict[str, tuple[str, ...]] = {
    "mode": ("gradientNormalization", "gradient_normalization", "mode"),
    "threshold": (
        "gradientNormalizationThreshold",
        "gradient_normalization_threshold",
        "threshold",
    ),
    "overrides": ("layers", "overrides"),
    "measure_all": ("measureAll", "measure_all"),
    # written by `gradclip calibrate` (what each threshold would have clipped); not read
    "calibration": ("calibration",),
}
_LAYER_KEYS: dict[str, tuple[str, ...]] = {
    "mode": _TOP_KEYS["mode"],
    "threshold": _TOP_KEYS["threshold"],
    "name": ("layerName", "layer_name", "name"),
}


def _canonical(
    data: Mapping[str, Any], spellings: dict[str, tuple[str, ...]], where: str
) -> dict[str, Any]:
    alias = {name: canon for canon, names in spellings.items() for name in names}
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be strings, got {key!r}")
        canon = alias.get(key)
        if canon is None:
            close = difflib.get_close_matches(key, list(alias), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}{hint} (valid keys: {', '.join(sorted(alias))})"
            )
        if canon in out:
            raise ConfigError(f"{where}: {given[canon]!r} and {key!r} both set {canon}")
        out[canon] = value
        given[canon] = key
    return out


def _mode(value: Any, where: str) -> GradientNormalization:
    if value is not None and not isinstance(value, str):
        raise ConfigError(
            f"{where}: the mode must be a name such as 'ClipL2PerLayer', got {value!r}"
        )
    try:
        return GradientNormalization.parse(value)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def _threshold(value: Any, where: str) -> float:
    try:
        return check_threshold(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _layer_entry(
    value: Any, where: str, mode: GradientNormalization, threshold: float
) -> tuple[str | None, dict[str, Any]]:
    if value is None or isinstance(value, str):
        return None, {"mode": _mode(value, where).value, "threshold": threshold}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{where}: a layer entry is a mode name or a mapping with gradientNormalization / "
            f"gradientNormalizationThreshold, got {value!r}"
        )
    entry = _canonical(value, _LAYER_KEYS, where)
    layer_mode = _mode(entry["mode"], where) if "mode" in entry else mode
    layer_threshold = _threshold(entry["threshold"], where) if "threshold" in entry else threshold
    if "mode" not in entry and "threshold" not in entry:
        raise ConfigError(f"{where}: a layer entry needs gradientNormalization or a threshold")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}: the layer name must be a string, got {name!r}")
    return name, {"mode": layer_mode.value, "threshold": layer_threshold}


def parse_config(config: ConfigSource) -> dict[str, Any]:
    """Validate a configuration and return `GradientNormalizer`'s arguments.

    Args:
        config: a mapping, or the path of a `.json`, `.yaml`/`.yml` or `.toml` file.

    Returns:
        `{"mode": str, "threshold": float, "overrides": {key: {"mode", "threshold"}},
        "measure_all": bool}`.

    Raises:
        ConfigError: an unknown or repeated key (with the closest valid one), a
            bad mode or threshold, nesting deeper than `MAX_DEPTH`, or a file that
            cannot be read (its `source` is then the file).

    Examples:
        >>> parse_config({"mode": "ClipL2PerParamType", "threshold": 2})
        {'mode': 'ClipL2PerParamType', 'threshold': 2.0, 'overrides': {}, 'measure_all': False}
    """
    if isinstance(config, str | os.PathLike):
        path = os.fspath(config)
        data = load_config(path)
        try:
            return _parse(data)
        except ConfigError as error:
            raise ConfigError(error.message, source=path) from None
    return _parse(config)


def _parse(data: Any) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"a configuration is a mapping of keys to values, got {type(data).__name__}"
        )
    check_depth(data)
    top = _canonical(data, _TOP_KEYS, "config")
    mode = _mode(top.get("mode", "None"), "gradientNormalization")
    threshold = _threshold(top.get("threshold", 1.0), "gradientNormalizationThreshold")
    measure_all = top.get("measure_all", False)
    if not isinstance(measure_all, bool):
        raise ConfigError(f"measure_all must be true or false, got {measure_all!r}")
    layers = top.get("overrides", {})
    overrides: dict[str, dict[str, Any]] = {}
    if isinstance(layers, Mapping):
        for key, value in layers.items():
            name, entry = _layer_entry(value, f"layers[{key!r}]", mode, threshold)
            if name is not None and name != key:
                raise ConfigError(f"layers[{key!r}]: the entry names another layer, {name!r}")
            overrides[str(key)] = entry
    elif isinstance(layers, Sequence) and not isinstance(layers, str):
        for i, value in enumerate(layers):
            name, entry = _layer_entry(value, f"layers[{i}]", mode, threshold)
            if name is None:
                raise ConfigError(f"layers[{i}]: an entry of a layer list needs its layerName")
            if name in overrides:
                raise ConfigError(f"layers[{i}]: layer {name!r} is configured twice")
            overrides[name] = entry
    else:
        raise ConfigError(f"layers must be a mapping or a list of entries, got {layers!r}")
    # resolve_rule cannot fail now; calling it keeps the two validations in step.
    resolve_rule(mode, threshold)
    return {
        "mode": mode.value,
        "threshold": threshold,
        "overrides": overrides,
        "measure_all": measure_all,
    }
