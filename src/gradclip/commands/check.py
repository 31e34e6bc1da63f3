"""`gradclip check config.yaml --model module:factory`: show what a configuration does.

Builds the model with `factory()` (imported from `module`), reads the
configuration with `gradclip.config` and prints the layer table the
normalizer would apply (`gradclip.GradientNormalizer.describe`), without
training anything. Exit status 0 when the configuration is valid for the model;
otherwise 2, with the error on one line of stderr.

Examples:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="gradclip check")
    >>> add_arguments(parser)
    >>> run(parser.parse_args(["missing.yaml", "--model", "torch.nn:Identity"]))
    2
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from torch import nn

from gradclip.config import ConfigError
from gradclip.normalizer import GradientNormalizer

__all__ = ["ModelError", "add_arguments", "load_model", "run"]


class ModelError(ValueError):
    """`--model` did not give a model: a bad spec, a failed import, or a factory that raised."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of `check` on `parser`."""
    parser.add_argument("config", help="a .json, .yaml/.yml or .toml configuration file")
    parser.add_argument(
        "--model",
        required=True,
        metavar="MODULE:FACTORY",
        help="an importable callable returning the nn.Module, e.g. mypkg.models:build "
        "(called with no arguments; an nn.Module attribute is used as is)",
    )


def _text(error: BaseException) -> str:
    # str(KeyError("x")) is "'x'": the message itself reads better.
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _describe(error: BaseException) -> str:
    """`RuntimeError: message`, for errors raised by the user's code."""
    text = _text(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_model(spec: str) -> nn.Module:
    """Import `module:attribute` and return the model it gives.

    Args:
        spec: `package.module:name`; `name` may be dotted (`models:Zoo.small`). An
            `nn.Module` instance is used as is, a callable is called with no arguments.
            The module is looked for in the current directory first, as
            `python -m` does.

    Returns:
        The model.

    Raises:
        ModelError: the spec is malformed, the import or the lookup fails, the
            factory raises (the message names the exception), or what it gives
            is not an `nn.Module`.

    Examples:
        >>> load_model("torch.nn:Identity")
        Identity()
        >>> load_model("torch.nn")
        Traceback (most recent call last):
        ...
        gradclip.commands.check.ModelError: --model must look like 'package.module:factory', ...
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ModelError(f"--model must look like 'package.module:factory', got {spec!r}")
    # The current directory first, as `python -m` has it: the console script's own
    # sys.path starts at its bin directory, where no user's `models.py` is.
    here = os.getcwd()
    added = here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return _load(spec, module_name, attribute)
    finally:
        if added:
            sys.path.remove(here)


def _load(spec: str, module_name: str, attribute: str) -> nn.Module:
    try:
        obj: object = importlib.import_module(module_name)
    except Exception as error:  # any error of the user's module at import time
        raise ModelError(f"cannot import {module_name!r}: {_describe(error)}") from error
    owner = module_name
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelError(f"{spec}: {owner!r} has no attribute {part!r}") from None
        owner = f"{owner}.{part}"
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelError(f"{spec} is a {type(obj).__name__}, not a torch.nn.Module or a factory")
    try:
        model = obj()
    except Exception as error:  # the factory is the user's code: report whatever it raised
        raise ModelError(f"{spec}() raised {_describe(error)}") from error
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec}() gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _fail(args: argparse.Namespace, message: str) -> int:
    # One line, whatever the message: a multi-line error reads badly in a CI log.
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    prog = getattr(args, "prog", None) or "gradclip check"
    print(f"{prog}: error: {line}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Print the layer table, or the error on one line of stderr.

    Args:
        args: `config` (a file name), `model` (`module:factory`) and optionally
            `prog`, the name errors start with (`gradclip check` by default).

    Returns:
        The exit status: 0, or 2 for any error.
    """
    try:
        model = load_model(args.model)
    except ModelError as error:
        return _fail(args, f"cannot load the model: {error}")
    try:
        normalizer = GradientNormalizer.from_config(model, args.config)
    except ConfigError as error:  # names the file itself
        return _fail(args, str(error))
    except (KeyError, ValueError, TypeError) as error:  # e.g. a layer key matching no layer
        return _fail(args, f"{args.config}: {_text(error)}")
    except Exception as error:  # anything else the model's layout raises: still one line
        return _fail(args, f"{args.config}: {_describe(error)}")
    print(normalizer.describe())
    return 0
