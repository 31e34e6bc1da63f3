"""State identity, override groups and precedence, strict=False loads, schedules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gradclip
from gradclip.core.identity import legacy_slot_name, slot_name, state_key
from gradclip.core.layers import match_overrides


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"enc": nn.Linear(4, 4), "dec": nn.Linear(4, 4), "head": nn.Linear(4, 2)})


def _set_grads(model: nn.Module, norms: dict[str, float]) -> None:
    for name, norm in norms.items():
        layer = model[name]  # type: ignore[index]
        for p in layer.parameters():
            p.grad = torch.ones_like(p)
        total = torch.cat([p.grad.flatten() for p in layer.parameters()]).norm()
        for p in layer.parameters():
            p.grad.mul_(norm / total)


def _norm(model: nn.Module, name: str) -> float:
    layer = model[name]  # type: ignore[index]
    return float(torch.cat([p.grad.flatten() for p in layer.parameters()]).norm())


# -- each override key is its own group ------------------------------------------------------
def test_equal_global_rules_under_two_keys_clip_each_key_alone() -> None:
    model = _net()
    rule = gradclip.ClipGlobalNorm(1.0)
    normalizer = gradclip.GradientNormalizer(model, "None", overrides={"enc": rule, "dec": rule})
    _set_grads(model, {"enc": 3.0, "dec": 0.5, "head": 7.0})
    normalizer.apply()
    assert _norm(model, "enc") == pytest.approx(1.0, rel=1e-6)
    assert _norm(model, "dec") == pytest.approx(0.5, rel=1e-6)  # merged, it drops to 0.083
    assert _norm(model, "head") == pytest.approx(7.0, rel=1e-6)


def test_an_override_equal_to_the_default_is_its_own_group() -> None:
    model = _net()
    rule = gradclip.ClipGlobalNorm(1.0)
    normalizer = gradclip.GradientNormalizer(model, rule, overrides={"dec": rule})
    _set_grads(model, {"enc": 3.0, "dec": 0.5, "head": 4.0})
    normalizer.apply()
    assert _norm(model, "dec") == pytest.approx(0.5, rel=1e-6)
    # the default's group is the layers no key names: enc and head together
    assert (_norm(model, "enc") ** 2 + _norm(model, "head") ** 2) ** 0.5 == pytest.approx(1.0)


def test_a_glob_naming_several_layers_is_one_group() -> None:
    model = _net()
    normalizer = gradclip.GradientNormalizer(
        model, "None", overrides={"[ed]*": gradclip.ClipGlobalNorm(1.0)}
    )
    _set_grads(model, {"enc": 3.0, "dec": 4.0, "head": 7.0})
    normalizer.apply()
    assert _norm(model, "enc") == pytest.approx(0.6, rel=1e-6)
    assert _norm(model, "dec") == pytest.approx(0.8, rel=1e-6)


@pytest.mark.parametrize("rule", [gradclip.ZClip(warmup_steps=2), gradclip.AutoClip()])
def test_stateful_global_rules_keep_one_state_per_key(rule: gradclip.Rule) -> None:
    model = _net()
    normalizer = gradclip.GradientNormalizer(model, "None", overrides={"enc": rule, "dec": rule})
    (slot,) = normalizer.state_dict()["rules"].values()
    assert sorted(slot["rows"]) == ["*[dec]", "*[enc]"]
    assert slot["covers"]["*[enc]"] == ["enc: weight(4, 4), bias(4,)"]
    _set_grads(model, {"enc": 3.0, "dec": 0.5, "head": 1.0})
    report = normalizer.apply()
    stats = report.to_dict()["stats"]
    # one entry per key's group, the second named by its first layer
    plain = [key for key in stats if not key.endswith("[dec]")]
    assert sorted(stats) == sorted([*plain, *(f"{key}[dec]" for key in plain)])


# -- precedence ------------------------------------------------------------------------------
LAYERS = ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "head"]


def test_an_exact_name_beats_a_glob_and_a_module() -> None:
    chosen = match_overrides(LAYERS, {"blocks.0.attn": 1, "blocks.*.attn": 2, "blocks": 3})
    assert chosen["blocks.0.attn"] == "blocks.0.attn"
    chosen = match_overrides(LAYERS, {"blocks.*.attn": 2, "blocks": 3, "blocks.0.attn": 1})
    assert chosen["blocks.0.attn"] == "blocks.0.attn"


def test_a_glob_beats_a_module_name_in_either_order() -> None:
    for overrides in ({"blocks": 1, "blocks.*.attn": 2}, {"blocks.*.attn": 2, "blocks": 1}):
        chosen = match_overrides(LAYERS, overrides)
        assert chosen == {
            "blocks.0.attn": "blocks.*.attn",
            "blocks.0.mlp": "blocks",
            "blocks.1.attn": "blocks.*.attn",
        }


def test_among_globs_more_literal_components_win() -> None:
    for overrides in ({"blocks.*.attn": 1, "blocks.*": 2}, {"blocks.*": 2, "blocks.*.attn": 1}):
        chosen = match_overrides(LAYERS, overrides)
        assert chosen["blocks.0.attn"] == "blocks.*.attn"
        assert chosen["blocks.0.mlp"] == "blocks.*"


def test_a_tie_goes_to_the_later_key() -> None:
    assert match_overrides(LAYERS, {"*.attn": 1, "blocks.*": 2})["blocks.0.attn"] == "blocks.*"
    assert match_overrides(LAYERS, {"blocks.*": 2, "*.attn": 1})["blocks.0.attn"] == "*.attn"


def test_among_module_names_the_innermost_wins() -> None:
    for overrides in ({"blocks.0": 1, "blocks": 2}, {"blocks": 2, "blocks.0": 1}):
        assert match_overrides(LAYERS, overrides)["blocks.0.mlp"] == "blocks.0"


def test_the_narrower_glob_applies_under_a_none_module_key() -> None:
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.ModuleDict({"attn": nn.Linear(2, 2)}) for _ in range(2))
    normalizer = gradclip.GradientNormalizer(
        model, "None", overrides={"blocks": "None", "blocks.*.attn": ("ClipL2PerLayer", 0.5)}
    )
    assert {r.describe() for r in normalizer.rules.values()} == {"ClipL2PerLayer(threshold=0.5)"}


# -- the one definition ----------------------------------------------------------------------
def test_state_identity_ignores_thresholds_and_caps_only() -> None:
    assert slot_name(gradclip.ZClip(z_thresh=2.0)) == slot_name(gradclip.ZClip(max_grad_norm=1.0))
    assert slot_name(gradclip.ZClip(warmup_steps=3)) != slot_name(gradclip.ZClip())
    assert slot_name(gradclip.AutoClip(5.0)) == slot_name(gradclip.AutoClip(50.0))
    assert slot_name(gradclip.AutoClip(scope="layer")) != slot_name(gradclip.AutoClip())
    assert state_key(gradclip.ClipL2PerLayer(1.0)) == state_key(gradclip.ClipL2PerLayer(2.0))
    assert state_key(gradclip.chain(gradclip.ZClip(), "ClipL2PerLayer")) != state_key(
        gradclip.ZClip()
    )


def _spiky_run(normalizer: gradclip.GradientNormalizer, model: nn.Module, steps: int) -> None:
    for t in range(steps):
        _set_grads(model, {"enc": 1.0 + 0.01 * t, "dec": 1.0, "head": 1.0})
        normalizer.apply()


def test_strict_false_restores_what_matches_and_returns_the_rest() -> None:
    model = _net()
    saved_by = gradclip.GradientNormalizer(
        model,
        "ClipL2PerLayer",
        overrides={"enc": gradclip.ZClip(warmup_steps=2), "dec": gradclip.AutoClip()},
    )
    _spiky_run(saved_by, model, 3)
    saved = saved_by.state_dict()
    # z_thresh differs (not state), AutoClip is gone, the head gets an AGC (stateless)
    other = gradclip.GradientNormalizer(
        model,
        "ClipL2PerLayer",
        overrides={
            "enc": gradclip.ZClip(warmup_steps=2, z_thresh=9.0),
            "head": gradclip.AdaptiveGradClip(),
        },
    )
    before = copy.deepcopy(other.state_dict()["rules"])
    with pytest.raises(ValueError, match=r"AutoClip.*no rule here keeps this state.*strict=False"):
        other.load_state_dict(saved)
    assert str(other.state_dict()["rules"]) == str(before)  # nothing changed
    result = other.load_state_dict(saved, strict=False)
    assert result.missing_keys == []
    assert result.unexpected_keys == ["AutoClip(history_size=1000, scope='global')['*[dec]']"]
    zclip = "ZClip(alpha=0.97, warmup_steps=2, scope='global')"
    restored = other.state_dict()["rules"][zclip]["rows"]["*[enc]"]
    for key, value in saved["rules"][zclip]["rows"]["*[enc]"].items():
        assert torch.equal(restored[key], value)


def test_a_row_covering_other_layers_starts_afresh() -> None:
    model = _net()
    first = gradclip.GradientNormalizer(model, "None", overrides={"enc": gradclip.ZClip()})
    _spiky_run(first, model, 3)
    wider = gradclip.GradientNormalizer(model, "None", overrides={"*c": gradclip.ZClip()})
    result = wider.load_state_dict(first.state_dict(), strict=False)
    assert len(result.missing_keys) == 1 and "covers" not in result.reasons[result.missing_keys[0]]


def test_reconfigure_keeps_state_and_reports_rows_started_afresh() -> None:
    model = _net()
    normalizer = gradclip.GradientNormalizer(model, gradclip.ZClip(warmup_steps=2))
    _spiky_run(normalizer, model, 4)
    kept = normalizer.state_dict()["rules"]
    assert normalizer.reconfigure(gradclip.ZClip(warmup_steps=2, z_thresh=1.5)) == []
    assert str(normalizer.state_dict()["rules"]) == str(kept)
    assert normalizer.default == gradclip.ZClip(warmup_steps=2, z_thresh=1.5)
    fresh = normalizer.reconfigure(gradclip.ZClip(warmup_steps=3))
    assert fresh == ["ZClip(alpha=0.97, warmup_steps=3, scope='global')['*']"]
    with pytest.raises(KeyError):
        normalizer.reconfigure(overrides={"nope": "None"})
    assert normalizer.default == gradclip.ZClip(warmup_steps=3)  # unchanged by the failure


def _zclip_run(apply: object, model: nn.Module, caps: list[float]) -> list[float]:
    """ZClip over a run with a spike at the end; the caps are a warm-up schedule."""
    stats = []
    for t, cap in enumerate(caps):
        norm = 50.0 if t == len(caps) - 1 else 1.0 + 0.1 * (t % 3)
        _set_grads(model, {"enc": norm, "dec": norm, "head": norm})
        report = apply(cap)  # type: ignore[operator]
        stats.append(float(report.to_dict()["stats"]["zclip_mean"]))
    return stats


def test_a_warm_up_schedule_keeps_zclip_state() -> None:
    caps = [0.5 + 0.5 * t for t in range(12)]  # max_grad_norm rising over the run
    model = _net()
    scheduled = _zclip_run(
        lambda cap: gradclip.normalize_(model, gradclip.ZClip(warmup_steps=5, max_grad_norm=cap)),
        model,
        caps,
    )
    spiked = _norm(model, "enc")
    reference_model = _net()
    normalizer = gradclip.GradientNormalizer(reference_model, gradclip.ZClip(warmup_steps=5))
    reference = _zclip_run(lambda cap: normalizer.apply(), reference_model, caps)
    # max_grad_norm does not feed the EMA: the statistics are those of an unscheduled run
    assert scheduled == pytest.approx(reference, rel=1e-12)
    assert spiked < 5.0  # the spike of 50 per layer is clipped: ZClip left its warm-up


# -- format version 2 -----------------------------------------------------------------------
def _as_version_2(normalizer: gradclip.GradientNormalizer) -> dict:  # type: ignore[type-arg]
    """What gradclip 0.2 saved for this normalizer's configuration."""
    state = normalizer.state_dict()
    engine = normalizer._engine
    rules = {}
    for name, entry in state["rules"].items():
        slot = engine.store.slots[name]
        for row, tensors in entry["rows"].items():
            old_slot, old_row = slot.legacy[row]
            target = rules.setdefault(old_slot, {"steps": entry["steps"], "rows": {}})
            target["rows"][old_row] = tensors
    return {**state, "version": 2, "rules": rules}


