"""Pipeline stages x data parallel on four gloo processes: the cases, run in one launch.

World mesh ``(pp=2, dp=2)``: ranks 0, 1 hold stage 0 (``embed``, ``layers.0``,
``layers.1``), ranks 2, 3 stage 1 (``layers.2``, ``layers.3``, ``norm``,
``head``), each a copy of the whole model with the other stage's modules
deleted, as torchtitan splits a model. Data parallel is either FSDP2
(``fully_shard`` over the dp mesh, gradients as ``DTensor`` shards) or
replicated (DDP's averaged gradients, plain tensors). Every step each rank
gets its share of the same full gradients, the unsplit single-process model
gets them whole, and both are normalized by the same rule; each rank records
whether its gradients match the unsplit model's within ``RTOL`` and how many
collectives a steady step ran.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradclip
from gradclip.commands.bench_distributed import CollectiveCounter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers
from helpers import HostReadCounter

WORLD = 4
STEPS = 20
RTOL = 1e-5
STAGE_OF = {"embed": 0, "layers.0": 0, "layers.1": 0, "layers.2": 1, "layers.3": 1, "norm": 1}
STAGE_OF["head"] = 1


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )


class Tiny(nn.Module):
    """A transformer-like stack small enough for four processes on two cores."""

    def __init__(self, width: int = 8, vocab: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleDict({str(i): Block(width) for i in range(4)})
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)


def split(model: Tiny, stage: int) -> Tiny:
    """Stage ``stage`` of ``model``: the other stage's modules deleted, names kept."""
    for name in ("embed", "norm", "head"):
        if STAGE_OF[name] != stage:
            setattr(model, name, None)
    for key in list(model.layers):
        if STAGE_OF[f"layers.{key}"] != stage:
            del model.layers[key]
    return model


def full_grads(step: int, model: nn.Module) -> dict[str, torch.Tensor]:
    """The step's gradients of the whole model: spread over decades, spikes on some steps."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        scale = 10.0 ** ((i % 5) - 2) * (30.0 if step % 7 == 6 else 1.0)
        out[name] = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
    return out


RULES: dict[str, Callable[[], Any]] = {
    "None": lambda: "None",
    "RenormalizeL2PerLayer": lambda: "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType": lambda: "RenormalizeL2PerParamType",
    "ClipElementWiseAbsoluteValue": lambda: ("ClipElementWiseAbsoluteValue", 0.05),
    "ClipL2PerLayer": lambda: ("ClipL2PerLayer", 0.5),
    "ClipL2PerParamType": lambda: ("ClipL2PerParamType", 0.2),
    "global-2": lambda: gradclip.ClipGlobalNorm(1.0),
    "global-inf": lambda: gradclip.ClipGlobalNorm(0.5, norm_type="inf"),
    "global-3": lambda: gradclip.ClipGlobalNorm(1.0, norm_type=3),
    "agc": lambda: gradclip.AdaptiveGradClip(0.05),
    "zclip-global": lambda: gradclip.ZClip(warmup_steps=5),
    "zclip-layer": lambda: gradclip.ZClip(warmup_steps=5, scope="layer"),
    "autoclip-global": lambda: gradclip.AutoClip(percentile=50.0),
    "autoclip-layer": lambda: gradclip.AutoClip(percentile=50.0, scope="layer"),
    "chain-global-first": lambda: gradclip.chain(
        gradclip.ClipGlobalNorm(1.0), ("ClipElementWiseAbsoluteValue", 0.05)
    ),
}
# overrides whose groups span both stages: layers.1 and head clip their norm together
OVERRIDES = {"layers.1": gradclip.ClipGlobalNorm(0.3), "head": gradclip.ClipGlobalNorm(0.3)}
# rules that need nothing from other stages: replicated (DDP) steps send nothing
PER_LAYER = {
    "None",
    "RenormalizeL2PerLayer",
    "RenormalizeL2PerParamType",
    "ClipElementWiseAbsoluteValue",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
    "agc",
    "zclip-layer",
    "autoclip-layer",
}


def _normalizer(model: Any, rule: Any, **kwargs: Any) -> gradclip.GradientNormalizer:
    if isinstance(rule, tuple):
        return gradclip.GradientNormalizer(model, rule[0], rule[1], **kwargs)
    return gradclip.GradientNormalizer(model, rule, **kwargs)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t  # type: ignore[no-any-return]


def _set(model: nn.Module, grads: dict[str, torch.Tensor], dp_group: Any) -> None:
    """Give ``model`` its part of ``grads``: a shard (FSDP2) or the dp average (DDP)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        g = grads[name].clone()
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        elif dp_group is None:  # replicated on every rank of a tensor-parallel stage
            p.grad = g
        else:  # DDP: each replica's own gradient, then the average over the replicas
            local = g * (0.5 + dist.get_rank(dp_group))
            dist.all_reduce(local, group=dp_group)
            p.grad = local / 2


