"""`python -m gradclip demo`: networks trained without clipping, with torch's, with gradclip's.

Two tasks (`gradclip.commands.demo.task`): the adding problem, where a tanh RNN's
gradients explode, and a mixed-scale regression, where one layer carries most
of the global gradient norm. For each, the same initial weights and batches
are trained with SGD without normalization, with
`torch.nn.utils.clip_grad_norm_` and with gradclip (`ClipL2PerLayer` unless
`--strategy` says otherwise), and a table says what each run did
(`gradclip.commands.demo.training`). `--seeds` prints the spread over several
seeds instead; `--plot` draws the per-layer gradient norms
(`gradclip.commands.demo.plot`); `--calibrate` records, reads and calibrates
(`gradclip.commands.demo.calibrated`).

Examples:
    >>> results = run_demo(300, task="scales", quick=True)
    >>> print(results.table())  # doctest: +ELLIPSIS
    mixed-scale regression:
    run                                     final loss  test MSE  diverged at  max grad norm ...
    ...
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from gradclip.commands.demo.config import DIVERGENCE_FACTOR, DemoConfig
from gradclip.commands.demo.plot import MATPLOTLIB_HINT, plot
from gradclip.commands.demo.results import DemoResults, RunResult, seed_summary
from gradclip.commands.demo.task import TASKS, adding_problem_batch, baseline_mse
from gradclip.commands.demo.training import make_strategy, run_demo
from gradclip.commands.strategies import strategy_names

__all__ = [
    "DIVERGENCE_FACTOR",
    "DemoConfig",
    "DemoResults",
    "RunResult",
    "add_arguments",
    "adding_problem_batch",
    "baseline_mse",
    "make_strategy",
    "parse_seeds",
    "plot",
    "run",
    "run_demo",
    "seed_summary",
    "strategy_names",
]

#: The largest number of seeds `--seeds` accepts: a spread, not a sweep.
MAX_SEEDS = 100


def parse_seeds(text: str) -> list[int]:
    """`--seeds`: `0-4`, `0,3,7` or a mix (`0-2,9`); seeds are >= 0, each given once.

    Raises:
        ValueError: anything else.

    Examples:
        >>> parse_seeds("0-2,9")
        [0, 1, 2, 9]
    """
    seeds: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first = int(low)
            last = int(high) if dash else first
        except ValueError:
            raise ValueError(f"--seeds takes seeds like 0-4 or 0,3,7, got {text!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"--seeds: {part.strip()!r} is not a range of seeds >= 0")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds) or len(seeds) > MAX_SEEDS:
        raise ValueError(f"--seeds: each seed once, at most {MAX_SEEDS}; got {text!r}")
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m gradclip demo`."""
    parser.add_argument(
        "--task",
        choices=[*TASKS, "all"],
        default="all",
        help="adding (tanh RNN, exploding gradients), scales (one layer dominating the "
        "global norm), or all (default)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small configurations that run in seconds (CI)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--seeds",
        default=None,
        metavar="SPEC",
        help="run several seeds (0-4, 0,3,7) and print the spread of the results",
    )
    parser.add_argument(
        "--strategy",
        default=None,
        metavar="NAME[,NAME...]",
        help="gradclip's rule(s), one run each (default ClipL2PerLayer); names: "
        + ", ".join(strategy_names()),
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="SGD steps per run (default: per task)"
    )
    parser.add_argument(
        "--lr", type=float, default=None, help="SGD learning rate (default: per task)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="threshold of clip_grad_norm_ and of the DL4J modes (default 1.0)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while training (default 1: the same numbers on every run, "
        "whatever the machine's core count; 0 leaves torch's setting)",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="FILE.png",
        help="draw the loss and per-layer gradient norms of every run (needs matplotlib)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars: a line as each run ends instead (for logs)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="mixed-scale task: record a run, name its dominant layer, train calibrated "
        "configurations (gradclip calibrate) beside the hand-set per-layer one",
    )


def _error(args: argparse.Namespace, message: str) -> int:
    print(f"{getattr(args, 'prog', None) or 'gradclip demo'}: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments.

    Returns:
        The exit status: 0; 2 for bad options; 1 when, with the default settings,
        a task does not show what it is there to show (so CI notices).
    """
    tasks = list(TASKS) if args.task == "all" else [args.task]
    if getattr(args, "calibrate", False):
        from gradclip.commands.demo.calibrated import calibrated_demo

        print(calibrated_demo(args.seed, quick=args.quick))
        return 0
    try:
        seeds = parse_seeds(args.seeds) if args.seeds is not None else [args.seed]
        names = [n for n in (args.strategy or "ClipL2PerLayer").split(",") if n.strip()]
        for name in names:
            make_strategy(name, args.threshold if args.threshold is not None else 1.0)
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {args.threads}")
    except (ValueError, TypeError) as error:
        return _error(args, str(error))
    if args.plot is not None:
        if args.seeds is not None:
            return _error(args, "--plot draws one seed; leave out --seeds")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _error(args, MATPLOTLIB_HINT)
    options: dict[str, Any] = {
        "quick": args.quick,
        "lr": args.lr,
        "threshold": args.threshold,
        "strategy": names,
        # Per-layer norms are read to the host only for the plot (every step: one
        # small transfer, which costs little next to a step of these models).
        "record_every": 1 if args.plot is not None else 0,
        "progress": "lines" if args.no_progress else True,
        "threads": args.threads,
    }
    start = time.perf_counter()
    by_task = {
        task: [run_demo(args.steps, seed, task=task, **options) for seed in seeds] for task in tasks
    }
    elapsed = time.perf_counter() - start
    for results in by_task.values():
        print()
        print(results[0].table() if len(seeds) == 1 else seed_summary(results))
    print(f"\ntotal time {elapsed:.1f} s")
    if args.plot is not None:
        plot([results[0] for results in by_task.values()], args.plot)
        print(f"plot written to {args.plot}")
    if len(seeds) > 1:
        return 0  # a report of the spread: each seed's outcome is in the table
    failed = [task for task, results in by_task.items() if not results[0].story_holds()]
    if not failed:
        return 0
    for task in failed:
        story = by_task[task][0].story()
        print(f"note: with these settings the {TASKS[task].title} does not show that {story}")
    # With the defaults this is a regression (CI runs --quick); with options a user
    # chose, it is just what those settings do.
    custom = any(
        value is not None for value in (args.steps, args.lr, args.threshold, args.strategy)
    )
    return 0 if custom or args.seed != 0 or args.threads != 1 else 1
