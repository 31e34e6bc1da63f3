"""Pipeline stages on one process: configuration refused before anything runs, slots, identity.

The four-process runs against the unsplit model are in ``test_pipeline.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.pipeline import Pipeline, pipeline_of, spanning_slots
from gradclip.core.rule import Measured
from gradclip.core.stages import (
    check_stage_identity,
    check_stages,
    present_overrides,
    setup_stages,
    stage_identity,
    stage_layers,
)
from gradclip.rules.dl4j import resolve_rule


def _stage(names: list[str]) -> nn.Module:
    model = nn.Module()
    for name in names:
        model.add_module(name, nn.Linear(2, 2))
    return model


def test_only_rules_that_span_layers_get_a_slot() -> None:
    rules = [
        resolve_rule("ClipL2PerLayer", 1.0),
        gradclip.ClipGlobalNorm(1.0),
        gradclip.ClipGlobalNorm(1.0, norm_type="inf"),
        gradclip.ZClip(scope="layer"),
        gradclip.AutoClip(),
        gradclip.AdaptiveGradClip(),
    ]
    slots = spanning_slots([(rule, None) for rule in rules])
    assert sorted(p for _, p in slots) == [2.0, 2.0, float("inf")]
    pipe = Pipeline(None, 0, 2, slots)
    assert pipe.num_sums == 3 and pipe.num_maxima == 1  # the report's total, two L2 totals


def test_a_chain_that_spans_layers_after_its_first_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="first rule"):
        spanning_slots(
            [(gradclip.chain(("ClipL2PerLayer", 1.0), gradclip.ClipGlobalNorm(1.0)), None)]
        )
    assert spanning_slots([(gradclip.chain(gradclip.ClipGlobalNorm(1.0), "ClipL2PerLayer"), "k")])


def test_a_rule_reading_the_total_without_declaring_it_is_refused_on_stages() -> None:
    m = Measured(grads=[], params=[], norms=torch.ones(3), layer_norms=None, layout=None)  # type: ignore[arg-type]
    assert float(m.total_norm()) == pytest.approx(3**0.5)
    staged = dataclasses.replace(m, stage_totals={}, _total={})
    with pytest.raises(RuntimeError, match="spans_layers"):
        staged.total_norm()
    spanning = dataclasses.replace(m, stage_totals={2.0: torch.tensor(5.0)}, _total={})
    assert float(spanning.total_norm()) == 5.0


def test_bad_stage_arguments_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="not both"):
        check_stages(nn.Linear(2, 2), [nn.Linear(2, 2)])
    with pytest.raises(TypeError, match=r"nn\.Module"):
        check_stages(None, [torch.ones(2)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="init_process_group"):
        pipeline_of(object())
    with pytest.raises(ValueError, match="pipeline stages"):
        setup_stages(nn.Linear(2, 2), None, object(), "zero")
    with pytest.raises(ValueError, match="pipeline stages"):
        gradclip.GradientNormalizer(nn.Linear(2, 2), "ClipL2PerLayer", nonfinite="skip", pp_mesh=1)


def test_stages_keep_their_global_names_and_may_not_repeat_one() -> None:
    first, second = _stage(["a", "b"]), _stage(["c"])
    assert [layer.name for layer in stage_layers([first, second])] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="'b'"):
        stage_layers([first, _stage(["b"])])


def test_overrides_of_other_stages_layers_are_theirs() -> None:
    stage = _stage(["a", "b"])
    overrides = {"a": "None", "z": "None", "b*": "ClipL2PerLayer"}
    assert present_overrides([stage], ["a", "b"], overrides) == {
        "a": "None",
        "b*": "ClipL2PerLayer",
    }


def test_stage_identity_is_keyed_by_layer_and_refuses_another_stage() -> None:
    stage = _stage(["a"])
    layers = stage_layers([stage])
    rules = [gradclip.ZClip()]
    mine = stage_identity(layers, rules)
    assert list(mine["stage_layers"]) == ["a"]
    check_stage_identity(mine, mine)
    other = stage_identity(stage_layers([_stage(["b"])]), rules)
    with pytest.raises(ValueError, match="'a'"):
        check_stage_identity(other, mine)
    with pytest.raises(ValueError, match="pp_mesh"):
        check_stage_identity({"layers": ["a"]}, mine)
