"""What the configuration modules share: the error they raise and the bounds they enforce."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "ConfigError", "check_depth"]

#: Largest configuration file read, in bytes. A configuration is a few kilobytes;
#: the bound stops a wrong path (a dataset, a checkpoint) from being parsed at all.
MAX_FILE_BYTES = 1 << 20
#: Deepest nesting of mappings and lists accepted. A configuration needs 3 (the
#: top level, ``layers``, one layer's entry); the bound keeps recursive parsers and
#: validation far from Python's recursion limit.
MAX_DEPTH = 10


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


# reported where users meet it: `gradclip.config.ConfigError`
ConfigError.__module__ = "gradclip.config"


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


def check_depth(data: Any) -> None:
    if _depth(data) > MAX_DEPTH:
        raise ConfigError(
            f"nested more than {MAX_DEPTH} levels deep; a configuration needs 3 "
            "(the top level, layers, one layer's entry)"
        )
