"""The Lightning callback's state across fits and checkpoints, and the names it uses."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import gradclip  # noqa: E402
from gradclip.integrations.lightning import GradientNormalizationCallback  # noqa: E402

RULE = gradclip.ZClip(warmup_steps=2, scope="layer")


class Net(pl.LightningModule):
    def __init__(self, body: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body or nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(torch.tanh(self.body(x))), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _data() -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(callback: GradientNormalizationCallback, epochs: int = 1, **kw: Any) -> Any:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )


def _counts(callback: GradientNormalizationCallback) -> dict[str, int]:
    normalizer = callback.normalizer
    assert normalizer is not None
    ((_, slot),) = normalizer.state_dict()["rules"].items()
    return {row: int(state["count"]) for row, state in slot["rows"].items()}


def test_second_fit_on_the_same_trainer_continues_the_state() -> None:
    torch.manual_seed(0)
    module, callback = Net(), GradientNormalizationCallback(RULE)
    trainer = _trainer(callback)
    trainer.fit(module, _data())
    first = callback.normalizer
    assert set(_counts(callback).values()) == {4}
    trainer.fit_loop.max_epochs = 2
    trainer.fit(module, _data())  # configure_optimizers runs again: new optimizer objects
    assert set(_counts(callback).values()) == {8}
    assert callback.normalizer is first


def test_state_restored_by_hand_before_fit() -> None:
    torch.manual_seed(0)
    module, callback = Net(), GradientNormalizationCallback(RULE)
    _trainer(callback).fit(module, _data())
    saved = callback.state_dict()
    assert saved["format"] == "gradclip.TrainerCallback" and len(saved["optimizers"]) == 1

    for state in (saved, saved["optimizers"][0]):  # the callback's, or a normalizer's
        again = GradientNormalizationCallback(RULE)
        assert again.normalizer is None
        again.load_state_dict(state)
        assert again.state_dict() == state or again.state_dict()["optimizers"] == [state]
        _trainer(again).fit(copy.deepcopy(module), _data())
        assert set(_counts(again).values()) == {8}


def test_state_of_another_model_restores_what_matches_and_warns() -> None:
    torch.manual_seed(0)
    callback = GradientNormalizationCallback(RULE)
    _trainer(callback).fit(Net(), _data())
    other = GradientNormalizationCallback(RULE)
    other.load_state_dict(callback.state_dict())
    wider = Net(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 16)))
    with pytest.warns(gradclip.StateNotRestoredWarning, match=r"optimizer 0: .*'body.3'"):
        _trainer(other).fit(wider, _data())
    assert _counts(other) == {"body.0": 8, "body.2": 8, "body.3": 4, "head": 8}


def _resume(tmp_path: Any, first: Any, second: Any) -> GradientNormalizationCallback:
    """Fit one epoch with callback ``first``, checkpoint, resume a second with ``second``."""
    torch.manual_seed(0)
    trainer = _trainer(first)
    module = Net()
    trainer.fit(module, _data())
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    _trainer(second, epochs=2).fit(copy.deepcopy(module), _data(), ckpt_path=tmp_path / "one.ckpt")
    return second


def test_a_resume_with_another_rule_warns_and_goes_on(tmp_path: Any) -> None:
    first = GradientNormalizationCallback(gradclip.AutoClip(scope="layer"))
    with pytest.warns(gradclip.StateNotRestoredWarning, match=r"AutoClip.*ZClip"):
        second = _resume(tmp_path, first, GradientNormalizationCallback(RULE))
    assert set(_counts(second).values()) == {4}  # started afresh at the resume


def test_a_changed_threshold_that_an_override_inherits_restores_everything(
    tmp_path: Any,
) -> None:
    import warnings

    overrides = {"head": "ClipL2PerLayer"}  # takes its threshold from threshold=
    first = GradientNormalizationCallback(RULE, threshold=1.0, overrides=overrides)
    second = GradientNormalizationCallback(RULE, threshold=2.0, overrides=overrides)
    assert first.state_key != second.state_key
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradclip.StateNotRestoredWarning)
        _resume(tmp_path, first, second)
    assert set(_counts(second).values()) == {8}


def test_equivalent_spellings_are_one_configuration() -> None:
    spelled = [
        GradientNormalizationCallback("ClipL2PerLayer", overrides={"head": "ClipL2PerLayer"}),
        GradientNormalizationCallback(
            ("ClipL2PerLayer"), overrides={"head": ("ClipL2PerLayer", 1.0)}
        ),
        GradientNormalizationCallback(
            gradclip.ClipL2PerLayer(1.0),
            overrides={"head": {"mode": "CLIP_L2_PER_LAYER", "threshold": 1}},
        ),
    ]
    assert len({callback.state_key for callback in spelled}) == 1


def test_a_mismatch_can_be_made_an_error(tmp_path: Any) -> None:
    import warnings

    first = GradientNormalizationCallback(gradclip.AutoClip(scope="layer"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradclip.StateNotRestoredWarning)
        with pytest.raises(gradclip.StateNotRestoredWarning):
            _resume(tmp_path, first, GradientNormalizationCallback(RULE))


def test_checkpoint_holds_the_state_under_the_callbacks_key(tmp_path: Any) -> None:
    torch.manual_seed(0)
    callback = GradientNormalizationCallback(RULE, overrides={"head": "None"})
    trainer = _trainer(callback)
    trainer.fit(Net(), _data())
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    checkpoint = torch.load(tmp_path / "x.ckpt", weights_only=True)
    saved = checkpoint["callbacks"][callback.state_key]
    assert "ZClip" in callback.state_key and "head" in callback.state_key
    (state,) = saved["optimizers"]
    ((_, slot),) = state["rules"].items()
    assert set(slot["rows"]) == {"body.0", "body.2"}
    assert GradientNormalizationCallback("ClipL2PerLayer").state_key != callback.state_key


@pytest.mark.parametrize("depth", [1, 2])
def test_compiled_submodule_keeps_the_names_users_write(depth: int) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16))
    compiled = torch.compile(net, backend="eager")
    body = compiled if depth == 1 else nn.ModuleDict({"inner": compiled})
    prefix = "body." if depth == 1 else "body.inner."

    class Wrapped(Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inner = self.body if depth == 1 else self.body["inner"]
            x, y = batch
            return nn.functional.mse_loss(self.head(torch.tanh(inner(x))), y)

    module = Wrapped(body)
    assert any("_orig_mod" in name for name, _ in module.named_parameters())
    overrides = {
        f"{prefix}2": ("ClipL2PerLayer", 1.0),
        f"{prefix}_orig_mod.0": ("ClipL2PerLayer", 2.0),
    }
    callback = GradientNormalizationCallback("ClipL2PerLayer", 0.01, overrides=overrides)
    trainer = _trainer(callback)
    trainer.fit(module, _data())
    normalizer = callback.normalizer
    assert normalizer is not None
    thresholds = {name: getattr(rule, "threshold", None) for name, rule in normalizer.rules.items()}
    assert thresholds == {f"{prefix}0": 2.0, f"{prefix}2": 1.0, "head": 0.01}
    logged = {k for k in trainer.callback_metrics if k.startswith("grad_norm/")}
    assert logged == {f"grad_norm/{name}" for name in thresholds}
