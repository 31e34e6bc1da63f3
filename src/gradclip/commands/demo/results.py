"""What the demo's runs did, and the tables it prints: one seed, or the spread over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from gradclip.commands.demo.config import DIVERGENCE_FACTOR, DemoConfig
from gradclip.commands.demo.task import Task

__all__ = ["DemoResults", "RunResult", "seed_summary"]


@dataclass
class RunResult:
    """What one run did.

    Attributes:
        key: `"none"`, `"clip_grad_norm_"`, `"gradclip"` or `"gradclip:<name>"`.
        label: a human-readable name for tables and plots.
        final_loss: mean training MSE of the last `final_window` steps run
            (NaN or inf if the run diverged).
        test_loss: MSE on the held-out set after training.
        diverged_step: the first step (0-based) whose loss was NaN, infinite or
            above the divergence bound, or `None`.
        max_grad_norm: the largest global L2 norm of the gradient seen, measured
            before any clipping (`inf` if it overflowed).
        learned: not diverged, and `test_loss < learned_fraction × baseline`.
        steps_run: steps actually taken (a diverged run stops early).
        seconds: wall time of the run.
        losses: the training MSE of every step run.
        grad_norms: the global gradient norm of every step run, before clipping.
        norm_steps: the steps at which per-layer norms were recorded.
        layer_norms: `{layer: [norm at each of norm_steps]}` before clipping
            (`None` where a norm was not finite).
    """

    key: str
    label: str
    final_loss: float
    test_loss: float
    diverged_step: int | None
    max_grad_norm: float
    learned: bool
    steps_run: int
    seconds: float
    losses: list[float] = field(repr=False, default_factory=list)
    grad_norms: list[float] = field(repr=False, default_factory=list)
    norm_steps: list[int] = field(repr=False, default_factory=list)
    layer_norms: dict[str, list[float | None]] = field(repr=False, default_factory=dict)


def _fmt_loss(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4f}" if x < 1e3 else f"{x:.2e}"


def _fmt_norm(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if x < 1e4 else f"{x:.2e}"


def _table(rows: list[tuple[str, ...]], footer_rows: int = 0) -> list[str]:
    """Rows as text: first column left-aligned, others right-aligned, rules around the body."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]
    rule = "-" * max(len(line) for line in lines)
    lines.insert(1, rule)
    if footer_rows:
        lines.insert(len(lines) - footer_rows, rule)
    return lines


@dataclass
class DemoResults:
    """One task's runs for one seed, the baseline they are judged against, and the configuration.

    Attributes:
        config: the `DemoConfig` the runs used.
        task: the `Task`.
        baseline: held-out MSE of predicting the target's mean.
        runs: one `RunResult` per rule, `none` and `clip_grad_norm_` first.
        initial_layer_norms: per-layer gradient norms of step 0, shared by every run.
    """

    config: DemoConfig
    task: Task
    baseline: float
    runs: list[RunResult]
    initial_layer_norms: dict[str, float | None] = field(default_factory=dict)

    def __getitem__(self, key: str) -> RunResult:
        for result in self.runs:
            if result.key == key:
                return result
        raise KeyError(f"no run {key!r}; the runs are {[r.key for r in self.runs]}")

    @property
    def divergence_bound(self) -> float:
        """The training loss above which a run counts as diverged."""
        return DIVERGENCE_FACTOR * self.baseline

    def story_holds(self) -> bool:
        """Whether the runs show what the task is there to show.

        Adding problem: without normalization the run diverges, and gradclip's
        run learns. Mixed-scale regression: gradclip's run ends with a lower
        held-out MSE than `clip_grad_norm_`'s.
        """
        gradclip_run = self["gradclip"]
        if self.task.key == "adding":
            return self["none"].diverged_step is not None and gradclip_run.learned
        global_run = self["clip_grad_norm_"]
        return (
            gradclip_run.diverged_step is None
            and math.isfinite(gradclip_run.test_loss)
            and gradclip_run.test_loss < global_run.test_loss
        )

    def story(self) -> str:
        """What `story_holds` checks, in words naming the runs as the table does."""
        gradclip_run = self["gradclip"].label
        if self.task.key == "adding":
            return f"no normalization diverged and {gradclip_run} learned"
        global_run = self["clip_grad_norm_"].label
        return f"{gradclip_run} ended with a lower test MSE than {global_run}"

    def table(self) -> str:
        """The summary table printed by `python -m gradclip demo`."""
        cfg = self.config
        header = ("run", "final loss", "test MSE", "diverged at", "max grad norm", "learned")
        rows: list[tuple[str, ...]] = [header]
        for r in self.runs:
            diverged = "-" if r.diverged_step is None else f"step {r.diverged_step}"
            rows.append(
                (
                    r.label,
                    _fmt_loss(r.final_loss),
                    _fmt_loss(r.test_loss),
                    diverged,
                    _fmt_norm(r.max_grad_norm),
                    "yes" if r.learned else "no",
                )
            )
        rows.append(("baseline (predict the mean)", f"{self.baseline:.4f}", "", "", "", ""))
        lines = _table(rows, footer_rows=1)
        initial = ", ".join(f"{k} {_fmt_norm(v)}" for k, v in self.initial_layer_norms.items())
        notes = [
            f"{self.task.describe(cfg)}, batch {cfg.batch}, SGD lr={cfg.lr}, {cfg.steps} steps, "
            f"seed {cfg.seed}, {_threads(cfg.threads)}",
            f"gradient norm by layer at step 0: {initial}",
            f"final loss: mean training MSE of the last {cfg.final_window} steps run; "
            f"test MSE: {cfg.eval_size} held-out samples; baseline: their MSE when "
            "predicting the target's mean",
            f"diverged: loss NaN, inf or > {self.divergence_bound:.3g} (100 x baseline); "
            f"learned: test MSE < {self.task.learned_fraction:g} x baseline; "
            "max grad norm: global L2 norm before clipping",
        ]
        title = f"{self.task.title}:"
        return "\n".join([title, *lines, "", *notes])


