"""DL4J-style configuration from a dict or a JSON, YAML or TOML file.

The keys are DL4J's builder names or their snake_case spelling::

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

As in DL4J, a layer entry that gives only a mode takes the network's threshold,
and one that gives only a threshold takes the network's mode. ``layers`` may
also be a list of entries that carry their layer's name (``name`` or
``layerName``), the shape of a DL4J ``.list().layer(...)`` configuration.

Validation is strict: an unknown key is rejected with the closest valid name,
and every value is checked before a normalizer is built. Files are read with
safe loaders only (``json``, ``yaml.safe_load``, ``tomllib``): a configuration
is data and never executes code.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradclip.core.layers import Target
from gradclip.core.validation import check_threshold
from gradclip.rules.dl4j import GradientNormalization, resolve_strategy

if TYPE_CHECKING:
    from gradclip.normalizer import GradientNormalizer

__all__ = ["ConfigError", "load_config", "normalizer_from_config", "parse_config"]

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
}
_LAYER_KEYS: dict[str, tuple[str, ...]] = {
    "mode": _TOP_KEYS["mode"],
    "threshold": _TOP_KEYS["threshold"],
    "name": ("layerName", "layer_name", "name"),
}


class ConfigError(ValueError):
    """An invalid configuration; the message says where and what to write instead."""


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
        config: a mapping, or the path of a ``.json``, ``.yaml``/``.yml`` or ``.toml`` file.

    Returns:
        ``{"mode": str, "threshold": float, "overrides": {key: {"mode", "threshold"}},
        "measure_all": bool}``.

    Raises:
        ConfigError: an unknown key (with the closest valid one), a bad mode or
            threshold, or a file that cannot be read.
    """
    data = load_config(config) if isinstance(config, str | os.PathLike) else config
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"a configuration is a mapping of keys to values, got {type(data).__name__}"
        )
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
    # resolve_strategy cannot fail now; calling it keeps the two validations in step.
    resolve_strategy(mode, threshold)
    return {
        "mode": mode.value,
        "threshold": threshold,
        "overrides": overrides,
        "measure_all": measure_all,
    }


def load_config(path: str | os.PathLike[str]) -> Any:
    """Read a JSON, YAML or TOML file with a safe loader (by its suffix).

    Raises:
        ConfigError: an unknown suffix, a missing file, a parse error, or PyYAML
            missing for a YAML file (``pip install 'gradclip[yaml]'``).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".json", ".yaml", ".yml", ".toml"):
        raise ConfigError(f"{path}: a configuration file ends in .json, .yaml, .yml or .toml")
    try:
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib  # type: ignore[import-not-found, no-redef]
            with open(path, "rb") as binary:
                return tomllib.load(binary)
        with open(path, encoding="utf-8") as text:
            if suffix == ".json":
                return json.load(text)
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                raise ConfigError(
                    f"{path}: reading YAML needs PyYAML: pip install 'gradclip[yaml]'"
                ) from None
            return yaml.safe_load(text)
    except ConfigError:
        raise
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror or error}") from None
    except ValueError as error:  # json / tomllib decode errors
        raise ConfigError(f"{path}: {error}") from None
    except Exception as error:  # yaml.YAMLError
        if type(error).__module__.startswith("yaml"):
            raise ConfigError(f"{path}: {error}") from None
        raise


def normalizer_from_config(model: Target, config: ConfigSource) -> GradientNormalizer:
    """Build a `GradientNormalizer` from a DL4J-style configuration.

    Args:
        model: the model (or custom grouping) to normalize.
        config: a mapping, or the path of a JSON, YAML or TOML file; see
            `gradclip.config` for the keys.

    Returns:
        The normalizer.

    Raises:
        ConfigError: an invalid configuration.
        KeyError: a layer key that matches no layer of ``model``.

    Example:
        >>> normalizer = gradclip.GradientNormalizer.from_config(model, {
        ...     "gradientNormalization": "ClipL2PerLayer",
        ...     "gradientNormalizationThreshold": 1.0,
        ...     "layers": {"head": "None"}})
    """
    from gradclip.normalizer import GradientNormalizer

    args = parse_config(config)
    return GradientNormalizer(
        model,
        args["mode"],
        args["threshold"],
        args["overrides"],
        measure_all=args["measure_all"],
    )
