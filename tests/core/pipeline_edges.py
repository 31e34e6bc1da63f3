"""Pipeline stages at their edges, cases of the shared four-process launch (`pipeline_ranks`).

* ``nonfinite="zero"`` and ``"skip"``: NaN and inf injected into one element of
  a layer of one stage (under FSDP2, in one data-parallel rank's shard only);
  every rank must end each step exactly as the unsplit model does: the same
  layers zeroed and the same global totals without them, or every stage's step
  skipped together, with no rule's state changed.
* a stage's layers change (a layer deleted, then one frozen and unfrozen) on
  that stage only: the step must neither hang nor differ from the unsplit model
  changed alike.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch

import gradclip
from gradclip.commands.bench_distributed import CollectiveCounter

EDGE_STEPS = 10
# step -> [(parameter, flat index, value)]: on one stage, or on both (step 7)
POISON: dict[int, list[tuple[str, int, float]]] = {
    2: [("layers.1.attn.weight", 0, math.nan)],  # stage 0, dp rank 0's shard under FSDP2
    5: [("head.weight", -1, math.inf)],  # stage 1, dp rank 1's shard
    7: [("layers.0.mlp.0.bias", 0, -math.inf), ("layers.3.attn_norm.weight", 3, math.nan)],
    9: [("embed.weight", 5, math.nan)],  # stage 0, a tensor of a rule read by no other
}
NONFINITE_RULES = {
    "zero": ("global-2", "global-inf", "zclip-global", "ClipL2PerLayer"),
    "skip": ("global-2", "zclip-global", "ClipL2PerLayer"),
}
# a chain whose global member waits for round 1: the counts ride in that collective
# ("error": the chain's later collective must not wait for a rank that raised: every
# stage raises together)
NONFINITE_CHAINS = [
    ("zero", "layer-then-global"),
    ("zero", "global-then-zclip"),
    ("error", "layer-then-global"),
]
COUNTED_STEPS = (0, 3)  # a first and a steady step (3: after a non-finite one)
READ_STEP = 4


def nonfinite_cases() -> list[str]:
    return [
        f"nonfinite-{policy}:{dp}:{name}"
        for policy, names in NONFINITE_RULES.items()
        for dp in ("fsdp2", "ddp")
        for name in names
    ] + [f"nonfinite-{policy}:ddp:{name}" for policy, name in NONFINITE_CHAINS]


RELAYOUT_CASES = ["relayout:fsdp2", "relayout:ddp"]

# chains whose later members span layers (replicated gradients: on sharded ones a
# later member that reads norms is refused with or without stages), and how many
# collectives a step runs: one per round that needs the stages
CHAINS: dict[str, tuple[Any, dict[str, Any] | None, int]] = {
    "layer-then-global": (
        lambda: gradclip.chain(("ClipL2PerLayer", 0.5), gradclip.ClipGlobalNorm(1.0)),
        None,
        1,
    ),
    "elementwise-then-global-inf": (
        lambda: gradclip.chain(
            ("ClipElementWiseAbsoluteValue", 0.05), gradclip.ClipGlobalNorm(0.5, norm_type="inf")
        ),
        None,
        1,
    ),
    "global-then-zclip": (
        lambda: gradclip.chain(gradclip.ClipGlobalNorm(2.0), gradclip.ZClip(warmup_steps=3)),
        None,
        2,
    ),
    "layer-then-autoclip-p3": (  # and a global member of order 3
        lambda: gradclip.chain(
            ("ClipL2PerLayer", 0.5),
            gradclip.AutoClip(percentile=50.0),
            gradclip.ClipGlobalNorm(0.5, norm_type=3),
        ),
        None,
        2,
    ),
    "on-one-stage": (  # stage 0 has no layer of the chain: it sends zeros
        lambda: ("ClipL2PerLayer", 0.5),
        {
            "layers.3": gradclip.chain(("ClipL2PerLayer", 0.2), gradclip.ClipGlobalNorm(0.3)),
            "head": gradclip.chain(("ClipL2PerLayer", 0.2), gradclip.ClipGlobalNorm(0.3)),
        },
        1,
    ),
}
CHAIN_CASES = [f"chain:ddp:{name}" for name in CHAINS]


def poisoned(step: int, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for name, index, value in POISON.get(step, []):
        grads[name].view(-1)[index] = value
    return grads


def mismatch(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error where ``want`` is finite; inf unless NaN and inf sit alike."""
    if not torch.equal(got.isnan(), want.isnan()):
        return math.inf
    infinite = want.isinf()
    if not torch.equal(got.isinf(), infinite) or not torch.equal(got[infinite], want[infinite]):
        return math.inf
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    scale = want[finite].abs().clamp(min=1e-6)
    return float(((got[finite] - want[finite]).abs() / scale).max())


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t  # type: ignore[no-any-return]


def _split_model(ranks: Any, mesh: Any, dp: str) -> Any:
    from torch.distributed.fsdp import fully_shard

    model = ranks.split(ranks.Tiny(), mesh.get_local_rank("pp"))
    if dp == "fsdp2":
        for block in model.layers.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return model


def _apply(normalizer: gradclip.GradientNormalizer, policy: str) -> bool:
    """Whether the step was skipped ("skip") or raised ("error")."""
    if policy == "skip":
        return normalizer.apply_skipping()
    try:
        normalizer.apply()
    except gradclip.NonFiniteGradientError:
        return policy == "error"
    return False