def _threads(count: int) -> str:
    return "torch's default threads" if count == 0 else f"{count} thread{'s' * (count != 1)}"


def _spread(values: Sequence[float]) -> tuple[str, str]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan", "-"
    median = statistics.median(values) if len(finite) == len(values) else math.nan
    low, high = min(finite), max(finite)
    extra = f" ({len(values) - len(finite)} nan)" if len(finite) < len(values) else ""
    return _fmt_loss(median), f"{_fmt_loss(low)} - {_fmt_loss(high)}{extra}"


def seed_summary(results: Sequence[DemoResults]) -> str:
    """The spread over seeds of one task's runs: how many learned or diverged, test MSE.

    Args:
        results: `run_demo`'s results for the same task and rules, one per seed.

    Returns:
        A table with one row per rule.

    Raises:
        ValueError: no results, or results of different tasks or rules.
    """
    if not results:
        raise ValueError("seed_summary needs the results of at least one seed")
    first = results[0]
    keys = [r.key for r in first.runs]
    if any(res.task.key != first.task.key or [r.key for r in res.runs] != keys for res in results):
        raise ValueError("seed_summary needs results of one task with the same rules")
    n = len(results)
    seeds = [res.config.seed for res in results]
    header = ("run", "learned", "diverged", "test MSE median", "min - max")
    rows: list[tuple[str, ...]] = [header]
    for i in range(len(keys)):
        runs = [res.runs[i] for res in results]
        median, span = _spread([r.test_loss for r in runs])
        learned = sum(r.learned for r in runs)
        diverged = sum(r.diverged_step is not None for r in runs)
        rows.append((runs[0].label, f"{learned}/{n}", f"{diverged}/{n}", median, span))
    baselines = [res.baseline for res in results]
    rows.append(("baseline (predict the mean)", "", "", f"{statistics.median(baselines):.4f}", ""))
    cfg = first.config
    holds = sum(res.story_holds() for res in results)
    notes = [
        f"{first.task.describe(cfg)}, batch {cfg.batch}, SGD lr={cfg.lr}, {cfg.steps} steps, "
        f"{_threads(cfg.threads)}; seeds {', '.join(map(str, seeds))}",
        f"learned: test MSE < {first.task.learned_fraction:g} x baseline",
        f"on {holds}/{n} seeds {first.story()}",
    ]
    title = f"{first.task.title}, {n} seeds:"
    return "\n".join([title, *_table(rows, footer_rows=1), "", *notes])