def test_a_version_2_state_loads() -> None:
    # AutoClip(history_size=None) was AutoClip()'s default in gradclip 0.2: a checkpoint of
    # that default loads into it
    auto = gradclip.AutoClip(history_size=None, scope="layer")
    model = _net()
    normalizer = gradclip.GradientNormalizer(
        model, auto, overrides={"enc": gradclip.ZClip(warmup_steps=2)}
    )
    _spiky_run(normalizer, model, 3)
    old = _as_version_2(normalizer)
    assert "AutoClip(percentile=10.0, history_size=None, scope='layer')" in old["rules"]
    fresh = gradclip.GradientNormalizer(
        model, auto, overrides={"enc": gradclip.ZClip(warmup_steps=2)}
    )
    assert fresh.load_state_dict(old) == ([], [], {})
    assert str(fresh.state_dict()) == str(normalizer.state_dict())


def test_a_version_2_state_shared_by_two_keys_says_why_it_cannot_load() -> None:
    model = _net()
    rule = gradclip.ZClip(warmup_steps=2)
    normalizer = gradclip.GradientNormalizer(model, "None", overrides={"enc": rule, "dec": rule})
    old = _as_version_2(normalizer)
    assert legacy_slot_name(rule, 0, rule, False) in old["rules"]
    with pytest.raises(ValueError, match=r"gradclip 0\.2.*shared one state"):
        normalizer.load_state_dict(old)
    result = normalizer.load_state_dict(old, strict=False)
    assert len(result.missing_keys) == 2


