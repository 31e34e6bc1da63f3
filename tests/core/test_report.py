"""NormReport: norms on the device, one transfer to read them, the table."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyRNN, backward_once, fill_grads, mlp

import gradclip


def test_report_is_device_resident_and_readable() -> None:
    model = TinyRNN()
    backward_once(model, scale=100.0)
    report = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", 1.0, overrides={"head": ("ClipElementWiseAbsoluteValue", 0.1)}
    ).apply()
    assert isinstance(report.layer_norms["rnn"], torch.Tensor)
    assert report.layer_norms["rnn"].dim() == 0
    assert report.tensor_norms.dtype == torch.float32
    data = report.to_dict()
    assert set(data["layer_norms"]) == {"embed", "rnn", "head"}
    assert data["layer_norms"]["head"] is None  # element-wise clipping measures no norm
    assert data["changed"]["head"] is None  # ... and cannot tell if it changed anything
    assert data["changed"]["rnn"] is True
    assert data["param_norms"]["rnn.weight_hh_l0"] > 0
    text = str(report)
    assert "rnn" in text and "weight_hh_l0=" in text and "?" in text
    assert report.changed_layers() == ["embed", "rnn"]


def test_measure_all_reports_every_norm() -> None:
    model = mlp(2)
    grads = fill_grads(model)
    report = gradclip.GradientNormalizer(
        model, "ClipElementWiseAbsoluteValue", 0.1, overrides={"1": None}, measure_all=True
    ).apply()
    data = report.to_dict()
    assert data["layer_norms"]["1"] == pytest.approx(
        float(torch.cat([g.flatten() for g in grads[2:]]).double().norm()), rel=1e-6
    )
    assert torch.equal(model[1].weight.grad, grads[2])


def test_no_gradient_at_all_gives_an_empty_report() -> None:
    model = mlp(2)
    with pytest.warns(UserWarning, match="found no gradient"):
        report = gradclip.GradientNormalizer(model, "ClipL2PerLayer").apply()
    assert report.layer_names == []
    assert report.to_dict()["layer_norms"] == {}
    model[1].weight.grad = torch.ones(8, 8)
    report = gradclip.normalize_(model, "ClipL2PerLayer", 1.0)
    assert report.layer_names == ["1"]
    assert float(model[1].weight.grad.norm()) == pytest.approx(1.0)


@pytest.mark.parametrize("element_wise_first", [True, False])
def test_a_chain_member_that_cannot_tell_does_not_hide_a_change(element_wise_first: bool) -> None:
    # ClipL2PerLayer(0.3) clips every layer of fill_grads' gradients; the element-wise
    # member (threshold far above any element) cannot tell whether it changed anything
    model = mlp(2)
    fill_grads(model)
    members = [("ClipL2PerLayer", 0.3), ("ClipElementWiseAbsoluteValue", 1e6)]
    rule = gradclip.chain(*(members[::-1] if element_wise_first else members))
    report = gradclip.normalize_(model, rule)
    assert report.to_dict()["changed"] == {"0": True, "1": True}
    assert report.changed_layers() == ["0", "1"]
    assert "?" not in report.table()
    # alone, the element-wise rule still cannot tell, whatever it did
    fill_grads(model)
    report = gradclip.normalize_(model, "ClipElementWiseAbsoluteValue", 0.01)
    assert report.to_dict()["changed"] == {"0": None, "1": None}
    assert report.changed_layers() == []
