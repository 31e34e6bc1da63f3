"""A model split into two pipeline stages x two data-parallel ranks equals the unsplit model.

Four gloo processes on the CPU, one launch for every case (`pipeline_ranks`; its
own, as `two_ranks` runs two ranks, plus one in fresh processes for the resume):
FSDP2 and DDP data parallel, the six DL4J modes, ``ClipGlobalNorm`` (p = 2, 3
and inf), AGC, ZClip and AutoClip in both scopes, a chain, overrides whose
group spans both stages, ranks holding two stages (``stages=``), stages
with tensor parallel of 2 inside (column- and row-wise layers); and an
expert-parallel model (experts sharded over an EP mesh of 2, the rest FSDP2
over all 4 ranks). Every rank's gradients match the single-process run within
1e-5 relative over 20 steps; a steady step runs at most one collective, and
none on replicated gradients when every rule decides layer by layer. A DCP
checkpoint of the stages, loaded in fresh processes, resumes bit for bit.

Eight gloo processes, one more launch (`pipeline_mesh_ranks`): two stages whose
parameters live on genuine 2-D sub-meshes of their four ranks (HSDP; FSDP2 with
tensor parallel; experts over an EP mesh of 2 next to FSDP2 over 4), every dim
of size 2 so that every replica and slice weight is exercised, for every rule
above, against the unsplit model; a DCP round trip and a refused disagreement
on the HSDP stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pipeline_edges
import pipeline_mesh_ranks
import pipeline_ranks
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

TIMEOUT_S = 240
MESH_TIMEOUT_S = 360  # eight processes on two cores: about 80 s, far more on a loaded machine

RUN_CASES = [
    f"{dp}:{name}"
    for dp in ("fsdp2", "ddp")
    for name in [*pipeline_ranks.RULES, "overrides-across-stages"]
] + [f"interleaved:{n}" for n in ("global-2", "zclip-global", "ClipL2PerLayer")]
RUN_CASES += [f"ep:{name}" for name in pipeline_ranks.EP_RULES]
RUN_CASES += [f"tp:{name}" for name in pipeline_ranks.TP_RULES]
CHECKPOINT = ["checkpoint:save", "checkpoint:resume"]
BENCH = ["bench:pipeline"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    try:
        return pipeline_ranks.launch(Path(tmp_path_factory.mktemp("pipeline")), TIMEOUT_S)
    except TimeoutError as err:
        pytest.fail(str(err))


@pytest.mark.parametrize("case", RUN_CASES)
def test_stages_match_the_unsplit_model(results: list[dict[str, Any]], case: str) -> None:
    for rank, out in enumerate(results):
        result = out.get(case, {"ok": False, "msg": "did not run"})
        assert result["ok"], f"rank {rank}:\n{result.get('msg')}"
        assert result["worst"] <= pipeline_ranks.RTOL, (rank, result["worst"])
        assert result["total_error"] <= pipeline_ranks.RTOL, (rank, result["total_error"])


COUNTED = [c for c in RUN_CASES if c.split(":")[0] in ("fsdp2", "ddp", "ep", "tp")]


@pytest.mark.parametrize("case", COUNTED)
def test_a_steady_step_runs_at_most_one_collective(
    results: list[dict[str, Any]], case: str
) -> None:
    dp, name = case.split(":")
    for out in results:
        first, steady = out[case]["collectives"]
        assert steady <= 1, (case, out[case]["collectives"])
        if dp == "ddp" and name in pipeline_ranks.PER_LAYER:
            assert first == steady == 0, (case, out[case]["collectives"])


@pytest.mark.parametrize("case", CHECKPOINT)
def test_a_dcp_checkpoint_of_the_stages_resumes_exactly(
    results: list[dict[str, Any]], case: str
) -> None:
    for rank, out in enumerate(results):
        result = out.get(case, {"ok": False, "msg": "did not run"})
        assert result["ok"], f"rank {rank}:\n{result.get('msg')}"


@pytest.mark.parametrize("case", [c for c in RUN_CASES if c.split(":")[0] in ("fsdp2", "ddp")])
def test_a_steady_step_reads_nothing_to_the_host_but_the_agreement_flag(
    results: list[dict[str, Any]], case: str
) -> None:
    # replicated gradients: no read at all; sharded: the one read of the ranks'
    # agreement verdict that a sharded step has without stages too
    allowed = 0 if case.startswith("ddp") else 1
    for out in results:
        assert 0 <= out[case]["host_reads"] <= allowed, (case, out[case]["host_reads"])


EDGES = pipeline_edges.nonfinite_cases() + pipeline_edges.RELAYOUT_CASES
EDGES += pipeline_edges.CHAIN_CASES


@pytest.mark.parametrize("case", pipeline_edges.CHAIN_CASES)
def test_a_later_chain_member_spans_every_stage_in_as_few_collectives_as_it_needs(
    results: list[dict[str, Any]], case: str
) -> None:
    # one collective per round whose members span layers; none before round 0 when
    # the first members decide layer by layer (their sums ride in the later one)
    needed = pipeline_edges.CHAINS[case.split(":")[2]][2]
    for rank, out in enumerate(results):
        result = out.get(case, {"ok": False, "msg": "did not run"})
        assert result["ok"], f"rank {rank}:\n{result.get('msg')}"
        assert result["worst"] <= pipeline_ranks.RTOL, (rank, result["worst"])
        assert result["collectives"] == [needed, needed], (case, result["collectives"])
        assert result["host_reads"] == 0, (case, result["host_reads"])


@pytest.mark.parametrize("case", pipeline_edges.nonfinite_cases())
def test_nonfinite_zero_and_skip_on_stages_match_the_unsplit_model(
    results: list[dict[str, Any]], case: str
) -> None:
    # NaN/inf in one stage (one dp rank's shard under FSDP2) at steps 2, 5, 7, 9
    policy, dp, name = case.split(":")
    for rank, out in enumerate(results):
        result = out.get(case, {"ok": False, "msg": "did not run"})
        assert result["ok"], f"rank {rank}:\n{result.get('msg')}"
        assert result["worst"] <= pipeline_ranks.RTOL, (rank, result["worst"])
        # every stage skips exactly the steps the unsplit model skips
        assert all(mine == ref for mine, ref in result["skipped"]), (rank, result["skipped"])
        if policy in ("nonfinite-skip", "nonfinite-error"):  # "error": raised on every rank
            assert [s for s, (mine, _) in enumerate(result["skipped"]) if mine] == [2, 5, 7, 9]
        first, steady = result["collectives"]
        chain = pipeline_edges.CHAINS.get(name)
        # "error" decides before round 0, which changes the gradients: one more
        allowed = 1 if chain is None else chain[2] + (policy == "nonfinite-error")
        assert steady <= allowed, (case, result["collectives"])
        if dp == "ddp" and policy == "nonfinite-zero" and name in pipeline_ranks.PER_LAYER:
            assert first == steady == 0
        # no host read beyond the unsplit model's, but a sharded step's agreement read
        mine, ref = result["host_reads"]
        assert 0 <= mine <= ref + (dp == "fsdp2"), (case, result["host_reads"])


@pytest.mark.parametrize("case", pipeline_edges.RELAYOUT_CASES)
def test_a_layer_change_on_one_stage_neither_hangs_nor_differs(
    results: list[dict[str, Any]], case: str
) -> None:
    for rank, out in enumerate(results):
        result = out.get(case, {"ok": False, "msg": "did not run"})
        assert result["ok"], f"rank {rank}:\n{result.get('msg')}"
        assert result["worst"] <= pipeline_ranks.RTOL, (rank, result["worst"])
        change, steady = result["collectives"]
        assert steady <= 1, (case, result["collectives"])
        if case == "relayout:fsdp2":  # the step runs again in the new layout, once
            # (stage 0 also compares its new configuration with its dp replica)
            assert change == (3 if rank < 2 else 2), (rank, result["collectives"])


def test_every_rank_ran_every_case(results: list[dict[str, Any]]) -> None:
    for out in results:
        assert sorted(out) == sorted(RUN_CASES + CHECKPOINT + BENCH + EDGES)


def test_the_pipeline_bench_counts_one_collective_and_none_for_ddp_per_layer(
    results: list[dict[str, Any]],
) -> None:
    out = results[0]["bench:pipeline"]
    assert out["ok"], out.get("msg")
    rows = out["rows"]
    assert rows["fsdp2:torchtitan clip_grad_norm_(pp_mesh)"][0] == 2  # dp, then pp
    assert rows["fsdp2:gradclip ClipGlobalNorm"][0] == 1
    assert rows["fsdp2:gradclip ClipL2PerLayer"][0] == 1
    assert rows["ddp:gradclip ClipGlobalNorm"][0] == 1
    assert rows["ddp:gradclip ClipL2PerLayer"] == [0, 0]


MESH_CASES = [
    f"{layout}:{name}"
    for layout in pipeline_mesh_ranks.LAYOUTS
    for name in pipeline_mesh_ranks.RULES
]
MESH_CHECKS = ["hsdp:checkpoint", "hsdp:disagreement", "hsdp:gradient-mismatch"]


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    try:
        return pipeline_mesh_ranks.launch(Path(tmp_path_factory.mktemp("mesh")), MESH_TIMEOUT_S)
    except TimeoutError as err:
        pytest.fail(str(err))


@pytest.mark.parametrize("case", MESH_CASES)
def test_stages_on_2d_sub_meshes_match_the_unsplit_model_in_one_collective(
    mesh_results: list[dict[str, Any]], case: str
) -> None:
    for rank, out in enumerate(mesh_results):
        result = out.get(case, {"ok": False, "msg": "did not run"})
        assert result["ok"], f"rank {rank}:\n{result.get('msg')}"
        assert result["worst"] <= pipeline_ranks.RTOL, (rank, result["worst"])
        assert result["total_error"] <= pipeline_ranks.RTOL, (rank, result["total_error"])
        assert result["collectives"] and result["collectives"][0] <= 1, (rank, result)


@pytest.mark.parametrize("case", MESH_CHECKS)
def test_2d_sub_mesh_stages_checkpoint_and_check_agreement(
    mesh_results: list[dict[str, Any]], case: str
) -> None:
    for rank, out in enumerate(mesh_results):
        result = out.get(case, {"ok": False, "msg": "did not run"})
        assert result["ok"], f"rank {rank}:\n{result.get('msg')}"


def test_every_rank_of_the_2d_launch_ran_every_case(mesh_results: list[dict[str, Any]]) -> None:
    assert len(mesh_results) == pipeline_mesh_ranks.WORLD
    for out in mesh_results:
        assert sorted(out) == sorted(MESH_CASES + MESH_CHECKS)
