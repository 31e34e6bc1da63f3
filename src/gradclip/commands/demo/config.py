"""The demo's settings: per task, the full run and the ``--quick`` one."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from gradclip.commands.demo.task import TASKS
from gradclip.core.rule import Rule

__all__ = ["DIVERGENCE_FACTOR", "DemoConfig"]

#: A run diverged once its training loss exceeds this multiple of the baseline MSE
#: (or is NaN / infinite).
DIVERGENCE_FACTOR = 100.0

# Per task, the full and the --quick settings (fields of DemoConfig).
_DEFAULTS: dict[tuple[str, bool], dict[str, Any]] = {
    ("adding", False): {
        "steps": 5000,
        "seq_len": 20,
        "hidden": 64,
        "batch": 64,
        "lr": 0.1,
        "final_window": 200,
        "eval_size": 4096,
    },
    ("adding", True): {
        "steps": 1500,
        "seq_len": 10,
        "hidden": 32,
        "batch": 32,
        "lr": 0.1,
        "final_window": 100,
        "eval_size": 2048,
    },
    ("scales", False): {
        "steps": 2000,
        "hidden": 64,
        "batch": 64,
        "lr": 0.02,
        "final_window": 200,
        "eval_size": 4096,
    },
    ("scales", True): {
        "steps": 600,
        "hidden": 32,
        "batch": 64,
        "lr": 0.05,
        "final_window": 100,
        "eval_size": 2048,
    },
}


@dataclass
class DemoConfig:
    """Hyper-parameters of one task's runs (build it with `for_task`).

    Attributes:
        task: `"adding"` or `"scales"` (see `gradclip.commands.demo.task`).
        steps: SGD steps per run.
        seed: seeds the initial weights, the training batches and the held-out set.
        seq_len: sequence length `T` (adding problem).
        hidden: hidden units of the model.
        batch: samples per step.
        lr: SGD learning rate (no momentum), the same for every run.
        init_scale: the recurrent matrix starts as `init_scale ×` an orthogonal
            matrix (adding problem).
        large_scale: how much larger the units of the large features are (scales).
        threshold: the threshold of torch's global clip and of gradclip's DL4J modes.
        strategies: gradclip's rules, one run each: DL4J mode names, names of
            `gradclip.commands.strategies.STRATEGY_FACTORIES`, or rule objects.
        final_window: the final training loss is the mean of this many last steps.
        eval_size: samples in the held-out set.
        log_every: the loss is read to the host (progress bar, divergence check)
            once every this many steps, not every step.
        record_every: record per-layer gradient norms every this many steps
            (`0`: never; the plot needs them).
        threads: torch's intra-op threads while training (`0`: leave torch's
            setting). The models are tiny: one thread is as fast as two here, and
            makes the numbers independent of the machine's core count.
    """

    task: str = "adding"
    steps: int = 5000
    seed: int = 0
    seq_len: int = 20
    hidden: int = 64
    batch: int = 64
    lr: float = 0.1
    init_scale: float = 1.5
    large_scale: float = 30.0
    threshold: float = 1.0
    strategies: tuple[str | Rule, ...] = ("ClipL2PerLayer",)
    final_window: int = 200
    eval_size: int = 4096
    log_every: int = 25
    record_every: int = 0
    threads: int = 1

    @classmethod
    def for_task(cls, task: str = "adding", quick: bool = False, **overrides: Any) -> DemoConfig:
        """The defaults of `task` (full, or `--quick`), with `overrides` applied.

        Raises:
            ValueError: an unknown task or field.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown demo setting(s) {unknown}; valid: {sorted(names)}")
        values: dict[str, Any] = {**_DEFAULTS[(task, quick)], **overrides, "task": task}
        if isinstance(values.get("strategies"), str | Rule):
            values["strategies"] = (values["strategies"],)
        return cls(**values)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """The adding problem's `--quick` configuration (CI: a few seconds, same story)."""
        return cls.for_task("adding", quick=True, **overrides)

    @property
    def strategy(self) -> str | Rule:
        """The first of gradclip's rules (the `gradclip` run)."""
        return self.strategies[0]
