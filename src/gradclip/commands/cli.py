"""The command line: ``python -m gradclip {demo,bench,...}``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)``
and ``run(args) -> int``; this file only wires them to argparse.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

__all__ = ["main"]

# subcommand -> (module, one-line help)
_COMMANDS = {
    "demo": ("gradclip.commands.demo", "train a tanh RNN on the adding problem three ways"),
    "bench": ("gradclip.commands.bench", "time gradclip against torch's own clip functions"),
    "check": (
        "gradclip.commands.check",
        "print the layer table a configuration file applies to a model",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m gradclip",
        description="Deeplearning4j's per-layer gradient normalization for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in _COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args))
