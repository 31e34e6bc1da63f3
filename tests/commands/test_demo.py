"""The demo: its two tasks, the story each tells, and the command line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import HostReadCounter, OpCounter

import gradclip
from gradclip.commands import demo
from gradclip.commands.cli import main
from gradclip.commands.demo import task as tasks


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
    assert demo.baseline_mse(y, 1.0) == pytest.approx(1 / 6, abs=3e-3)


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
    assert run.test_loss < quick.task.learned_fraction * quick.baseline
    assert run.final_loss < quick.task.learned_fraction * quick.baseline
    assert math.isfinite(run.max_grad_norm) and run.max_grad_norm > quick.config.threshold


def test_quick_run_uses_per_layer_clipping_by_default(quick: demo.DemoResults) -> None:
    assert quick["gradclip"].label == "gradclip ClipL2PerLayer(threshold=1.0)"
    assert quick.config.strategy == "ClipL2PerLayer"


def test_the_three_runs_start_from_the_same_weights_and_data(quick: demo.DemoResults) -> None:
    first_losses = {r.losses[0] for r in quick.runs}
    first_norms = [r.grad_norms[0] for r in quick.runs]
    assert len(first_losses) == 1
    # the same gradients: each run's norm of them agrees to float32 rounding (torch's norm
    # and gradclip's exact one may differ in the last bit, depending on the CPU's kernels)
    assert first_norms == pytest.approx([first_norms[0]] * len(first_norms), rel=1e-6)
    # ...and the norms are measured before clipping (the first one is above the threshold).
    assert first_norms[0] > quick.config.threshold
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
def test_strategy_names_include_the_dl4j_modes_and_the_short_names() -> None:
    names = demo.strategy_names()
    for mode in gradclip.GradientNormalization:
        assert mode.value in names
    assert {"global", "agc", "autoclip", "zclip"} <= set(names)


def test_make_strategy_from_a_name_or_a_strategy_object() -> None:
    s = demo.make_strategy("ClipL2PerParamType", 0.5)
    assert isinstance(s, gradclip.ClipL2PerParamType) and s.threshold == 0.5
    obj = gradclip.ClipL2PerLayer(2.0)
    assert demo.make_strategy(obj, 0.5) is obj
    # "global" is the rule of the clip_grad_norm_ run, with the same threshold
    assert demo.make_strategy("GLOBAL", 0.5) == gradclip.ClipGlobalNorm(0.5)
    assert demo.make_strategy("agc", 0.5) == gradclip.AdaptiveGradClip()
    with pytest.raises(ValueError, match="ClipL2PerLayer"):
        demo.make_strategy("no-such-strategy", 1.0)


def test_a_strategy_that_measures_no_norms_still_reports_grad_norms() -> None:
    # Element-wise clipping does not need norms; the demo measures them anyway.
    results = demo.run_demo(30, quick=True, strategy="ClipElementWiseAbsoluteValue")
    g = results["gradclip"]
    assert all(math.isfinite(v) for v in g.grad_norms)
    assert g.grad_norms[0] == results["none"].grad_norms[0]


# -- command line ----------------------------------------------------------------------
def test_cli_quick_runs_both_tasks_and_prints_their_tables(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--quick", "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    progress = [
        line for line in printed if line.startswith(("adding, seed 0: ", "scales, seed 0: "))
    ]
    assert len(progress) == 6  # a line per run as it ends
    out = "\n".join(line for line in printed if line not in progress)
    assert out.count("no normalization") == 2
    assert out.count("torch clip_grad_norm_(1)") == 2
    assert out.count("gradclip ClipL2PerLayer(threshold=1.0)") == 2
    assert out.count("baseline (predict the mean)") == 2
    assert "adding problem:" in out and "mixed-scale regression:" in out
    assert "gradient norm by layer at step 0: input " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "bogus"], "unknown strategy 'bogus'; choose one of: None, "),
        (["--strategy", "agc,bogus"], "unknown strategy 'bogus'"),
        (["--seeds", "3-1"], "--seeds: '3-1' is not a range of seeds >= 0"),
        (["--seeds", "a"], "--seeds takes seeds like 0-4 or 0,3,7"),
        (["--seeds", "0,0"], "each seed once"),
        (["--seeds", "0-1", "--plot", "x.png"], "--plot draws one seed"),
        (["--threads", "-1"], "--threads must be >= 0"),
        (["--task", "nope"], "argument --task: invalid choice: 'nope'"),
    ],
)
def test_cli_rejects_bad_options_on_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["demo", "--quick", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith("gradclip demo: error: ") and message in err


def test_cli_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "norms.png"
    assert main(["demo", "--quick", "--no-progress", "--steps", "200", "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 20_000  # two rows of four panels of curves, not an empty canvas
    assert str(out) in capsys.readouterr().out


def test_plot_refuses_results_without_layer_norms(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="record_every"):
        demo.plot(demo.run_demo(5, task="scales", quick=True), str(tmp_path / "x.png"))


# -- the mixed-scale task ------------------------------------------------------------------
@pytest.fixture(scope="module")
def scales() -> demo.DemoResults:
    # The configuration `python -m gradclip demo --quick` runs for the second task.
    return demo.run_demo(task="scales", quick=True)


def test_mixed_scale_batches_have_two_units_and_a_target_of_the_standardised_features() -> None:
    x, y = tasks.mixed_scale_batch(50_000, 30.0, torch.Generator().manual_seed(0))
    assert x.shape == (50_000, 8) and y.shape == (50_000, 1)
    std = x.std(dim=0)
    torch.testing.assert_close(std[:4], torch.ones(4), atol=0.02, rtol=0)
    torch.testing.assert_close(std[4:], torch.full((4,), 30.0), atol=0.6, rtol=0)
    z = x / tasks.feature_scales(30.0)
    expected = (
        torch.sin(z[:, 0])
        + z[:, 1] * z[:, 4]
        + torch.tanh(z[:, 5] - z[:, 2])
        + 0.5 * z[:, 6] * z[:, 3]
    )
    torch.testing.assert_close(y[:, 0], expected, rtol=1e-5, atol=1e-5)


def test_the_mixed_scale_model_starts_unsaturated_with_one_layer_dominating() -> None:
    torch.manual_seed(0)
    model = tasks.MixedScaleMLP(64, 30.0)
    x, y = tasks.mixed_scale_batch(512, 30.0, torch.Generator().manual_seed(0))
    pre = model.input(x)
    # Initialised for the units: the first layer's pre-activations are of order 1.
    assert pre.std() < 1.5
    nn_loss = torch.nn.functional.mse_loss(model(x), y)
    nn_loss.backward()  # type: ignore[no-untyped-call]
    norms = gradclip.GradientNormalizer(model, None, measure_all=True).apply().to_dict()
    layer = norms["layer_norms"]
    assert layer["input"] > 3 * math.hypot(layer["hidden"], layer["head"])


def test_scales_story_gradclip_beats_the_global_clip(scales: demo.DemoResults) -> None:
    assert scales.task.key == "scales"
    g, glob, none = scales["gradclip"], scales["clip_grad_norm_"], scales["none"]
    assert all(r.diverged_step is None for r in scales.runs)
    assert g.test_loss < 0.8 * glob.test_loss
    assert glob.test_loss < none.test_loss
    assert scales.story_holds()
    # the first layer carries most of the gradient norm at the start
    initial = scales.initial_layer_norms
    assert initial["input"] is not None and initial["hidden"] is not None
    assert initial["input"] > 5 * initial["hidden"]


def test_story_fails_when_the_numbers_say_so(scales: demo.DemoResults) -> None:
    import copy

    swapped = copy.deepcopy(scales)
    swapped["gradclip"].test_loss = swapped["clip_grad_norm_"].test_loss
    assert not swapped.story_holds()


def test_several_rules_one_run_each() -> None:
    results = demo.run_demo(30, task="scales", quick=True, strategy=["ClipL2PerLayer", "agc"])
    assert [r.key for r in results.runs] == [
        "none",
        "clip_grad_norm_",
        "gradclip",
        "gradclip:agc",
    ]
    assert results["gradclip:agc"].label == "gradclip AdaptiveGradClip(clipping=0.01, eps=0.001)"
    # every run starts from the same weights and data
    assert len({r.losses[0] for r in results.runs}) == 1


def test_config_for_task_refuses_unknown_tasks_and_settings() -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        demo.DemoConfig.for_task("nope")
    with pytest.raises(ValueError, match="stepz"):
        demo.DemoConfig.for_task("scales", stepz=3)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        demo.run_demo(0, task="scales")


# -- several seeds ------------------------------------------------------------------------
def test_parse_seeds() -> None:
    assert demo.parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert demo.parse_seeds("7") == [7]
    assert demo.parse_seeds("0-1, 5") == [0, 1, 5]


def test_seed_summary_counts_and_spreads() -> None:
    results = [demo.run_demo(40, seed, task="scales", quick=True) for seed in (0, 1, 2)]
    text = demo.seed_summary(results)
    lines = text.splitlines()
    assert lines[0] == "mixed-scale regression, 3 seeds:"
    row = next(line for line in lines if line.startswith("gradclip ClipL2PerLayer"))
    losses = sorted(r["gradclip"].test_loss for r in results)
    assert row.split()[-3:] == [f"{losses[0]:.4f}", "-", f"{losses[-1]:.4f}"]
    assert f"{losses[1]:.4f}" in row  # the median
    assert "seeds 0, 1, 2" in text
    with pytest.raises(ValueError, match="one task"):
        demo.seed_summary([results[0], demo.run_demo(5, task="adding", quick=True)])


def test_cli_seeds_prints_the_spread(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--quick", "--task", "scales", "--seeds", "0-1", "--steps", "50"]
    assert main([*argv, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mixed-scale regression, 2 seeds:" in out
    assert "adding problem" not in out
    assert "0/2" in out
    # --no-progress: a line as each run ends, no bar, before the tables
    progress = [line for line in out.splitlines() if line.startswith("scales, seed ")]
    assert len(progress) == 6 and all(" 50 steps in " in line for line in progress)
    assert out.index(progress[-1]) < out.index("mixed-scale regression, 2 seeds:")
    assert "\r" not in out


def test_the_seed_footer_names_what_it_counts_so_it_cannot_contradict_the_table() -> None:
    """With AutoClip as gradclip's rule the mixed-scale run beats the global clip's without
    learning: the footer says "a lower test MSE", next to a learned column of 0."""
    results = [
        demo.run_demo(40, seed, task="scales", quick=True, strategy="autoclip") for seed in (0, 1)
    ]
    lines = demo.seed_summary(results).splitlines()
    holds = sum(r.story_holds() for r in results)
    assert lines[-1] == (
        f"on {holds}/2 seeds gradclip {results[0]['gradclip'].label.removeprefix('gradclip ')} "
        "ended with a lower test MSE than torch clip_grad_norm_(1)"
    )
    assert not any("demo's point" in line for line in lines)
    adding = [demo.run_demo(30, 0, task="adding", quick=True)]
    assert (
        demo.seed_summary(adding)
        .splitlines()[-1]
        .endswith("no normalization diverged and gradclip ClipL2PerLayer(threshold=1.0) learned")
    )


def test_threads_setting_is_applied_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    original = demo.training._train  # type: ignore[attr-defined]

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(demo.training, "_train", spy)  # type: ignore[attr-defined]
    before = torch.get_num_threads()
    demo.run_demo(5, task="scales", quick=True, threads=1)
    assert seen == [1, 1, 1] and torch.get_num_threads() == before