def case_nonfinite(ranks: Any, mesh: Any, policy: str, dp: str, rule: Any) -> dict[str, Any]:
    """``EDGE_STEPS`` steps with `POISON`, against the unsplit model under ``policy``."""
    from helpers import HostReadCounter

    reference = ranks.Tiny()
    ref_norm = ranks._normalizer(reference, rule, nonfinite=policy)
    model = _split_model(ranks, mesh, dp)
    normalizer = ranks._normalizer(model, rule, pp_mesh=mesh["pp"], nonfinite=policy)
    worst, counts, reads, skipped = 0.0, [], [-1, -1], []
    for step in range(EDGE_STEPS):
        grads = poisoned(step, ranks.full_grads(step, reference))
        if dp == "ddp":
            grads = ranks._averaged(grads)
        for n, p in reference.named_parameters():
            p.grad = grads[n].clone()
        with HostReadCounter() as ref_reads:
            ref_skip = _apply(ref_norm, policy)
        ranks._set(model, grads, mesh["dp"].get_group())
        counter = CollectiveCounter() if step in COUNTED_STEPS else contextlib.nullcontext()
        with counter, HostReadCounter() as my_reads:
            my_skip = _apply(normalizer, policy)
        if isinstance(counter, CollectiveCounter):
            counts.append(len(counter.ops))
        if step == READ_STEP:
            reads = [sum(my_reads.calls.values()), sum(ref_reads.calls.values())]
        skipped.append([my_skip, ref_skip])
        for n, p in model.named_parameters():
            worst = max(worst, mismatch(_full(p.grad), reference.get_parameter(n).grad))
    torch.distributed.barrier()
    return {"worst": worst, "collectives": counts, "total_error": 0.0, "host_reads": reads,
            "skipped": skipped}  # fmt: skip


def case_relayout(ranks: Any, mesh: Any, dp: str) -> dict[str, Any]:
    """Stage 0 replaces the block ``layers.1`` by one ``Linear`` at step 3, freezes
    ``layers.0`` at 6, unfreezes it at 9; the unsplit model does the same.
    ``collectives``: at the change and at a steady step."""
    from torch.distributed.fsdp import fully_shard

    stage = mesh.get_local_rank("pp")
    rule = gradclip.ClipGlobalNorm(1.0)
    reference = ranks.Tiny()
    ref_norm = gradclip.GradientNormalizer(reference, rule)
    model = _split_model(ranks, mesh, dp)
    normalizer = gradclip.GradientNormalizer(model, rule, pp_mesh=mesh["pp"])
    worst, counts = 0.0, []
    for step in range(EDGE_STEPS):
        if step == 3:  # a smaller layer in place of a block: stage 0's vector shrinks
            reference.layers["1"] = torch.nn.Linear(8, 8)
            if stage == 0:
                layer = torch.nn.Linear(8, 8)
                if dp == "fsdp2":
                    fully_shard(layer, mesh=mesh["dp"])
                model.layers["1"] = layer
        if step in (6, 9):
            reference.layers["0"].requires_grad_(step == 9)
            if stage == 0:
                model.layers["0"].requires_grad_(step == 9)
        grads = ranks.full_grads(step, reference)
        if dp == "ddp":
            grads = ranks._averaged(grads)
        for n, p in reference.named_parameters():
            p.grad = grads[n].clone()
        ref_norm.apply()
        ranks._set(model, grads, mesh["dp"].get_group())
        counter = CollectiveCounter() if step in (3, 5) else contextlib.nullcontext()
        with counter:
            normalizer.apply()
        if isinstance(counter, CollectiveCounter):
            counts.append(len(counter.ops))
        for n, p in model.named_parameters():
            worst = max(worst, mismatch(_full(p.grad), reference.get_parameter(n).grad))
    torch.distributed.barrier()
    return {"worst": worst, "collectives": counts, "total_error": 0.0}


def edge_cases(ranks: Any, mesh: Any) -> list[tuple[str, Any]]:
    """``(case, call)`` of every edge case, for the launcher's main phase."""
    out: list[tuple[str, Any]] = []
    for policy, names in NONFINITE_RULES.items():
        for dp in ("fsdp2", "ddp"):
            for name in names:
                call = functools.partial(_nonfinite, ranks, mesh, policy, dp, name)
                out.append((f"nonfinite-{policy}:{dp}:{name}", call))
    for policy, name in NONFINITE_CHAINS:
        call = functools.partial(_nonfinite, ranks, mesh, policy, "ddp", name)
        out.append((f"nonfinite-{policy}:ddp:{name}", call))
    for dp in ("fsdp2", "ddp"):
        out.append((f"relayout:{dp}", functools.partial(case_relayout, ranks, mesh, dp)))
    for name, (make, overrides, _) in CHAINS.items():
        call = functools.partial(_chain, ranks, mesh, name, make, overrides)
        out.append((f"chain:ddp:{name}", call))
    return out


def _chain(
    ranks: Any, mesh: Any, name: str, make: Any, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    out = ranks.run_case(mesh, "ddp", name, make(), overrides, steps=EDGE_STEPS)
    return out  # type: ignore[no-any-return]


def _nonfinite(ranks: Any, mesh: Any, policy: str, dp: str, name: str) -> dict[str, Any]:
    make = CHAINS[name][0] if name in CHAINS else ranks.RULES[name]
    return case_nonfinite(ranks, mesh, policy, dp, make())
