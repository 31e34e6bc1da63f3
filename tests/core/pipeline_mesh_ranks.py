"""Pipeline stages on 2-D sub-meshes, on eight gloo processes: the cases, run in one launch.

World mesh ``(pp=2, 2, 2)``: ranks 0-3 hold stage 0, ranks 4-7 stage 1 (split
as in `pipeline_ranks`), and each stage's parameters live on a genuine 2-D
sub-mesh of its four ranks, both dims of size 2, so that every weight the
engine forms is exercised (a size-1 dim would weight nothing):

* ``hsdp``: HSDP, ``fully_shard`` over the stage's ``(replicate, shard)``
  mesh: each piece is held by 2 ranks (weighted 1/2) and split over 2; the
  final norm is left a plain tensor, held whole by all 4 (weighted 1/4);
* ``fsdp-tp``: tensor parallel of 2 (column- and row-wise layers) and FSDP2
  over the stage's dp ranks, composed on the ``(dp, tp)`` mesh; the layers left
  out of tensor parallel are on the 1-D dp mesh, one of two slices of the
  stage (weighted 1/2); the row-wise weights are split on dims 0 and 1, so
  each rank holds other rows (AGC sums each row at its global place);
* ``ep``: a mixture-of-experts stack split in two stages, the experts sharded
  over an EP mesh of 2 ranks (two copies in each stage, weighted 1/2), the
  dense layers FSDP2 over the stage's 4 ranks.

Each rank gets its share of the same full gradients, the unsplit
single-process model gets them whole, both are normalized by the same rule;
each rank records its worst relative mismatch over `STEPS` steps and how many
collectives a steady step ran. Also: a DCP checkpoint of the HSDP
stages loaded into fresh normalizers and models (in the same processes), the
configuration check refusing a rank whose rule differs, and the step's check
refusing a rank without one gradient, on every rank.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pipeline_ranks as pr
import torch
from torch import nn

import gradclip
from gradclip.commands.bench_distributed import CollectiveCounter
from gradclip.core.sharding import local_tensor

WORLD = 8
STEPS = 8  # ZClip's warm-up of 5, and the spike of step 6 (`pipeline_ranks.full_grads`)
RULES = [
    "None",
    "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType",
    "ClipElementWiseAbsoluteValue",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
    "global-2",
    "global-inf",
    "agc",
    "zclip-global",
    "zclip-layer",
    "autoclip-global",
    "autoclip-layer",
]
LAYOUTS = ("hsdp", "fsdp-tp", "ep")


@functools.cache  # one per layout and process: every case of the layout shares its groups
def _world_mesh(names: tuple[str, str, str]) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=names)


def hsdp_stage() -> tuple[nn.Module, Any]:
    """This rank's stage of `pipeline_ranks.Tiny`, HSDP over the stage's 2 x 2 ranks
    (but the final norm)."""
    from torch.distributed.fsdp import fully_shard

    mesh = _world_mesh(("pp", "replicate", "shard"))
    sub = mesh["replicate", "shard"]
    model = pr.split(pr.Tiny(), mesh.get_local_rank("pp"))
    for block in model.layers.values():
        fully_shard(block, mesh=sub)
    for top in (model.embed, model.head):
        if top is not None:
            fully_shard(top, mesh=sub)
    # stage 1's final norm stays a plain tensor, the same on the stage's 4 ranks
    return model, mesh["pp"]


def fsdp_tp_stage() -> tuple[nn.Module, Any]:
    """This rank's stage, tensor parallel of 2 inside each block, then FSDP2 over dp."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = _world_mesh(("pp", "dp", "tp"))
    model = pr.split(pr.Tiny(), mesh.get_local_rank("pp"))
    plan = {"attn": ColwiseParallel(), "mlp.0": ColwiseParallel(), "mlp.2": RowwiseParallel()}
    for block in model.layers.values():
        parallelize_module(block, mesh["tp"], plan)
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh["pp"]


class MoEBlock(nn.Module):
    def __init__(self, width: int, experts: int) -> None:
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.randn(experts, width, 2 * width))
        self.experts.w2 = nn.Parameter(torch.randn(experts, 2 * width, width))