def _averaged(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What DDP's average of the two replicas in `_set` gives, computed alike."""
    return {n: (g * 0.5 + g * 1.5) / 2 for n, g in grads.items()}


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().clamp(min=1e-6)
    return float(((got - want).abs() / scale).max())


def run_case(
    mesh: Any,
    dp: str,
    name: str,
    rule: Any,
    overrides: dict[str, Any] | None = None,
    steps: int = STEPS,
) -> dict[str, Any]:
    """``steps`` steps of the split model against the unsplit one; what this rank saw."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    stage = mesh.get_local_rank("pp")
    dp_mesh, pp_mesh = mesh["dp"], mesh["pp"]
    reference = Tiny()
    ref_norm = _normalizer(reference, rule, overrides=overrides)
    model = split(Tiny(), stage)
    if dp == "fsdp2":
        for block in model.layers.values():
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    normalizer = _normalizer(model, rule, overrides=overrides, pp_mesh=pp_mesh)
    worst, counts, totals, host_reads = 0.0, [], [], -1
    for step in range(steps):
        grads = full_grads(step, reference)
        if dp == "ddp":
            grads = _averaged(grads)
        for n, p in reference.named_parameters():
            p.grad = grads[n].clone()
        ref_report = ref_norm.apply()
        _set(model, grads, dp_mesh.get_group())
        counter = CollectiveCounter() if step in (0, 2) else contextlib.nullcontext()
        reads = HostReadCounter() if step == 3 else contextlib.nullcontext()
        with counter, reads:
            report = normalizer.apply()
        if isinstance(counter, CollectiveCounter):
            counts.append(len(counter.ops))
        if isinstance(reads, HostReadCounter):
            host_reads = sum(reads.calls.values())
        for n, p in model.named_parameters():
            worst = max(worst, _mismatch(_full(p.grad), reference.get_parameter(n).grad))
        if rule == "ClipL2PerLayer" or name == "global-2":
            got, want = float(report.total_norm()), float(ref_report.total_norm())
            totals.append(abs(got - want) / want)
    dist.barrier()
    return {
        "worst": worst,
        "collectives": counts,
        "total_error": max(totals, default=0.0),
        "host_reads": host_reads,
    }


def case_interleaved(mesh: Any, name: str, rule: Any) -> dict[str, Any]:
    """Two stages per rank (``stages=``): pp rank 0 holds layers 0 and 2, rank 1 the rest."""
    stage = mesh.get_local_rank("pp")
    pp_mesh = mesh["pp"]
    reference = Tiny()
    ref_norm = _normalizer(reference, rule)
    mine = {0: ["embed", "layers.0", "layers.2"], 1: ["layers.1", "layers.3", "norm", "head"]}
    chunks = []
    for names in ([n for n in mine[stage] if n != "layers.2"], ["layers.2"] if stage == 0 else []):
        if not names:
            continue
        chunk = Tiny()
        for top in ("embed", "norm", "head"):
            if top not in names:
                setattr(chunk, top, None)
        for key in list(chunk.layers):
            if f"layers.{key}" not in names:
                del chunk.layers[key]
        chunks.append(chunk)
    normalizer = _normalizer(None, rule, stages=chunks, pp_mesh=pp_mesh)
    worst = 0.0
    for step in range(STEPS):
        grads = full_grads(step, reference)
        for n, p in reference.named_parameters():
            p.grad = grads[n].clone()
        ref_norm.apply()
        for chunk in chunks:
            for n, p in chunk.named_parameters():
                p.grad = grads[n].clone()
        normalizer.apply()
        for chunk in chunks:
            for n, p in chunk.named_parameters():
                worst = max(worst, _mismatch(p.grad, reference.get_parameter(n).grad))
    return {"worst": worst, "collectives": [], "total_error": 0.0}


class MoE(nn.Module):
    """Dense layers and four experts: the experts' weights are ``(experts, in, out)``."""

    def __init__(self, width: int = 8, experts: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(12, width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.randn(experts, width, 2 * width))
        self.experts.w2 = nn.Parameter(torch.randn(experts, 2 * width, width))
        self.head = nn.Linear(width, 12)


EP_RULES = [
    "ClipL2PerLayer",
    "ClipL2PerParamType",
    "global-2",
    "global-inf",
    "agc",
    "zclip-global",
    "autoclip-layer",
]


def case_expert_parallel(name: str, rule: Any) -> dict[str, Any]:
    """Experts sharded over an EP mesh of 2 (two copies in the world), the rest FSDP2 over 4."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    world = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("dp",))
    ep_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_mod_ep", "ep"))["ep"]
    reference, model = MoE(), MoE()
    ref_norm = _normalizer(reference, rule)
    for key in ("w1", "w2"):
        weight = getattr(model.experts, key)
        setattr(
            model.experts, key, nn.Parameter(distribute_tensor(weight.data, ep_mesh, [Shard(0)]))
        )
    for dense in (model.embed, model.router, model.head):
        fully_shard(dense, mesh=world)
    normalizer = _normalizer(model, rule)
    return _against_reference(model, normalizer, reference, ref_norm)


def _against_reference(
    model: nn.Module, normalizer: Any, reference: nn.Module, ref_norm: Any
) -> dict[str, Any]:
    """``STEPS`` steps of ``normalizer`` on ``model`` (the same gradients on every rank)
    beside ``ref_norm`` on the unsplit ``reference``; collectives counted at steps 0 and 2."""
    worst, counts = 0.0, []
    for step in range(STEPS):
        grads = full_grads(step, reference)
        for n, p in reference.named_parameters():
            p.grad = grads[n].clone()
        ref_norm.apply()
        _set(model, grads, None)
        counter = CollectiveCounter() if step in (0, 2) else contextlib.nullcontext()
        with counter:
            normalizer.apply()
        if isinstance(counter, CollectiveCounter):
            counts.append(len(counter.ops))
        for n, p in model.named_parameters():
            worst = max(worst, _mismatch(_full(p.grad), reference.get_parameter(n).grad))
    return {"worst": worst, "collectives": counts, "total_error": 0.0}


TP_RULES = [
    "RenormalizeL2PerLayer",
    "ClipL2PerLayer",
    "ClipL2PerParamType",
    "global-2",
    "global-inf",
    "agc",
    "zclip-global",
    "autoclip-layer",
]


def case_tensor_parallel(name: str, rule: Any) -> dict[str, Any]:
    """Two stages x tensor parallel of 2 inside each (column- and row-wise layers)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    stage = mesh.get_local_rank("pp")
    reference = Tiny()
    ref_norm = _normalizer(reference, rule)
    model = split(Tiny(), stage)
    plan = {"attn": ColwiseParallel(), "mlp.0": ColwiseParallel(), "mlp.2": RowwiseParallel()}
    for block in model.layers.values():
        parallelize_module(block, mesh["tp"], plan)
    normalizer = _normalizer(model, rule, pp_mesh=mesh["pp"])
    return _against_reference(model, normalizer, reference, ref_norm)


def case_bench(mesh: Any) -> dict[str, Any]:
    """The pipeline benchmark's rows (tiny, one repeat): what `bench --distributed` counts."""
    from gradclip.commands import bench_pipeline

    config = {"layers": 4, "width": 8, "repeats": 1}
    rows = bench_pipeline._rows(mesh, "fsdp2", config) + bench_pipeline._rows(mesh, "ddp", config)
    counted = {f"{r['dp']}:{r['method']}": [r["collectives"], r["floats_sent"]] for r in rows}
    return {"worst": 0.0, "total_error": 0.0, "collectives": [], "rows": counted}


CHECKPOINT_RULE = gradclip.ZClip(warmup_steps=3)  # global state: the same on every stage
CHECKPOINT_OVERRIDES = {  # per-layer state on both stages
    "layers.0": gradclip.AutoClip(percentile=50.0, scope="layer"),
    "layers.3": gradclip.AutoClip(percentile=50.0, scope="layer"),
}


def _checkpointed(mesh: Any) -> tuple[nn.Module, gradclip.GradientNormalizer]:
    from torch.distributed.fsdp import fully_shard

    model = split(Tiny(), mesh.get_local_rank("pp"))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    normalizer = gradclip.GradientNormalizer(
        model, CHECKPOINT_RULE, overrides=CHECKPOINT_OVERRIDES, pp_mesh=mesh["pp"]
    )
    return model, normalizer


def _steps(model: nn.Module, normalizer: Any, mesh: Any, steps: range) -> list[dict[str, Any]]:
    out = []
    for step in steps:
        _set(model, full_grads(step, Tiny()), mesh["dp"].get_group())
        normalizer.apply()
        out.append({n: _full(p.grad).clone() for n, p in model.named_parameters()})
    return out


def _flat_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        f"{slot}/{row}/{k}": v
        for slot, entry in state["rules"].items()
        for row, tensors in entry["rows"].items()
        for k, v in tensors.items()
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def case_save(mesh: Any, outdir: str) -> dict[str, Any]:
    """Six steps, a DCP checkpoint, then four more: what the resumed run must reproduce."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    model, normalizer = _checkpointed(mesh)
    _steps(model, normalizer, mesh, range(6))
    state = normalizer.state_dict()
    dcp.save({"normalizer": state}, checkpoint_id=str(Path(outdir, "checkpoint")))
    expected = _steps(model, normalizer, mesh, range(6, 10))
    torch.save(
        {"state": _flat_state(state), "grads": expected},
        Path(outdir, f"expected{dist.get_rank()}.pt"),
    )
    return {"collectives": [], "worst": 0.0, "total_error": 0.0}


def case_resume(mesh: Any, outdir: str) -> dict[str, Any]:
    """In fresh processes: load the checkpoint per stage, check it exact, run on exactly."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    model, normalizer = _checkpointed(mesh)
    target = {"normalizer": normalizer.state_dict()}
    dcp.load(target, checkpoint_id=str(Path(outdir, "checkpoint")))
    normalizer.load_state_dict(target["normalizer"])
    expected = torch.load(Path(outdir, f"expected{dist.get_rank()}.pt"))
    loaded = _flat_state(normalizer.state_dict())
    if loaded.keys() != expected["state"].keys():
        raise AssertionError((sorted(loaded), sorted(expected["state"])))
    for key, value in loaded.items():
        if not _same(value, expected["state"][key]):
            raise AssertionError(f"state {key}: {value} != {expected['state'][key]}")
    got = _steps(model, normalizer, mesh, range(6, 10))
    for step, (mine, want) in enumerate(zip(got, expected["grads"])):
        for n in want:
            if not torch.equal(mine[n], want[n]):
                raise AssertionError(f"step {6 + step}, {n}: the resumed run differs")
    return {"collectives": [], "worst": 0.0, "total_error": 0.0}


@contextlib.contextmanager
def _written(outdir: str, phase: str, rank: int, results: dict[str, Any]) -> Iterator[None]:
    """Write ``results`` for the launcher when the block ends, however it ends."""
    try:
        yield
    finally:
        Path(outdir, f"{phase}{rank}.json").write_text(json.dumps(results))


def _worker(rank: int, init_method: str, outdir: str, phase: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from gradclip.commands.bench_distributed import gloo_rank

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    with gloo_rank(rank, WORLD, init_method, timeout_s=60), _written(outdir, phase, rank, results):
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        cases: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        if phase == "resume":
            cases.append(("checkpoint:resume", lambda: case_resume(mesh, outdir)))
        else:
            cases.append(("checkpoint:save", lambda: case_save(mesh, outdir)))
        for dp in ("fsdp2", "ddp") if phase == "main" else ():
            for name, make in RULES.items():
                cases.append(
                    (f"{dp}:{name}", lambda dp=dp, n=name, m=make: run_case(mesh, dp, n, m()))
                )
            cases.append(
                (
                    f"{dp}:overrides-across-stages",
                    lambda dp=dp: run_case(
                        mesh, dp, "overrides", ("ClipL2PerLayer", 0.5), overrides=OVERRIDES
                    ),
                )
            )
        if phase == "main":
            cases.append(("bench:pipeline", lambda: case_bench(mesh)))
        for name in TP_RULES if phase == "main" else ():
            cases.append((f"tp:{name}", lambda n=name: case_tensor_parallel(n, RULES[n]())))
        for name in EP_RULES if phase == "main" else ():
            cases.append((f"ep:{name}", lambda n=name: case_expert_parallel(n, RULES[n]())))
        for name in ("global-2", "zclip-global", "ClipL2PerLayer") if phase == "main" else ():
            cases.append(
                (f"interleaved:{name}", lambda n=name: case_interleaved(mesh, n, RULES[n]()))
            )
        if phase == "main":
            import pipeline_edges

            cases += pipeline_edges.edge_cases(sys.modules[__name__], mesh)
        run_cases(cases, results, meet_after_each=False)


def run_cases(
    cases: list[tuple[str, Callable[[], dict[str, Any]]]],
    results: dict[str, Any],
    meet_after_each: bool,
) -> None:
    """Run each case into ``results[case]`` (``ok`` and its figures, or the traceback);
    the ranks meet after a failed case (``meet_after_each``: after every case), so that
    one rank's failure does not leave the others inside the next case's collectives."""
    import torch.distributed as dist

    only = os.environ.get("GRADCLIP_PIPELINE_CASES")  # a prefix, when debugging
    for case, call in cases:
        if only and not case.startswith(only):
            continue
        ok = True
        try:
            results[case] = {"ok": True, **call()}
        except Exception:
            ok = False
            results[case] = {"ok": False, "msg": traceback.format_exc()}
        if meet_after_each or not ok:
            with contextlib.suppress(Exception):
                dist.barrier()


def launch(outdir: Path, timeout_s: float) -> list[dict[str, Any]]:
    """Run every case on four processes; per rank, ``{case: result}``."""
    from gradclip.commands.bench_distributed import free_port, spawn

    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results: list[dict[str, Any]] = [{} for _ in range(WORLD)]
    for phase in ("main", "resume"):  # the second in fresh processes: a restarted job
        spawn(_worker, (f"tcp://127.0.0.1:{free_port()}", str(outdir), phase), WORLD, timeout_s)
        for r in range(WORLD):
            results[r].update(json.loads(Path(outdir, f"{phase}{r}.json").read_text()))
    return results