def test_reconfigure_a_threshold_applies_to_a_dl4j_mode_given_by_name() -> None:
    model = _net()
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", 1.0, overrides={"head": "ClipElementWiseAbsoluteValue"}
    )
    assert normalizer.reconfigure(threshold=0.5) == []
    assert {r.describe() for r in normalizer.rules.values()} == {
        "ClipL2PerLayer(threshold=0.5)",
        "ClipElementWiseAbsoluteValue(threshold=0.5)",
    }
    _set_grads(model, {"enc": 3.0, "dec": 0.2, "head": 1.0})
    normalizer.apply()
    assert _norm(model, "enc") == pytest.approx(0.5, rel=1e-6)
    assert _norm(model, "dec") == pytest.approx(0.2, rel=1e-6)


def test_layer_local_rules_under_several_keys_run_as_one_group() -> None:
    model = _net()
    normalizer = gradclip.GradientNormalizer(
        model, "ClipL2PerLayer", overrides={"enc": ("ClipL2PerLayer", 0.5), "dec": "ClipL2PerLayer"}
    )
    _set_grads(model, {"enc": 3.0, "dec": 3.0, "head": 3.0})
    normalizer.apply()
    plan = normalizer._engine._plan
    assert plan is not None and len(plan.groups) == 1
    assert [_norm(model, n) for n in ("enc", "dec", "head")] == pytest.approx([0.5, 1.0, 1.0])
