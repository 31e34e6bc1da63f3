"""The demo: the adding problem, and the story it tells (diverges without, learns with)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import HostReadCounter, OpCounter

import gradclip
from gradclip.commands import demo
from gradclip.commands.cli import main


@pytest.fixture(scope="module")
def quick() -> demo.DemoResults:
    # The exact configuration `python -m gradclip demo --quick` runs in CI.
    return demo.run_demo(quick=True)


# -- the task --------------------------------------------------------------------------
def test_adding_problem_batch_has_two_markers_and_sums_the_marked_values() -> None:
    x, y = demo.adding_problem_batch(256, 12, torch.Generator().manual_seed(3))
    assert x.shape == (256, 12, 2) and y.shape == (256, 1)
    values, markers = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(markers.unique().tolist()) == {0.0, 1.0}
    # exactly one marker in each half
    assert (markers[:, :6].sum(1) == 1).all() and (markers[:, 6:].sum(1) == 1).all()
    expected = torch.tensor(
        [
            sum(v for v, m in zip(vs, ms) if m == 1.0)
            for vs, ms in zip(values.tolist(), markers.tolist())
        ]
    )
    torch.testing.assert_close(y[:, 0], expected)


def test_adding_problem_batches_are_reproducible() -> None:
    a = demo.adding_problem_batch(8, 10, torch.Generator().manual_seed(1))
    b = demo.adding_problem_batch(8, 10, torch.Generator().manual_seed(1))
    c = demo.adding_problem_batch(8, 10, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_adding_problem_rejects_a_sequence_too_short_to_hold_two_markers() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        demo.adding_problem_batch(4, 1, torch.Generator())


def test_baseline_is_the_variance_of_a_sum_of_two_uniforms() -> None:
    _, y = demo.adding_problem_batch(200_000, 10, torch.Generator().manual_seed(0))
    # Var(a + b) = 2/12 for independent U(0, 1); the standard error here is ~5e-4.
    assert demo.baseline_mse(y) == pytest.approx(1 / 6, abs=3e-3)


# -- the story -------------------------------------------------------------------------
def test_quick_run_diverges_without_normalization(quick: demo.DemoResults) -> None:
    none = quick["none"]
    assert none.diverged_step is not None
    assert not none.learned
    # A real explosion, not a slow drift: the gradient norm grew by orders of magnitude.
    assert none.max_grad_norm > 1e4 * none.grad_norms[0]
    assert none.steps_run < quick.config.steps  # it stopped once it diverged
    bad = [not math.isfinite(v) or v > quick.divergence_bound for v in none.losses]
    assert bad.index(True) == none.diverged_step


@pytest.mark.parametrize("key", ["clip_grad_norm_", "gradclip"])
def test_quick_run_learns_with_clipping(quick: demo.DemoResults, key: str) -> None:
    run = quick[key]
    assert run.diverged_step is None
    assert run.learned
    assert run.steps_run == quick.config.steps
    assert run.test_loss < demo.LEARNED_FRACTION * quick.baseline
    assert run.final_loss < demo.LEARNED_FRACTION * quick.baseline
    assert math.isfinite(run.max_grad_norm) and run.max_grad_norm > quick.config.threshold


def test_quick_run_uses_per_layer_clipping_by_default(quick: demo.DemoResults) -> None:
    assert quick["gradclip"].label == "gradclip ClipL2PerLayer(threshold=1.0)"
    assert quick.config.strategy == "ClipL2PerLayer"


def test_the_three_runs_start_from_the_same_weights_and_data(quick: demo.DemoResults) -> None:
    first_losses = {r.losses[0] for r in quick.runs}
    first_norms = {r.grad_norms[0] for r in quick.runs}
    assert len(first_losses) == 1 and len(first_norms) == 1
    # ...and the norms are measured before clipping (the first one is above the threshold).
    assert first_norms.pop() > quick.config.threshold
    assert quick.baseline == pytest.approx(1 / 6, abs=0.01)


def test_table_shows_every_run_and_the_baseline(quick: demo.DemoResults) -> None:
    table = quick.table()
    for run in quick.runs:
        assert run.label in table
    assert f"step {quick['none'].diverged_step}" in table
    assert f"{quick.baseline:.4f}" in table
    assert "baseline" in table


def test_run_demo_is_deterministic_and_leaves_global_torch_state_alone() -> None:
    state, threads = torch.random.get_rng_state(), torch.get_num_threads()
    a = demo.run_demo(40, seed=5, quick=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    b = demo.run_demo(40, seed=5, quick=True)
    c = demo.run_demo(40, seed=6, quick=True)
    for ra, rb in zip(a.runs, b.runs):
        assert ra.losses == rb.losses and ra.grad_norms == rb.grad_norms
    assert a["gradclip"].losses != c["gradclip"].losses


def test_norms_are_recorded_only_when_asked() -> None:
    plain = demo.run_demo(20, quick=True)
    assert all(r.norm_steps == [] and r.layer_norms == {} for r in plain.runs)
    recorded = demo.run_demo(20, quick=True, record_every=4)
    for r in recorded.runs:
        assert r.norm_steps == [s for s in range(r.steps_run) if s % 4 == 0]
        assert set(r.layer_norms) == {"rnn", "head"}
        assert all(len(v) == len(r.norm_steps) for v in r.layer_norms.values())
    # before clipping, the gradclip run's per-layer norms combine to its global norm
    g = recorded["gradclip"]
    rnn, head = g.layer_norms["rnn"][0], g.layer_norms["head"][0]
    assert rnn is not None and head is not None
    assert math.hypot(rnn, head) == pytest.approx(g.grad_norms[0], rel=1e-5)


def test_training_reads_the_device_once_per_log_interval_not_per_step() -> None:
    def reads(steps: int) -> tuple[dict[str, int], int]:
        with HostReadCounter() as host, OpCounter() as ops:
            demo.run_demo(steps, quick=True, log_every=25)
        return dict(host.calls), ops.syncs

    host_100, syncs_100 = reads(100)
    host_200, syncs_200 = reads(200)
    extra = {
        k: host_200.get(k, 0) - host_100.get(k, 0)
        for k in set(host_100) | set(host_200)
        if host_200.get(k, 0) != host_100.get(k, 0)
    }
    # 100 more steps in each of the two clipped runs (the first run stops once it
    # diverges): one tolist() per 25 steps, nothing per step.
    assert extra == {"tolist": 2 * 100 // 25}
    assert syncs_200 == syncs_100


# -- strategies ------------------------------------------------------------------------
def test_strategy_names_include_the_dl4j_modes() -> None:
    names = demo.strategy_names()
    for mode in gradclip.GradientNormalization:
        assert mode.value in names


def test_make_strategy_from_a_dl4j_name_or_a_strategy_object() -> None:
    s = demo.make_strategy("ClipL2PerParamType", 0.5)
    assert isinstance(s, gradclip.ClipL2PerParamType) and s.threshold == 0.5
    obj = gradclip.ClipL2PerLayer(2.0)
    assert demo.make_strategy(obj, 0.5) is obj
    with pytest.raises(ValueError, match="ClipL2PerLayer"):
        demo.make_strategy("no-such-strategy", 1.0)


def test_make_strategy_uses_strategy_factories_when_they_exist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, float]] = []

    def with_threshold(threshold: float = 1.0) -> gradclip.Strategy:
        calls.append({"threshold": threshold})
        return gradclip.ClipL2PerLayer(threshold)

    def without_threshold() -> gradclip.Strategy:
        calls.append({})
        return gradclip.ClipL2PerParamType(3.0)

    factories = {"mine": with_threshold, "theirs": without_threshold}
    monkeypatch.setattr(demo, "RULE_FACTORIES", factories)
    assert "mine" in demo.strategy_names() and "theirs" in demo.strategy_names()
    assert demo.make_strategy("mine", 0.25) == gradclip.ClipL2PerLayer(0.25)
    assert demo.make_strategy("theirs", 0.25) == gradclip.ClipL2PerParamType(3.0)
    assert calls == [{"threshold": 0.25}, {}]


def test_a_strategy_that_measures_no_norms_still_reports_grad_norms() -> None:
    # Element-wise clipping does not need norms; the demo measures them anyway.
    results = demo.run_demo(30, quick=True, strategy="ClipElementWiseAbsoluteValue")
    g = results["gradclip"]
    assert all(math.isfinite(v) for v in g.grad_norms)
    assert g.grad_norms[0] == results["none"].grad_norms[0]


# -- command line ----------------------------------------------------------------------
def test_cli_quick_runs_and_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "no normalization" in out
    assert "torch clip_grad_norm_(1)" in out
    assert "gradclip ClipL2PerLayer(threshold=1.0)" in out
    assert "baseline (predict the mean)" in out


def test_cli_rejects_an_unknown_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quick", "--strategy", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "ClipL2PerLayer" in err


def test_cli_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "norms.png"
    assert main(["demo", "--quick", "--no-progress", "--steps", "200", "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000  # four panels of curves, not an empty canvas
    assert str(out) in capsys.readouterr().out
