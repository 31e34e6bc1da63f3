"""Memory and per-step time of the adaptive rules over a long run, at 10², 10⁴ and 10⁵ steps.

Usage: ``python tools/long_run_cost.py [--steps 100000] [--unbounded-steps 20000]``

Each rule runs ``apply()`` on an 8-layer MLP's gradients (a bank of 16 sets,
one in five a spike, copied in before each step: no backward pass to time).
At each checkpoint it prints the bytes of the rule's state (what
``state_dict()`` holds) and the median time of ``apply()`` over the steps
since the previous checkpoint (at most the last 1,000), per step and per layer.
``AutoClip(history_size=None)`` (the paper's unbounded history) runs up to
``--unbounded-steps`` only: its sort grows with the run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

import gradclip

LAYERS = 8


def _state_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        if set(state) == {"dtype", "shape", "data"}:
            return len(state["data"])
        return sum(_state_bytes(v) for v in state.values())
    return 0


def run(rule: gradclip.Rule, checkpoints: list[int]) -> list[tuple[int, int, float]]:
    """``(steps, state bytes, median µs per step)`` at each checkpoint."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(LAYERS)])
    gen = torch.Generator().manual_seed(1)
    bank = [
        [
            torch.randn(p.shape, generator=gen) * (30.0 if i % 5 == 4 else 1.0)
            for p in model.parameters()
        ]
        for i in range(16)
    ]
    for p, g in zip(model.parameters(), bank[0]):
        p.grad = g.clone()
    normalizer = gradclip.GradientNormalizer(model, rule)
    out, times, step = [], [], 0
    for stop in checkpoints:
        times.clear()
        while step < stop:
            torch._foreach_copy_([p.grad for p in model.parameters()], bank[step % 16])
            start = time.perf_counter()
            normalizer.apply()
            times.append(time.perf_counter() - start)
            step += 1
        recent = times[-1000:]
        out.append((stop, _state_bytes(normalizer.state_dict()), statistics.median(recent) * 1e6))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--unbounded-steps", type=int, default=20_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    checkpoints = [n for n in (100, 10_000, 100_000, args.steps) if n <= args.steps]
    rules: list[tuple[gradclip.Rule, list[int]]] = [
        (gradclip.AutoClip(), sorted(set(checkpoints))),
        (gradclip.AutoClip(scope="layer"), sorted(set(checkpoints))),
        (gradclip.ZClip(), sorted(set(checkpoints))),
        (gradclip.ZClip(scope="layer"), sorted(set(checkpoints))),
        (
            gradclip.AutoClip(history_size=None),
            sorted({n for n in (100, 10_000, args.unbounded_steps) if n <= args.unbounded_steps}),
        ),
    ]
    print(f"torch {torch.__version__}, 1 thread, {LAYERS} layers")
    print(f"{'rule':<62} {'steps':>7} {'state bytes':>11} {'µs/step':>8} {'µs/layer':>8}")
    for rule, points in rules:
        for steps, size, micros in run(rule, points):
            per_layer = micros / LAYERS
            line = f"{rule.describe():<62} {steps:>7} {size:>11} {micros:>8.0f} {per_layer:>8.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
