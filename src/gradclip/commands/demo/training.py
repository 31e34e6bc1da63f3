"""The demo's training runs: the same weights and batches, trained with each clipping rule.

For one task and one seed, `run_demo` trains the task's model with plain SGD:

1. without normalization (`none`),
2. with `torch.nn.utils.clip_grad_norm_` (one global norm, `clip_grad_norm_`),
3. with gradclip, by default DL4J's `ClipL2PerLayer` (one norm per layer),
   attached to the optimizer (`gradclip`); further rules add runs
   `gradclip:<name>`.

A run *diverges* at the first step whose loss is NaN, infinite or above
`DIVERGENCE_FACTOR × baseline`, and then stops; it *learned* if it did not
diverge and its held-out MSE is under the task's `learned_fraction` of the
baseline. Torch runs on `threads` threads (one by default), so a run gives the
same numbers every time on a given build of torch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from gradclip.commands.demo.config import DIVERGENCE_FACTOR, DemoConfig
from gradclip.commands.demo.results import DemoResults, RunResult
from gradclip.commands.demo.task import TASKS, Task
from gradclip.commands.strategies import strategy_from_name
from gradclip.core.rule import Rule
from gradclip.normalizer import GradientNormalizer

__all__ = ["make_strategy", "run_demo"]


def make_strategy(name: str | Rule, threshold: float) -> Rule:
    """A rule for a gradclip run.

    Args:
        name: a rule object (used as is), a DL4J mode name, or a short name of
            `gradclip.commands.strategies.STRATEGY_FACTORIES` (any case).
        threshold: the threshold of a DL4J mode and of `global`.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if isinstance(name, Rule):
        return name
    return strategy_from_name(name, threshold)


Progress = bool | Literal["lines"]


