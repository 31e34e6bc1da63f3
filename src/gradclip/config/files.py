"""Reading configuration files: JSON, YAML and TOML with safe loaders, bounded in size and depth.

`gradclip.config.parse_config` reads a path with `load_config`; the data it
returns is validated there.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from gradclip.config.errors import MAX_DEPTH, MAX_FILE_BYTES, ConfigError, check_depth

__all__ = ["load_config"]


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


_NEEDS = 'a configuration names at least a mode, e.g. {"mode": "ClipL2PerLayer", "threshold": 1.0}'


def load_config(path: str | os.PathLike[str]) -> Any:
    """Read a JSON, YAML or TOML file with a safe loader (chosen by its suffix).

    Args:
        path: the file; its suffix (`.json`, `.yaml`, `.yml` or `.toml`) picks the format.

    Returns:
        The parsed data (not validated: see `parse_config`).

    Raises:
        ConfigError: an unknown suffix, a missing, unreadable or empty file, a file over
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
        raw = _read_limited(path)
        if not raw.strip():
            raise ConfigError(f"the file is empty; {_NEEDS}", path)
        data = _load(raw, suffix, path)
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
    if data is None:  # YAML of comments only, or a JSON null
        raise ConfigError(
            f"the file holds no configuration (comments or null only); {_NEEDS}", path
        )
    try:
        check_depth(data)
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
