"""The command line: `gradclip COMMAND` or `python -m gradclip COMMAND`.

Each subcommand lives in its own module, which provides `add_arguments(parser)`
and `run(args) -> int`; this file only wires them to argparse.

Examples:
    >>> main(["check", "--help"])  # doctest: +ELLIPSIS
    usage: gradclip check [-h] --model MODULE:FACTORY config
    ...
    0
    >>> main(["--version"])  # doctest: +ELLIPSIS
    gradclip 0...
    0
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import NoReturn

from gradclip import __version__

__all__ = ["ArgumentParser", "main"]

# subcommand -> (module, one-line help)
_COMMANDS = {
    "demo": (
        "gradclip.commands.demo",
        "train small networks with and without gradient clipping and compare",
    ),
    "bench": ("gradclip.commands.bench", "time gradclip against torch's own clip functions"),
    "check": (
        "gradclip.commands.check",
        "print the layer table a configuration file applies to a model",
    ),
    "report": (
        "gradclip.commands.report",
        "what a recording shows: non-finite origin, spikes, vanishing and dominant layers",
    ),
    "calibrate": (
        "gradclip.commands.calibrate",
        "write per-layer thresholds from a recording's observed norms",
    ),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with usage errors on one line of stderr (exit status 2).

    argparse prints the whole usage block before the error; a command whose every
    error is one line is easier to read in a log and to grep.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None, prog: str = "gradclip") -> int:
    """Parse `argv` and run the chosen subcommand.

    Args:
        argv: the arguments (default: `sys.argv[1:]`).
        prog: the name usage lines and errors start with: `gradclip` for the
            console script, `python -m gradclip` when run as a module.

    Returns:
        The exit status: 0 on success, 2 for a usage or input error (one line on
        stderr), 1 when the demo does not show what it exists to show.
    """
    parser = ArgumentParser(
        prog=prog,
        description="Deeplearning4j's per-layer gradient normalization for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    modules = {}
    for name, (module_name, help_text) in _COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(subparser)
        # Errors found after parsing start with the same name as usage errors.
        subparser.set_defaults(prog=subparser.prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed
        return done.code if isinstance(done.code, int) else 2
    return int(modules[args.command].run(args))
