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

Validation is strict: an unknown key is rejected with the closest valid name,
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
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradclip.core.layers import Target
from gradclip.core.validation import check_threshold
from gradclip.rules.dl4j import GradientNormalization, resolve_strategy

if TYPE_CHECKING:
    from gradclip.normalizer import GradientNormalizer

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "ConfigError",
    "load_config",
    "normalizer_from_config",
    "parse_config",
]

ConfigSource = Mapping[str, Any] | str | os.PathLike[str]

#: Largest configuration file read, in bytes. A configuration is a few kilobytes;
#: the bound stops a wrong path (a dataset, a checkpoint) from being parsed at all.
MAX_FILE_BYTES = 1 << 20
#: Deepest nesting of mappings and lists accepted. A configuration needs 3 (the
#: top level, ``layers``, one layer's entry); the bound keeps recursive parsers and
#: validation far from Python's recursion limit.
MAX_DEPTH = 10

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
    """An invalid configuration; the message says where and what to write instead.

    Attributes:
        source: the file the configuration came from, or ``None`` for a mapping.
            ``str(error)`` starts with it, once.
    """

    def __init__(self, message: str, source: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.source = source

    def __str__(self) -> str:
        return f"{self.source}: {self.message}" if self.source else self.message


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


def _depth(data: Any) -> int:
    """Nesting depth of mappings and lists (a scalar is 0), without recursion.

    Stops counting past `MAX_DEPTH`: only whether the bound is exceeded matters.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, Sequence | set) and not isinstance(item, str | bytes):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def _check_depth(data: Any) -> None:
    if _depth(data) > MAX_DEPTH:
        raise ConfigError(
            f"nested more than {MAX_DEPTH} levels deep; a configuration needs 3 "
            "(the top level, layers, one layer's entry)"
        )


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
    _check_depth(data)
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


# -- reading files -----------------------------------------------------------------------
class _Refused(ValueError):
    """A problem found while parsing (a repeated key); `load_config` adds the file name."""


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.load keeps the last of two equal keys silently; a configuration that
    # sets a key twice is ambiguous, so refuse it by name.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key!r}")
        out[key] = value
    return out


# YAML 1.2's float syntax (which JSON shares) accepts `1e-3` and `1E3`; PyYAML
# implements YAML 1.1, whose floats need a dot, and reads `1e-3` as a string.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


def _yaml_loader() -> type[Any]:
    """A `yaml.SafeLoader` that refuses repeated keys and reads `1e-3` as a float."""
    import yaml  # type: ignore[import-untyped]

    class Loader(yaml.SafeLoader):  # type: ignore[misc]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        repeated = key in seen
                    except TypeError:  # an unhashable key; SafeLoader refuses it below
                        continue
                    if repeated:
                        line = key_node.start_mark.line + 1
                        raise _Refused(f"duplicate key {key!r} (line {line})")
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789"))
    return Loader


def _one_line_yaml_error(error: Any) -> str:
    """PyYAML's multi-line message (with a caret drawing) as one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is not None and problem:
        context = getattr(error, "context", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"{where}: {context + ', ' if context else ''}{problem}"
    return " ".join(str(error).split())


def _read_limited(path: str) -> bytes:
    with open(path, "rb") as binary:
        # Read one byte past the bound rather than trusting the size the file
        # system reports (a pipe or a special file has none).
        data = binary.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _Refused(
            f"larger than {MAX_FILE_BYTES // 1024} KiB; a configuration is a few kilobytes "
            "(is this the right file?)"
        )
    return data


def load_config(path: str | os.PathLike[str]) -> Any:
    """Read a JSON, YAML or TOML file with a safe loader (chosen by its suffix).

    Args:
        path: the file; its suffix (`.json`, `.yaml`, `.yml` or `.toml`) picks the format.

    Returns:
        The parsed data (not validated: see `parse_config`).

    Raises:
        ConfigError: an unknown suffix, a missing or unreadable file, a file over
            `MAX_FILE_BYTES`, a parse error, a repeated key, nesting deeper than
            `MAX_DEPTH`, or PyYAML missing for a YAML file. The message is one
            line and names the file once.

    Examples:
        >>> import json, pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "clip.json").write_text('{"mode": "ClipL2PerLayer", "mode": "None"}')
        >>> load_config(folder / "clip.json")
        Traceback (most recent call last):
        ...
        gradclip.config.ConfigError: .../clip.json: duplicate key 'mode'
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".json", ".yaml", ".yml", ".toml"):
        raise ConfigError("a configuration file ends in .json, .yaml, .yml or .toml", path)
    try:
        data = _load(_read_limited(path), suffix, path)
    except ConfigError:
        raise
    except OSError as error:
        raise ConfigError(error.strerror or str(error), path) from None
    except RecursionError:
        # Recursive parsers (json, tomllib, PyYAML's composer) give up long before
        # the data reaches _check_depth; say what is wrong instead.
        raise ConfigError(
            f"nested more than {MAX_DEPTH} levels deep; a configuration needs 3 "
            "(the top level, layers, one layer's entry)",
            path,
        ) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"not UTF-8 text ({error.reason} at byte {error.start})", path) from None
    except ValueError as error:  # _Refused, json / tomllib decode errors
        raise ConfigError(" ".join(str(error).split()), path) from None
    except Exception as error:  # yaml.YAMLError and its subclasses
        if type(error).__module__.startswith("yaml"):
            raise ConfigError(_one_line_yaml_error(error), path) from None
        raise
    try:
        _check_depth(data)
    except ConfigError as error:
        raise ConfigError(error.message, path) from None
    return data


def _load(raw: bytes, suffix: str, path: str) -> Any:
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
            import tomli as tomllib  # type: ignore[import-not-found, no-redef]
        return tomllib.loads(raw.decode("utf-8"))
    text = raw.decode("utf-8")
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_json_object)
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            "reading YAML needs PyYAML (pip install pyyaml); JSON and TOML need nothing", path
        ) from None
    return yaml.load(text, Loader=_yaml_loader())


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
        KeyError: a layer key that matches no layer of `model`.

    Examples:
        >>> normalizer = gradclip.GradientNormalizer.from_config(model, {
        ...     "gradientNormalization": "ClipL2PerLayer",
        ...     "gradientNormalizationThreshold": 1.0,
        ...     "layers": {"head": "None"}})
        >>> print(normalizer)
        layer     parameters                   mode
        --------------------------------------------------------------------
        encoder   weight (16, 4), bias (16,)   ClipL2PerLayer(threshold=1.0)
        blocks.0  weight (16, 16), bias (16,)  ClipL2PerLayer(threshold=1.0)
        blocks.2  weight (16, 16), bias (16,)  ClipL2PerLayer(threshold=1.0)
        head      weight (2, 16), bias (2,)    None()
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