class MoEStack(nn.Module):
    """Two mixture-of-experts blocks between an embedding and a head."""

    def __init__(self, width: int = 8, experts: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(12, width)
        self.layers = nn.ModuleDict({str(i): MoEBlock(width, experts) for i in range(2)})
        self.head = nn.Linear(width, 12)


def ep_stage() -> tuple[nn.Module, Any]:
    """Stage 0 (``embed``, ``layers.0``) or 1 (``layers.1``, ``head``): experts over EP of 2."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = _world_mesh(("pp", "dp_mod_ep", "ep"))
    stage = mesh.get_local_rank("pp")
    dp = mesh["dp_mod_ep", "ep"]._flatten("dp")  # the stage's 4 ranks
    model = MoEStack()
    if stage == 0:
        model.head = None  # type: ignore[assignment]
        del model.layers["1"]
    else:
        model.embed = None  # type: ignore[assignment]
        del model.layers["0"]
    for block in model.layers.values():
        for key in ("w1", "w2"):
            weight = getattr(block.experts, key)
            sharded = distribute_tensor(weight.data, mesh["ep"], [Shard(0)])
            setattr(block.experts, key, nn.Parameter(sharded))
        fully_shard(block.router, mesh=dp)
    for dense in (model.embed, model.head):
        if dense is not None:
            fully_shard(dense, mesh=dp)
    return model, mesh["pp"]


STAGES: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "hsdp": hsdp_stage,
    "fsdp-tp": fsdp_tp_stage,
    "ep": ep_stage,
}
REFERENCES: dict[str, Callable[[], nn.Module]] = {
    "hsdp": pr.Tiny,
    "fsdp-tp": pr.Tiny,
    "ep": MoEStack,
}


def run_case(layout: str, rule: Any) -> dict[str, Any]:
    """`STEPS` steps of this rank's stage against the unsplit model; what this rank saw."""
    reference = REFERENCES[layout]()
    ref_norm = pr._normalizer(reference, rule)
    model, pp_mesh = STAGES[layout]()
    normalizer = pr._normalizer(model, rule, pp_mesh=pp_mesh)
    worst, counts, totals = 0.0, [], []
    for step in range(STEPS):
        grads = pr.full_grads(step, reference)
        for n, p in reference.named_parameters():
            p.grad = grads[n].clone()
        ref_report = ref_norm.apply()
        pr._set(model, grads, None)
        counter = CollectiveCounter() if step == 2 else contextlib.nullcontext()  # a steady one
        with counter:
            report = normalizer.apply()
        if isinstance(counter, CollectiveCounter):
            counts.append(len(counter.ops))
        for n, p in model.named_parameters():
            worst = max(worst, pr._mismatch(pr._full(p.grad), reference.get_parameter(n).grad))
        if rule == "RenormalizeL2PerLayer" or isinstance(rule, gradclip.ClipGlobalNorm):
            got, want = float(report.total_norm()), float(ref_report.total_norm())
            totals.append(abs(got - want) / want)
    return {"worst": worst, "collectives": counts, "total_error": max(totals, default=0.0)}


def _grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: pr._full(p.grad).clone() for n, p in model.named_parameters()}


def case_checkpoint(outdir: str) -> dict[str, Any]:
    """HSDP stages: DCP save after 6 steps, load into a fresh model and normalizer,
    and both run steps 6-9 to the same bits (global and per-layer state)."""
    import torch.distributed.checkpoint as dcp

    runs = []
    for fresh in (False, True):
        model, pp_mesh = hsdp_stage()
        normalizer = gradclip.GradientNormalizer(
            model, pr.CHECKPOINT_RULE, overrides=pr.CHECKPOINT_OVERRIDES, pp_mesh=pp_mesh
        )
        path = str(Path(outdir, "mesh-checkpoint"))
        if fresh:
            target = {"normalizer": normalizer.state_dict()}
            dcp.load(target, checkpoint_id=path)
            normalizer.load_state_dict(target["normalizer"])
        else:
            for step in range(6):
                pr._set(model, pr.full_grads(step, pr.Tiny()), None)
                normalizer.apply()
            dcp.save({"normalizer": normalizer.state_dict()}, checkpoint_id=path)
        out = []
        for step in range(6, 10):
            pr._set(model, pr.full_grads(step, pr.Tiny()), None)
            normalizer.apply()
            out.append(_grads_of(model))
        runs.append(out)
    for step, (want, got) in enumerate(zip(*runs)):
        for n in want:
            if not torch.equal(got[n], want[n]):
                raise AssertionError(f"step {6 + step}, {n}: the loaded run differs")
    return {"worst": 0.0, "collectives": [], "total_error": 0.0}


