"""`gradclip calibrate PATH [--percentile P] [--scope S] -o FILE`: a configuration from a recording.

Writes per-layer `ClipL2PerLayer` thresholds, each the P-th percentile of the
layer's observed norms (`gradclip.insight.calibrate`), as YAML, JSON or TOML by
the output's extension, with DL4J names; `gradclip check` and
`GradientNormalizer.from_config` read it. Exit status 0, or 2 with one line on
stderr.

Examples:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="gradclip calibrate")
    >>> add_arguments(parser)
    >>> run(parser.parse_args(["missing.gcrec", "-o", "out.yaml"]))
    2
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the arguments of `calibrate` on `parser`."""
    parser.add_argument("recording", help="a file written by GradientNormalizer(..., record=PATH)")
    parser.add_argument(
        "-o", "--output", required=True, help="the configuration to write (.yaml, .json or .toml)"
    )
    parser.add_argument(
        "--percentile",
        type=float,
        default=95.0,
        help="each threshold is this percentile of the observed norms (default 95: a layer "
        "would have been clipped on about 5%% of the recorded steps)",
    )
    parser.add_argument(
        "--scope",
        choices=("layer", "network", "param-type"),
        default="layer",
        help="per-layer thresholds (default), one for the network, or ClipL2PerParamType "
        "thresholds per layer (needs record_tensors=True)",
    )


def run(args: argparse.Namespace) -> int:
    """Write the calibrated configuration; returns the exit status."""
    prog = getattr(args, "prog", "gradclip calibrate")
    try:
        from gradclip import insight

        recording = insight.load(args.recording)
        calibration = insight.calibrate(recording, args.percentile, args.scope)
        path = insight.write_config(calibration, args.output, str(args.recording))
    except (OSError, ValueError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    alone = sum(t is None for t in calibration.layers.values())
    print(
        f"wrote {path}: {calibration.scope} thresholds at the {calibration.percentile:g}th "
        f"percentile of {calibration.steps} steps, {len(calibration.layers) - alone} layers "
        f"clipped, {alone} left alone"
    )
    return 0
