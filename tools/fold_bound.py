"""Where a folded clip + fused AdamW step spends its CPU time, against its bound.

    python tools/fold_bound.py [repetitions]

GPT-2-small shaped float32 gradients, one thread, CPU time, interleaved
medians. A folded step is gradclip's norms (one read of the gradients) plus
the fused step with a ``grad_scale``, which on the CPU writes the divided
gradients back. Prints each part, gradclip's own work beyond the norms, and
the folded step over that bound and over torch's ``clip_grad_norm_`` + step.
"""

from __future__ import annotations

import sys

import torch
from cpu_time_ratios import _medians
from torch import nn

import gradclip
from gradclip.commands.bench import _gpt2
from gradclip.core.folding import FusedArgs
from gradclip.core.kernels import Runs


def main(reps: int) -> None:
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    model = _gpt2(cpu, 12)
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]

    def adamw() -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)

    plain, scaled, folded, reference = adamw(), adamw(), adamw(), adamw()
    normalizer = gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(1.0))
    normalizer.attach(folded)
    engine = normalizer._engine
    one = torch.ones(())
    keys = [(g.device, g.dtype) for g in grads]
    runs = Runs(range(len(grads)), keys, [False] * len(grads), numels=[g.numel() for g in grads])

    def scaled_step() -> None:
        scaled.grad_scale = one  # type: ignore[attr-defined]
        scaled.step()
        del scaled.grad_scale  # type: ignore[attr-defined]

    def clip_step() -> None:
        nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        reference.step()

    flat = torch.empty(sum(g.numel() for g in grads)).uniform_()
    ms = _medians(
        {
            "read (flat.sum)": flat.sum,
            "fused AdamW step": plain.step,
            "fused AdamW step, grad_scale set": scaled_step,
            "gradclip norms": lambda: runs.norms(grads, 2.0, cpu, torch.float32),
            "gradclip engine step, folded": lambda: engine.step(FusedArgs(fold=True)),
            "torch _foreach_mul_ (by 1)": lambda: torch._foreach_mul_(grads, one),
            "torch clip_grad_norm_ + step": clip_step,
            "gradclip folded + step": folded.step,
        },
        reps,
    )
    print(f"torch {torch.__version__}, 1 thread, CPU time, medians of {reps}")
    for name, value in ms.items():
        print(f"  {name:<40} {value:8.2f} ms")
    bound = ms["gradclip norms"] + ms["fused AdamW step, grad_scale set"]
    own = ms["gradclip engine step, folded"] - ms["gradclip norms"]
    folded_ms, torch_ms = ms["gradclip folded + step"], ms["torch clip_grad_norm_ + step"]
    write_back = ms["fused AdamW step, grad_scale set"] - ms["fused AdamW step"]
    print(f"  grad_scale's write-back                  {write_back:8.2f} ms")
    print(f"  gradclip's own work beyond the norms     {own:8.2f} ms")
    print(
        f"  bound: norms + step with grad_scale      {bound:8.2f} ms  {bound / torch_ms:.2f}x torch"
    )
    ideal = ms["read (flat.sum)"] + ms["fused AdamW step, grad_scale set"]
    print(
        f"  bound with a norm at one read            {ideal:8.2f} ms  {ideal / torch_ms:.2f}x torch"
    )
    ratios = f"{folded_ms / torch_ms:.2f}x torch, {folded_ms / bound:.2f}x bound"
    print(f"  folded + step                            {folded_ms:8.2f} ms  {ratios}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