def case_disagreement() -> dict[str, Any]:
    """One rank of each HSDP stage with another threshold: every rank raises, untouched."""
    import torch.distributed as dist

    model, pp_mesh = hsdp_stage()
    odd = dist.get_rank() % 4 == 3  # one rank in each stage
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", 0.2 if odd else 0.5, pp_mesh=pp_mesh
    )
    pr._set(model, pr.full_grads(0, pr.Tiny()), None)
    before = _grads_of(model)
    try:
        normalizer.apply()
    except gradclip.RankMismatchError as err:
        if "rules" not in err.settings:
            raise AssertionError(f"the error does not name the rules: {err}") from err
    else:
        raise AssertionError("ranks with different thresholds ran a step")
    after = _grads_of(model)
    if any(not torch.equal(before[n], after[n]) for n in before):
        raise AssertionError("a gradient changed before the error")
    return {"worst": 0.0, "collectives": [], "total_error": 0.0}


def case_gradient_mismatch() -> dict[str, Any]:
    """One rank of each HSDP stage without one gradient, under a rule spanning the
    stages: every rank raises in the step's one collective, no piece changes."""
    import torch.distributed as dist

    model, pp_mesh = hsdp_stage()
    normalizer = gradclip.GradientNormalizer(model, gradclip.ClipGlobalNorm(1.0), pp_mesh=pp_mesh)
    pr._set(model, pr.full_grads(0, pr.Tiny()), None)
    normalizer.apply()  # the first step, alike on every rank
    pr._set(model, pr.full_grads(1, pr.Tiny()), None)
    first = next(p for _, p in model.named_parameters())
    if dist.get_rank() % 4 == 3:
        first.grad = None
    before = {
        n: local_tensor(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None
    }
    try:
        normalizer.apply()
    except gradclip.RankMismatchError as err:
        if not err.params:
            raise AssertionError(f"the error names no parameter: {err}") from err
    else:
        raise AssertionError("a step ran with a gradient missing on one rank")
    for n, p in model.named_parameters():
        if p.grad is not None and not torch.equal(local_tensor(p.grad), before[n]):
            raise AssertionError(f"{n} changed before the error")
    return {"worst": 0.0, "collectives": [], "total_error": 0.0}


def _worker(rank: int, init_method: str, outdir: str) -> None:

    from gradclip.commands.bench_distributed import gloo_rank

    torch.set_num_threads(1)
    # full_tensor() of a (dp, tp) weight warns that it gathers twice: the test's, not ours
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    results: dict[str, Any] = {}
    with (
        gloo_rank(rank, WORLD, init_method, timeout_s=60),
        pr._written(outdir, "mesh", rank, results),
    ):
        cases: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (f"{layout}:{name}", lambda lay=layout, n=name: run_case(lay, pr.RULES[n]()))
            for layout in LAYOUTS
            for name in RULES
        ]
        cases.append(("hsdp:checkpoint", lambda: case_checkpoint(outdir)))
        cases.append(("hsdp:disagreement", case_disagreement))
        cases.append(("hsdp:gradient-mismatch", case_gradient_mismatch))
        pr.run_cases(cases, results, meet_after_each=True)


def launch(outdir: Path, timeout_s: float) -> list[dict[str, Any]]:
    """Run every case on eight processes; per rank, ``{case: result}``."""
    from gradclip.commands.bench_distributed import free_port, spawn

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    spawn(_worker, (f"tcp://127.0.0.1:{free_port()}", str(outdir)), WORLD, timeout_s)
    return [json.loads(Path(outdir, f"mesh{r}.json").read_text()) for r in range(WORLD)]


if __name__ == "__main__":  # a quick look: python tests/core/pipeline_mesh_ranks.py DIR
    import time

    start = time.monotonic()
    for r, out in enumerate(launch(Path(sys.argv[1]), 600)):
        for case, result in out.items():
            if not result["ok"] or r == 0:
                print(r, case, {k: v for k, v in result.items() if k != "msg"})
                if not result["ok"]:
                    print(result["msg"])
    print(f"{time.monotonic() - start:.1f} s")
