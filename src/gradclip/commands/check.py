"""``python -m gradclip check config.yaml --model module:factory``: show what a configuration does.

Builds the model with ``factory()`` (imported from ``module``), reads the
configuration with `gradclip.config` and prints the layer table the
normalizer would apply (`gradclip.GradientNormalizer.describe`), without
training anything. Exit status 0 when the configuration is valid for the model,
2 when it is not (the error is printed).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from torch import nn

from gradclip.config import ConfigError, normalizer_from_config

__all__ = ["add_arguments", "load_model", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of ``check``."""
    parser.add_argument("config", help="a .json, .yaml/.yml or .toml configuration file")
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="an importable callable returning the nn.Module, e.g. mypkg.models:build "
        "(called with no arguments; an nn.Module attribute is used as is)",
    )


def load_model(spec: str) -> nn.Module:
    """Import ``module:attribute`` and return the model it builds.

    Raises:
        ValueError: the spec is malformed, or the attribute is not a module or a
            callable returning one.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    obj: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    model = obj if isinstance(obj, nn.Module) else obj() if callable(obj) else obj
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def run(args: argparse.Namespace) -> int:
    """Print the layer table, or the error; returns the exit status."""
    try:
        model = load_model(args.model)
    except (ImportError, AttributeError, ValueError) as error:
        print(f"gradclip check: cannot load the model: {error}", file=sys.stderr)
        return 2
    try:
        normalizer = normalizer_from_config(model, args.config)
    except (ConfigError, KeyError, ValueError, TypeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"gradclip check: {args.config}: {message}", file=sys.stderr)
        return 2
    print(normalizer.describe())
    return 0