class _Progress:
    """A tqdm bar if tqdm is installed and wanted (``True``); with ``"lines"`` one
    line per finished run instead; else (``False``) nothing."""

    def __init__(self, enabled: Progress, total: int, desc: str) -> None:
        self._bar: Any = None
        self._lines = enabled == "lines"
        self._desc = desc
        if enabled is True:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is in the `demo` extra; train without a bar
                print(f"{desc}: training {total} steps (pip install tqdm for a progress bar)")
            else:
                self._bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def update(self, n: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def close(self, steps: int, seconds: float) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._lines:  # flushed: a log shows the run as soon as it is over
            print(f"{self._desc}: {steps} steps in {seconds:.1f} s", flush=True)


@dataclass
class _Run:
    key: str
    label: str
    strategy: Rule | None = None
    norm_steps: list[int] = field(default_factory=list)
    layer_norms: dict[str, list[float | None]] = field(default_factory=dict)


def _train(
    run: _Run,
    cfg: DemoConfig,
    task: Task,
    initial: nn.Module,
    eval_set: tuple[torch.Tensor, torch.Tensor],
    baseline: float,
    progress: Progress,
) -> RunResult:
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    # Gradient norms are measured before clipping in every run: gradclip's runs
    # read them from their own report (measure_all: also for rules that need no
    # norms); the others use a normalizer in mode None, which only measures.
    normalizer: GradientNormalizer | None = None
    meter = GradientNormalizer(model, None, measure_all=True)
    if run.strategy is not None:
        normalizer = GradientNormalizer(model, run.strategy, measure_all=True)
        normalizer.attach(optimizer)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = torch.full((cfg.steps,), math.nan)
    norms = torch.full((cfg.steps,), math.nan)
    bound = DIVERGENCE_FACTOR * baseline
    bar = _Progress(progress, cfg.steps, f"{task.key}, seed {cfg.seed}: {run.label}")
    start = time.perf_counter()
    last_read, steps_run, diverged = 0, cfg.steps, False
    for step in range(cfg.steps):
        x, y = task.batch(cfg.batch, cfg, generator)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        recording = cfg.record_every > 0 and step % cfg.record_every == 0
        report = None
        if run.key == "none":
            report = meter.apply()
            norms[step] = report.total_norm()
        elif run.key == "clip_grad_norm_":
            if recording:
                report = meter.apply()
            norms[step] = nn.utils.clip_grad_norm_(model.parameters(), cfg.threshold)
        optimizer.step()  # gradclip's runs: the normalizer runs here, as a pre-hook
        if normalizer is not None:
            report = normalizer.last_report
            assert report is not None
            norms[step] = report.total_norm()
        if recording and report is not None:
            run.norm_steps.append(step)
            for layer, value in report.to_dict()["layer_norms"].items():
                finite = value is not None and math.isfinite(value)
                run.layer_norms.setdefault(layer, []).append(value if finite else None)
        losses[step] = loss.detach()
        # One read to the host every log_every steps, not one per step.
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            chunk = losses[last_read : step + 1]
            bad = (~torch.isfinite(chunk)) | (chunk > bound)
            mean_loss, any_bad = torch.stack([chunk.mean(), bad.any().double()]).tolist()
            bar.update(step + 1 - last_read, mean_loss)
            last_read = step + 1
            if any_bad:  # nothing more to learn from NaN weights: stop this run
                steps_run, diverged = step + 1, True
                break
    seconds = time.perf_counter() - start
    bar.close(steps_run, seconds)

    losses, norms = losses[:steps_run], norms[:steps_run]
    bad = (~torch.isfinite(losses)) | (losses > bound)
    diverged_step = int(bad.nonzero()[0, 0]) if diverged else None
    measured = norms[~torch.isnan(norms)]
    x_eval, y_eval = eval_set
    with torch.no_grad():
        test_loss = float(nn.functional.mse_loss(model(x_eval), y_eval))
    learned = (
        diverged_step is None
        and math.isfinite(test_loss)
        and test_loss < task.learned_fraction * baseline
    )
    return RunResult(
        key=run.key,
        label=run.label,
        final_loss=float(losses[-cfg.final_window :].mean()),
        test_loss=test_loss,
        diverged_step=diverged_step,
        max_grad_norm=float(measured.max()) if measured.numel() else math.nan,
        learned=learned,
        steps_run=steps_run,
        seconds=seconds,
        losses=losses.tolist(),
        grad_norms=norms.tolist(),
        norm_steps=run.norm_steps,
        layer_norms=run.layer_norms,
    )


def _initial_layer_norms(
    cfg: DemoConfig, task: Task, initial: nn.Module
) -> dict[str, float | None]:
    """The per-layer gradient norms of step 0, which every run shares."""
    model = copy.deepcopy(initial)
    x, y = task.batch(cfg.batch, cfg, torch.Generator().manual_seed(cfg.seed))
    nn.functional.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
    norms: dict[str, float | None] = (
        GradientNormalizer(model, None, measure_all=True).apply().to_dict()["layer_norms"]
    )
    return norms


def run_demo(
    steps: int | None = None,
    seed: int = 0,
    *,
    task: str = "adding",
    quick: bool = False,
    lr: float | None = None,
    threshold: float | None = None,
    strategy: str | Rule | Sequence[str | Rule] | None = None,
    record_every: int = 0,
    progress: Progress = False,
    **overrides: Any,
) -> DemoResults:
    """Train one task's model with each rule and return what happened.

    Args:
        steps: SGD steps per run (default: the task's, see `DemoConfig.for_task`).
        seed: seeds the initial weights, the batches and the held-out set.
        task: `"adding"` or `"scales"`.
        quick: the small CI configuration of the task.
        lr: SGD learning rate (default: the task's).
        threshold: threshold of torch's global clip and of the DL4J modes (default 1.0).
        strategy: gradclip's rule, or several (one run each); default
            `"ClipL2PerLayer"`. See `make_strategy`.
        record_every: record per-layer gradient norms every this many steps
            (0: never), for `gradclip.commands.demo.plot.plot`.
        progress: show a progress bar per run (``True``), a line as each run
            ends (``"lines"``), or nothing (``False``).
        **overrides: any other `DemoConfig` field.

    Returns:
        `DemoResults`: `results["none"]`, `results["clip_grad_norm_"]`,
        `results["gradclip"]` and, for further rules, `results["gradclip:<name>"]`.

    Raises:
        ValueError: an unknown task, setting or rule name, or `steps` < 1.

    Examples:
        >>> results = run_demo(200, task="scales", quick=True)
        >>> [run.key for run in results.runs]
        ['none', 'clip_grad_norm_', 'gradclip']
        >>> results["gradclip"].label
        'gradclip ClipL2PerLayer(threshold=1.0)'
    """
    values: dict[str, Any] = dict(overrides)
    values["seed"] = seed
    values["record_every"] = record_every
    if strategy is not None:
        values["strategies"] = (strategy,) if isinstance(strategy, str | Rule) else tuple(strategy)
    for name, value in (("steps", steps), ("lr", lr), ("threshold", threshold)):
        if value is not None:
            values[name] = value
    cfg = DemoConfig.for_task(task, quick=quick, **values)
    if cfg.steps < 1:
        raise ValueError(f"steps must be at least 1, got {cfg.steps}")
    if not cfg.strategies:
        raise ValueError("at least one gradclip rule is needed")
    the_task = TASKS[cfg.task]
    rules = [make_strategy(s, cfg.threshold) for s in cfg.strategies]
    runs = [
        _Run("none", "no normalization"),
        _Run("clip_grad_norm_", f"torch clip_grad_norm_({cfg.threshold:g})"),
    ]
    for i, (given, rule) in enumerate(zip(cfg.strategies, rules)):
        key = "gradclip" if i == 0 else f"gradclip:{given if isinstance(given, str) else i}"
        runs.append(_Run(key, f"gradclip {rule.describe()}", rule))

    # The same initial weights for every run, without touching the global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        initial = the_task.model(cfg)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    eval_set = the_task.batch(cfg.eval_size, cfg, eval_gen)
    baseline = the_task.baseline(eval_set[1])

    saved_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        initial_norms = _initial_layer_norms(cfg, the_task, initial)
        results = [
            _train(run, cfg, the_task, initial, eval_set, baseline, progress) for run in runs
        ]
    finally:
        torch.set_num_threads(saved_threads)
    return DemoResults(
        config=replace(cfg),
        task=the_task,
        baseline=baseline,
        runs=results,
        initial_layer_norms=initial_norms,
    )
