"""`gradclip report PATH [--json] [--plot OUT.png]`: what a recording shows.

Prints the findings of `gradclip.insight.findings` (the first non-finite
gradient and where it entered, spikes, vanishing layers, layers without a
gradient, the dominant layers) as a summary, or as strict JSON with
``--json``; ``--plot`` also draws the run (needs matplotlib, the ``plot``
extra). Exit status 0, or 2 with one line on stderr for a file that is not a
recording.

Examples:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="gradclip report")
    >>> add_arguments(parser)
    >>> run(parser.parse_args(["missing.gcrec"]))
    2
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of `report` on `parser`."""
    parser.add_argument("recording", help="a file written by GradientNormalizer(..., record=PATH)")
    parser.add_argument("--json", action="store_true", help="print the findings as strict JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="also draw the run into this image")
    parser.add_argument(
        "--percentile",
        type=float,
        default=None,
        help="the percentile of the thresholds the plot shows (default: calibrate's)",
    )
    parser.add_argument(
        "--spike-factor", type=float, default=10.0, help="a spike is this many times (default 10)"
    )
    parser.add_argument(
        "--spike-window",
        type=int,
        default=50,
        help="... the median of the previous block of this many steps (default 50)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the findings of ``args.recording``; returns the exit status."""
    prog = getattr(args, "prog", "gradclip report")
    try:
        from gradclip import insight

        recording = insight.load(args.recording)
        rules = insight.Rules(spike_factor=args.spike_factor, spike_window=args.spike_window)
        found = insight.findings(recording, rules)
        if args.plot:
            from gradclip.insight.plot import plot_run

            percentile = args.percentile or insight.DEFAULT_PERCENTILE
            plot_run(recording, args.plot, found=found, percentile=percentile)
    except ImportError as error:
        print(f"{prog}: error: {error} (pip install 'gradclip[plot]')", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    print(insight.to_json(found) if args.json else insight.to_text(found))
    if args.plot and not args.json:
        print(f"plot: {args.plot}")
    return 0
