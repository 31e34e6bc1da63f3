"""The recording: its file format, no host sync per step, crashes, resumes and failing steps."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SYNC_OPS, HostReadCounter, OpCounter, fill_grads
from torch import nn

import gradclip
from gradclip import insight
from gradclip.core.record import Recorder


def _numpy_read(path: Path) -> np.ndarray:
    """The reading recipe of the format's documentation, verbatim."""
    with open(path, "rb") as f:
        header = json.loads(f.readline())
    dtype = np.dtype([tuple(field) for field in header["record_dtype"]])
    count = (os.path.getsize(path) - header["header_bytes"]) // dtype.itemsize
    return np.memmap(path, dtype, "r", header["header_bytes"], (count,))


def test_the_file_holds_each_steps_norms_and_flags_as_numpy_reads_them(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.Linear(2, 2))
    model[3].requires_grad_(False)
    path = tmp_path / "run.gcrec"
    normalizer = gradclip.GradientNormalizer(
        model,
        "ClipL2PerLayer",
        1.0,
        {"2": "ClipElementWiseAbsoluteValue"},
        record=path,
        record_every=3,
    )
    expected = []
    for step in range(8):
        fill_grads(model, scale=0.1 * (step + 1), seed=step)
        model[3].weight.grad = model[3].bias.grad = None
        report = normalizer.apply()
        expected.append(report.layer_norm_vector.clone())
    normalizer.close()
    records = _numpy_read(path)
    assert records["step"].tolist() == list(range(8))
    norms = torch.from_numpy(records["norm"].copy())
    assert torch.equal(norms[:, :2], torch.stack(expected)[:, :2].float())
    assert torch.isnan(norms[:, 2]).all()
    flags = records["flags"]
    assert (flags[:, 2] == 0).all()  # layer "3" is frozen: no gradient
    assert ((flags[:, 1] & 4) != 0).all()  # element-wise: cannot tell
    clipped = (flags[:, 0] & 2) != 0
    assert clipped.tolist() == (norms[:, 0] > 1.0).tolist() and clipped.any() and not clipped.all()
    # about 5 bytes per layer-step: an fp32 norm and a byte of flags
    assert records.dtype.itemsize == 8 + 5 * 3 + 1  # step, 3 layers, padding to 8 bytes
    assert Recorder(tmp_path / "x", [], [], every=1).record_bytes == 8


def test_a_monitor_records_every_layer_and_changes_nothing(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    grads = fill_grads(model, seed=1)
    monitor = gradclip.GradientNormalizer(model, None, record=tmp_path / "m.gcrec")
    monitor.apply()
    monitor.close()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    run = insight.load(tmp_path / "m.gcrec")
    assert np.isfinite(run.norms).all() and run.has_gradient().all()


@pytest.mark.parametrize(
    "mode",
    [
        "ClipL2PerLayer",
        None,
        "ClipElementWiseAbsoluteValue",
        gradclip.AdaptiveGradClip(),
        gradclip.ZClip(warmup_steps=2),
    ],
    ids=str,
)
def test_recording_adds_no_host_sync(tmp_path: Path, mode: gradclip.Mode) -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 4), nn.Linear(4, 2))
    normalizer = gradclip.GradientNormalizer(
        model, mode, record=tmp_path / "s.gcrec", record_every=4
    )
    for step in range(9):  # steps 3 and 7 send the buffer to the file
        fill_grads(model, scale=1.0 + step, seed=step)
        with OpCounter() as counter, HostReadCounter() as reads:
            normalizer.apply()
        assert counter.syncs == 0, {op: n for op, n in counter.ops.items() if op in SYNC_OPS}
        assert sum(reads.calls.values()) == 0, reads.calls
    normalizer.close()
    assert len(insight.load(tmp_path / "s.gcrec").steps) == 9


def test_launches_per_step_do_not_depend_on_the_layer_count(tmp_path: Path) -> None:
    counts = []
    for layers in (4, 40):
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
        plain = gradclip.GradientNormalizer(model, "ClipL2PerLayer", measure_all=True)
        recording = gradclip.GradientNormalizer(
            model, "ClipL2PerLayer", record=tmp_path / f"{layers}.gcrec", record_every=100
        )
        ops = []
        for normalizer in (plain, recording):
            fill_grads(model)
            normalizer.apply()  # the first step builds the buffers
            with OpCounter() as counter:
                normalizer.apply()
            ops.append(counter.total)
        recording.close()
        counts.append(ops[1] - ops[0])
    assert counts[0] == counts[1] <= 4, counts  # two row views, a copy and an add


