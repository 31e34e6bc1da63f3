"""Run the distributed test cases on two gloo processes on the CPU, all in one launch.

Starting two processes costs seconds, a case milliseconds: every module that
defines ``CASES`` (functions ``case(rank, out)``) and ``CASE_NAMES`` has its
cases run by the same two workers, one module after the other. Each case
records ``out[name] = {"ok": ..., ...}`` per result; the tests of the module
read them (``tests/core/conftest.py`` launches the workers once per session,
for the modules collected).

A case that must restart the job (a checkpoint loaded by a fresh process
group) calls `restart`, on every rank at the same point.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from gradclip.commands.bench_distributed import free_port, gloo_rank, spawn

WORLD = 2
# The first step of a normalizer on replicas (DDP, DTensor parameters) runs one more
# collective: the ranks compare their configurations (gradclip.core.agreement).
AGREEMENT = 1
GLOO_TIMEOUT = timedelta(seconds=60)  # a collective that waits longer fails its case

_restarts: dict[str, Any] = {"dir": "", "count": 0}


def restart() -> None:
    """Replace this process's default process group with a fresh one (a restarted job)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    _restarts["count"] += 1
    store = Path(_restarts["dir"], f"restart{_restarts['count']}")
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=GLOO_TIMEOUT
    )


def _worker(rank: int, init_method: str, outdir: str, modules: list[str]) -> None:
    torch.set_num_threads(1)
    _restarts["dir"] = outdir
    results: dict[str, dict[str, Any]] = {}
    with gloo_rank(rank, WORLD, init_method, GLOO_TIMEOUT.total_seconds()):
        try:
            _run_cases(rank, modules, results)
        finally:
            Path(outdir, f"rank{rank}.json").write_text(json.dumps(results))


def _run_cases(rank: int, modules: list[str], results: dict[str, dict[str, Any]]) -> None:
    import torch.distributed as dist

    for name in modules:
        out = results.setdefault(name, {})
        for case in importlib.import_module(name).CASES:
            try:
                case(rank, out)
            except Exception:
                out.setdefault(case.__name__, {"ok": False, "msg": traceback.format_exc()})
                # a case that failed half-way may leave the ranks out of step
                dist.barrier()


def run(modules: list[str], outdir: Path, timeout_s: float) -> list[dict[str, dict[str, Any]]]:
    """Run the cases of ``modules`` on two processes; per rank, per module, the results.

    Raises:
        TimeoutError: the processes did not finish in ``timeout_s`` (they are killed).
    """
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    spawn(_worker, (f"tcp://127.0.0.1:{free_port()}", str(outdir), modules), WORLD, timeout_s)
    return [json.loads(Path(outdir, f"rank{r}.json").read_text()) for r in range(WORLD)]


def results_of(module: str, per_rank: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The results the cases of ``module`` recorded, one mapping per rank."""
    return [results.get(module, {}) for results in per_rank]


def assert_every_case_ran(results: list[dict[str, Any]], names: list[str]) -> None:
    """Every rank recorded exactly the cases ``names``: none crashed outside its case."""
    for rank, out in enumerate(results):
        crashed = {k: v["msg"] for k, v in out.items() if k not in names}
        assert not crashed, f"rank {rank}: " + "\n".join(f"{k}:\n{m}" for k, m in crashed.items())
        assert sorted(out) == sorted(names), (rank, sorted(out))


def assert_case(results: list[dict[str, Any]], case: str, *, same_on_ranks: bool = False) -> None:
    """Case ``case`` passed on every rank with at most one collective per step.

    With ``same_on_ranks``, what each rank recorded under ``same_on_ranks`` (an
    error message, a report) must also be the same on every rank.
    """
    for rank, out in enumerate(results):
        result = out.get(case, {"ok": False, "msg": "did not run"})
        assert result["ok"], f"rank {rank}:\n{result.get('msg')}"
        assert result.get("collectives", 0) <= 1
    if same_on_ranks:
        shown = [out[case].get("same_on_ranks") for out in results]
        assert all(s == shown[0] for s in shown), shown


def module_tests(module: str, names: list[str], *, same_on_ranks: bool = False) -> tuple[Any, ...]:
    """The ``results`` fixture, ``test_every_case_ran`` and ``test_case`` of a cases module.

    Use as ``results, test_every_case_ran, test_case = module_tests(__name__, CASE_NAMES)``.
    """
    import pytest

    @pytest.fixture(scope="module")
    def results(two_rank_results: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        return results_of(module, two_rank_results)

    def test_every_case_ran(results: list[dict[str, Any]]) -> None:
        assert_every_case_ran(results, names)

    @pytest.mark.parametrize("case", names)
    def test_case(results: list[dict[str, Any]], case: str) -> None:
        if case in COUNTING_CASES:
            assert all(out.get(case, {}).get("ok") for out in results), results
            return
        assert_case(results, case, same_on_ranks=same_on_ranks)

    return results, test_every_case_ran, test_case


# cases that run collectives on purpose (to test the counter itself)
COUNTING_CASES = {"counter-sees-collectives"}
