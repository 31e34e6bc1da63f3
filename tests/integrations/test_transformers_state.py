"""The Hugging Face callback: names users write, norms in every reporter, state in checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from resume_runs import Tokens  # noqa: E402

import gradclip  # noqa: E402
from gradclip.integrations import transformers as integration  # noqa: E402
from gradclip.integrations.transformers import (  # noqa: E402
    STATE_FILE,
    GradientNormalizationCallback,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LAYER = "transformer.h.0.attn.c_attn"


def _model() -> Any:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, n_inner=64
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)  # lm_head tied to transformer.wte


def _trainer(tmp_path: Path, callback: Any, model: Any = None, **kw: Any) -> Any:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=kw.pop("max_steps", 2),
        per_device_train_batch_size=4,
        max_grad_norm=0.0,
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        **{"save_strategy": "no", "report_to": "none", **kw},
    )
    return transformers.Trainer(
        model=model if model is not None else _model(),
        args=args,
        train_dataset=Tokens(),
        callbacks=[callback],
    )


def test_tied_lm_head_names_the_shared_layer(tmp_path: Path) -> None:
    callback = GradientNormalizationCallback("ClipL2PerLayer", 0.05, overrides={"lm_head": "None"})
    _trainer(tmp_path, callback).train()
    assert callback.normalizer is not None
    rules = callback.normalizer.rules
    assert "lm_head" not in rules
    assert rules["transformer.wte"].describe() == "None()"
    assert rules[LAYER].describe() == "ClipL2PerLayer(threshold=0.05)"


def test_tied_module_and_its_layer_overridden_differently_is_an_error(tmp_path: Path) -> None:
    callback = GradientNormalizationCallback(
        "ClipL2PerLayer", overrides={"transformer.wte": "ClipL2PerLayer", "lm_head": "None"}
    )
    with pytest.raises(ValueError, match=r"'transformer.wte' and 'lm_head'.*lm_head shares"):
        _trainer(tmp_path, callback)


def test_override_key_of_no_layer_fails_when_the_trainer_is_made(tmp_path: Path) -> None:
    callback = GradientNormalizationCallback(
        "ClipL2PerLayer", overrides={"transformer.h.0.atn.c_attn": "None"}
    )
    with pytest.raises(KeyError, match=f"closest layer is '{LAYER}'"):
        _trainer(tmp_path, callback)


def _scalars(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for root, _dirs, files in os.walk(logdir):
        if any(f.startswith("events.out.tfevents") for f in files):
            accumulator = EventAccumulator(root)
            accumulator.Reload()
            tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_norms_reach_tensorboard_through_report_to(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    callback = GradientNormalizationCallback("ClipL2PerLayer", 0.05)
    trainer = _trainer(tmp_path, callback, report_to=["tensorboard"])
    trainer.train()
    tags = _scalars(tmp_path)  # the reporter writes to <output_dir>/runs/...
    assert "train/loss" in tags
    assert f"train/grad_norm/{LAYER}" in tags and "train/grad_norm/transformer.wte" in tags
    assert any(f"grad_norm/{LAYER}" in entry for entry in trainer.state.log_history)


def test_warns_once_where_the_reporters_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(integration, "_calling_handler", lambda _callback: None)
    callback = GradientNormalizationCallback("ClipL2PerLayer", 0.05)
    with pytest.warns(UserWarning, match="TensorBoardCallback") as caught:
        trainer = _trainer(tmp_path, callback, report_to=["tensorboard"])
        trainer.train()
    assert sum("report_to" in str(w.message) for w in caught) == 1


def test_each_checkpoint_holds_the_state_and_a_checkpoint_elsewhere_loads_by_hand(
    tmp_path: Path,
) -> None:
    rule = gradclip.AutoClip(scope="layer")
    callback = GradientNormalizationCallback(rule)
    _trainer(tmp_path / "a", callback, max_steps=4, save_strategy="steps", save_steps=2).train()
    for step in (2, 4):
        saved = torch.load(tmp_path / "a" / f"checkpoint-{step}" / STATE_FILE, weights_only=True)
        assert saved["global_step"] == step
        (state,) = saved["callback"]["optimizers"]
        ((_, slot),) = state["rules"].items()
        assert all(int(row["count"]) == step for row in slot["rows"].values())

    # Resuming from a checkpoint outside output_dir: the automatic lookup finds no file ...
    elsewhere = tmp_path / "a" / "checkpoint-2"
    again = GradientNormalizationCallback(rule)
    with pytest.warns(UserWarning, match="start afresh"):
        trainer = _trainer(tmp_path / "b", again, max_steps=4)
        trainer.train(resume_from_checkpoint=str(elsewhere))
    # ... and load_checkpoint says where it is.
    third = GradientNormalizationCallback(rule)
    third.load_checkpoint(elsewhere)
    _trainer(tmp_path / "c", third, max_steps=4).train(resume_from_checkpoint=str(elsewhere))
    assert _equal(third.state_dict(), callback.state_dict())


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_equal, a, b))
    return bool(a == b)


def test_a_resume_with_another_rule_warns_and_trains_on(tmp_path: Path) -> None:
    first = GradientNormalizationCallback(gradclip.AutoClip(scope="layer"))
    _trainer(tmp_path, first, max_steps=2, save_strategy="steps", save_steps=2).train()
    for mode in ("ClipL2PerLayer", gradclip.ZClip(warmup_steps=2)):  # stateless, stateful
        again = GradientNormalizationCallback(mode)
        with pytest.warns(gradclip.StateNotRestoredWarning, match=r"resuming at step 2.*AutoClip"):
            trainer = _trainer(tmp_path, again, max_steps=4)
            trainer.train(resume_from_checkpoint=True)
        assert trainer.state.global_step == 4


def test_a_resume_with_only_a_threshold_changed_restores_silently(tmp_path: Path) -> None:
    import warnings

    first = GradientNormalizationCallback(gradclip.ZClip(warmup_steps=2, z_thresh=2.0))
    _trainer(tmp_path, first, max_steps=2, save_strategy="steps", save_steps=2).train()
    again = GradientNormalizationCallback(gradclip.ZClip(warmup_steps=2, z_thresh=3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradclip.StateNotRestoredWarning)
        _trainer(tmp_path, again, max_steps=4).train(resume_from_checkpoint=True)
    assert again.normalizer is not None
    ((_, slot),) = again.normalizer.state_dict()["rules"].items()
    assert int(slot["rows"]["*"]["count"]) == 4
