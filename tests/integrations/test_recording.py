"""Recording from the trainer callbacks: the trainer's steps, skipped AMP steps, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradclip import insight
from gradclip.commands.cli import main

KEYS = {"steps", "layers", "first_nonfinite", "spikes", "vanishing", "no_gradient", "dominant"}


def _report_json(path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()  # what the trainer printed
    assert main(["report", str(path), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert set(found) >= KEYS
    return found  # type: ignore[no-any-return]


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_lightning_records_the_global_steps_and_a_skipped_amp_step(
    tmp_path: Path, precision: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("lightning.pytorch")
    from test_lightning import Tiny, _fit

    torch.manual_seed(0)
    path = tmp_path / "pl.gcrec"
    inf_at = 1 if precision == "16-mixed" else None
    _fit(precision, Tiny(inf_at=inf_at), steps=3, record=path)
    run = insight.load(path)  # flushed when fitting ended
    assert run.layers == ["body.0", "body.2", "head"]
    assert run.steps.tolist() == [0, 1, 2]
    found = _report_json(path, capsys)
    if inf_at is None:
        assert found["first_nonfinite"] is None and not run.nonfinite().any()
    else:  # the scaler skipped step 1: recorded, and every layer is inf (the loss was)
        assert run.nonfinite().tolist() == [[False] * 3, [True] * 3, [False] * 3]
        first = found["first_nonfinite"]
        assert first["step"] == 1 and first["layer"] is None  # type: ignore[index]
        assert not run.changed()[1].any()


def test_lightning_with_two_optimizers_writes_one_file_each(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradclip.integrations.lightning import GradientNormalizationCallback

    class Two(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 1)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            first, second = self.optimizers()
            loss = self.b(torch.tanh(self.a(batch[0]))).pow(2).mean()
            self.manual_backward(loss)
            first.step()
            second.step()
            first.zero_grad()
            second.zero_grad()

        def configure_optimizers(self):  # type: ignore[no-untyped-def]
            return [
                torch.optim.SGD(self.a.parameters(), lr=0.1),
                torch.optim.SGD(self.b.parameters(), lr=0.1),
            ]

    callback = GradientNormalizationCallback(None, record=tmp_path / "two.gcrec")
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Two(), data)
    assert insight.load(tmp_path / "two.opt0.gcrec").layers == ["a"]
    assert insight.load(tmp_path / "two.opt1.gcrec").layers == ["b"]


def test_hugging_face_records_the_global_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    from test_transformers import _train

    path = tmp_path / "hf.gcrec"
    _train(tmp_path, steps=4, record=path)
    run = insight.load(path)
    assert run.steps.tolist() == [0, 1, 2, 3]
    assert "lm_head" in run.layers or "transformer.wte" in run.layers
    found = _report_json(path, capsys)
    assert found["steps"] == 4 and found["first_nonfinite"] is None