def test_a_killed_run_leaves_what_was_flushed_readable(tmp_path: Path) -> None:
    path = tmp_path / "killed.gcrec"
    script = textwrap.dedent(
        f"""
        import os, torch, gradclip
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        normalizer = gradclip.GradientNormalizer(model, None, record={str(path)!r}, record_every=10)
        for step in range(56):
            model.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            normalizer.apply()
        os.kill(os.getpid(), 9)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert done.returncode == -9
    with path.open("ab") as f:  # and a torn record after them
        f.write(b"\x01\x02\x03")
    run = insight.load(path)
    assert run.steps.tolist() == list(range(50))
    assert insight.findings(run)["steps"] == 50


def test_steps_continue_across_a_resume_from_state_dict(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    first = gradclip.GradientNormalizer(model, gradclip.ZClip(), record=tmp_path / "a.gcrec")
    for step in range(5):
        fill_grads(model, seed=step)
        first.apply()
    first.close()
    second = gradclip.GradientNormalizer(model, gradclip.ZClip(), record=tmp_path / "b.gcrec")
    second.load_state_dict(first.state_dict())
    for step in range(3):
        fill_grads(model, seed=step)
        second.apply()
    second.close()
    assert insight.load(tmp_path / "b.gcrec").steps.tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="steps"):
        second.load_state_dict({**first.state_dict(), "steps": -1})


def test_a_step_that_raises_is_recorded_and_flushed(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    path = tmp_path / "e.gcrec"
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", nonfinite="error", record=path, record_every=100
    )
    fill_grads(model, seed=0)
    normalizer.apply()
    model[1].weight.grad[0, 0] = math.nan
    with pytest.raises(gradclip.NonFiniteGradientError):
        normalizer.apply()
    run = insight.load(path)  # on the disk before close()
    assert run.steps.tolist() == [0, 1]
    assert insight.findings(run)["first_nonfinite"]["layer"] == "1"
    normalizer.close()


def test_record_only_files_a_skipped_step_without_touching_it(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    path = tmp_path / "k.gcrec"
    normalizer = gradclip.GradientNormalizer(model, "ClipL2PerLayer", 1e-3, record=path)
    grads = fill_grads(model, seed=0)
    model[0].bias.grad[0] = math.inf
    grads[1][0] = math.inf
    normalizer.record_only(step=12)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    normalizer.close()
    run = insight.load(path)
    assert run.steps.tolist() == [12]
    assert run.nonfinite().tolist() == [[True, False]]


def test_per_tensor_norms_are_opt_in(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    path = tmp_path / "t.gcrec"
    normalizer = gradclip.GradientNormalizer(model, None, record=path, record_tensors=True)
    fill_grads(model, seed=0)
    report = normalizer.apply()
    normalizer.close()
    run = insight.load(path)
    assert run.header["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert torch.equal(torch.from_numpy(run.tensor_norms[0].copy()), report.tensor_norms.float())


def test_a_layer_added_later_is_not_recorded_and_warned_about(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    path = tmp_path / "g.gcrec"
    normalizer = gradclip.GradientNormalizer(model, None, record=path)
    fill_grads(model)
    normalizer.apply()
    model.append(nn.Linear(4, 1))
    fill_grads(model)
    with pytest.warns(UserWarning, match="not recorded"):
        normalizer.apply()
    normalizer.close()
    run = insight.load(path)
    assert run.layers == ["0"] and run.has_gradient().all()


def test_bad_recording_arguments_are_refused_before_anything_is_built(tmp_path: Path) -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="record_every"):
        gradclip.GradientNormalizer(model, None, record=tmp_path / "x", record_every=0)
    with pytest.raises(ValueError, match="directory"):
        gradclip.GradientNormalizer(model, None, record=tmp_path)
    with pytest.raises(ValueError, match="not a gradclip recording"):
        (tmp_path / "no.gcrec").write_text("hello\n")
        insight.load(tmp_path / "no.gcrec")


def test_a_copy_of_a_recording_normalizer_does_not_record(tmp_path: Path) -> None:
    import copy

    model = nn.Linear(2, 1)
    normalizer = gradclip.GradientNormalizer(model, None, record=tmp_path / "c.gcrec")
    clone = copy.deepcopy(normalizer)
    assert clone.recording is None and normalizer.recording == str(tmp_path / "c.gcrec")
    normalizer.close()


def test_the_backward_order_is_observed_on_the_next_pass_when_built_after_one(
    tmp_path: Path,
) -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(4, 1)
            self.early = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(self.early(x))

    model = Reversed()
    model(torch.randn(2, 3)).sum().backward()
    normalizer = gradclip.GradientNormalizer(model, None, record=tmp_path / "o.gcrec")
    normalizer.apply()  # no backward seen yet: the hooks stay for the next one
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        normalizer.apply()
    normalizer.close()
    run = insight.load(tmp_path / "o.gcrec")
    assert run.backward_order() == ([0, 1], True)  # "late" (column 0) first
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
