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
    assert sorted(p for _, _, p in slots) == [2.0, 2.0, float("inf")]
    assert {k for _, k, _ in slots} == {0}
    pipe = Pipeline(None, 0, 2, slots)
    assert pipe.num_sums == 3 and pipe.num_maxima == 1  # the report's total, two L2 totals


def test_a_chain_member_that_spans_layers_gets_a_slot_in_its_round() -> None:
    later = gradclip.chain(("ClipL2PerLayer", 1.0), gradclip.ClipGlobalNorm(1.0, norm_type=3))
    slots = spanning_slots([(later, None)])
    assert [(k, p) for _, k, p in slots] == [(1, 3.0)]
    pipe = Pipeline(None, 0, 2, slots)
    # nothing before round 0: the step's sums wait for round 1's collective
    assert pipe.later_rounds == (1,) and pipe.active and not pipe.now
    first = spanning_slots([(gradclip.chain(gradclip.ClipGlobalNorm(1.0), "ClipL2PerLayer"), "k")])
    assert [k for _, k, _ in first] == [0] and Pipeline(None, 0, 2, first).now
    both = gradclip.chain(gradclip.ClipGlobalNorm(1.0), gradclip.ZClip(), gradclip.AutoClip())
    assert Pipeline(None, 0, 2, spanning_slots([(both, None)])).later_rounds == (1, 2)


def test_nonfinite_policies_on_stages_add_their_counts_to_the_sums() -> None:
    slots = spanning_slots([(gradclip.ClipGlobalNorm(1.0), None)])
    assert Pipeline(None, 0, 2, slots).num_sums == 2  # the report's total, the slot
    zero = Pipeline(None, 0, 2, slots, nonfinite="zero")
    # + every non-finite tensor, + the slot's; "zero" alone does not need round 0's
    assert zero.flags and zero.num_sums == 4 and zero.bad_at == 2
    skip = Pipeline(None, 0, 2, (), nonfinite="skip")
    assert skip.active and skip.now and skip.num_sums == 2  # any stage skips them all
    later = spanning_slots(
        [(gradclip.chain(("ClipL2PerLayer", 1.0), gradclip.ClipGlobalNorm(1.0)), None)]
    )
    # "error" before a later round's collective: every stage raises together
    assert Pipeline(None, 0, 2, later, nonfinite="error").now
    assert not Pipeline(None, 0, 2, (), nonfinite="error").active


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
    # "zero" and "skip" are accepted on stages: only the mesh is refused here
    with pytest.raises(ValueError, match="init_process_group"):
        setup_stages(nn.Linear(2, 2), None, object(), "zero")
    with pytest.raises(ValueError, match="init_process_group"):
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
