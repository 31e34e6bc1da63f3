"""The Lightning callback: normalizes unscaled gradients right before the step, logs norms."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import gradclip  # noqa: E402
from gradclip.integrations.lightning import GradientNormalizationCallback  # noqa: E402

MODE, THRESHOLD = "ClipL2PerLayer", 0.05


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradients it is about to apply (after every step pre-hook ran)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        loss = closure() if closure is not None else None
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        super().step()
        return loss


class Tiny(pl.LightningModule):
    def __init__(self, inf_at: int | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.inf_at = inf_at

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.body(x)).float(), y)
        if self.inf_at is not None and batch_idx == self.inf_at:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return RecordingSGD(self.parameters(), lr=1e-3)


class SnapshotGrads(pl.Callback):
    """Placed before gradclip's callback: the gradients gradclip is handed."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
        self.before.append([p.grad.detach().clone() for p in pl_module.parameters()])


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g) * 3
    y = torch.randn(32, 1, generator=g) * 5
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _precision(precision: str) -> dict[str, object]:
    # Trainer(accelerator="cpu", precision="16-mixed") silently falls back to bf16-mixed;
    # the plugin given explicitly really runs fp16 autocast with torch.amp.GradScaler("cpu").
    if precision == "16-mixed":
        from lightning.pytorch.plugins import MixedPrecision

        # The default initial scale (65536) overflows fp16 here and skips every step.
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


def _fit(
    precision: str,
    module: Tiny,
    steps: int = 4,
    extra: tuple[object, ...] = (),
    accumulate: int = 1,
    **kw: object,
):
    snapshot = SnapshotGrads()
    callback = GradientNormalizationCallback(MODE, threshold=THRESHOLD, **kw)  # type: ignore[arg-type]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=[snapshot, callback, *extra],
        **_precision(precision),  # type: ignore[arg-type]
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, _loader())
    return trainer, snapshot, callback


def _expected(module: Tiny, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    twin = copy.deepcopy(module)
    for p, g in zip(twin.parameters(), grads):
        p.grad = g.clone()
    gradclip.normalize_(twin, MODE, THRESHOLD)
    return [p.grad for p in twin.parameters()]


# "16-mixed" runs on the CPU with torch.amp.GradScaler("cpu") and fp16 autocast.
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_gradients_at_step_equal_normalize(precision: str, accumulate: int) -> None:
    # accumulate_grad_batches=2: 4 steps of 2 batches, normalized once per step, summed
    torch.manual_seed(0)
    module = Tiny()
    trainer, snapshot, callback = _fit(precision, module, accumulate=accumulate)
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert (scaler is not None) == (precision == "16-mixed")
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, RecordingSGD)
    assert len(optimizer.seen) == 4 and len(snapshot.before) == 4
    assert trainer.fit_loop.total_batch_idx + 1 == 4 * accumulate
    clipped_any = False
    for before, at_step in zip(snapshot.before, optimizer.seen):
        expected = _expected(module, before)
        for e, a, b in zip(expected, at_step, before):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
            clipped_any |= not torch.equal(a, b)
    assert clipped_any, "the threshold is meant to clip these gradients"
    # The AMP path must hand over unscaled gradients: a scaled (x65536) layer norm would be huge.
    report = callback.last_report
    assert report is not None
    norms = report.to_dict()["layer_norms"]
    assert set(norms) == {"body.0", "body.2", "head"}
    assert all(v is not None and 0.0 < v < 100.0 for v in norms.values())


def test_logs_per_layer_norms() -> None:
    torch.manual_seed(0)
    module = Tiny()
    trainer, snapshot, _callback = _fit("32-true", module, steps=2)
    metrics = trainer.callback_metrics
    assert {"grad_norm/body.0", "grad_norm/body.2", "grad_norm/head"} <= set(metrics)
    # The logged value is the last step's norm measured before normalization.
    last = snapshot.before[-1]
    names = [n for n, _ in module.named_parameters()]
    head_sq = sum(
        float(g.double().pow(2).sum()) for n, g in zip(names, last) if n.startswith("head")
    )
    assert float(metrics["grad_norm/head"]) == pytest.approx(head_sq**0.5, rel=1e-5)


def test_no_logging_when_disabled() -> None:
    torch.manual_seed(0)
    trainer, _, _ = _fit("32-true", Tiny(), steps=2, log_norms=False)
    assert not any(k.startswith("grad_norm/") for k in trainer.callback_metrics)


def test_skipped_amp_step_does_not_run_normalizer() -> None:
    torch.manual_seed(0)
    module = Tiny(inf_at=1)
    reports: list[object] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            reports.append(trainer.callbacks[1].last_report)

    trainer, snapshot, _ = _fit("16-mixed", module, steps=3, extra=(Watch(),))
    optimizer = trainer.optimizers[0]
    # 4 batches in the loader, 3 optimizer steps asked: batch 1 has inf gradients, so the
    # scaler skips its step and the normalizer does not run for it.
    assert len(snapshot.before) == 3
    assert len(optimizer.seen) == 2
    assert reports[0] is not None and reports[1] is reports[0] and reports[2] is not reports[1]


def test_warns_when_lightning_clips_too() -> None:
    callback = GradientNormalizationCallback(MODE, threshold=THRESHOLD)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        gradient_clip_val=1.0,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="gradient_clip_val"):
        trainer.fit(Tiny(), _loader())


def test_bad_configuration_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="threshold"):
        GradientNormalizationCallback(MODE, threshold=-1.0)
    with pytest.raises(ValueError, match="unknown gradient normalization mode"):
        GradientNormalizationCallback("ClipL3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradientNormalizationCallback(None)
