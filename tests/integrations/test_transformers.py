"""The Hugging Face Trainer callback on a 2-layer GPT-2 built from a config (nothing downloaded)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradclip  # noqa: E402
from gradclip.integrations.transformers import GradientNormalizationCallback  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODE, THRESHOLD = "ClipL2PerLayer", 0.05


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradients it is about to apply (after every step pre-hook ran)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen: list[list[torch.Tensor]] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        self.seen.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


class Snapshot(transformers.TrainerCallback):
    """Placed before gradclip's callback: the gradients gradclip is handed."""

    def __init__(self) -> None:
        self.before: list[list[torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.before.append([p.grad.detach().clone() for p in model.parameters()])


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int = 16, length: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, n_inner=64
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _train(tmp_path, steps: int = 3, max_grad_norm: float = 0.0, **kw: object):  # type: ignore[no-untyped-def]
    record = kw.pop("record", None)  # the callback's, not the Trainer's
    model = _model()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        **kw,  # type: ignore[arg-type]
    )
    optimizer = RecordingSGD(model.parameters(), lr=1e-2)
    snapshot = Snapshot()
    callback = GradientNormalizationCallback(MODE, THRESHOLD, record=record)  # type: ignore[arg-type]
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        callbacks=[snapshot, callback],
        optimizers=(optimizer, None),
    )
    trainer.train()
    return trainer, model, optimizer, snapshot, callback


@pytest.mark.parametrize("accumulation", [1, 2])
def test_gradients_at_step_equal_normalize(tmp_path, accumulation: int) -> None:  # type: ignore[no-untyped-def]
    # gradient_accumulation_steps=2: normalized once per optimizer step, on the sum
    _trainer, model, optimizer, snapshot, callback = _train(
        tmp_path, gradient_accumulation_steps=accumulation
    )
    assert len(optimizer.seen) == 3 and len(snapshot.before) == 3
    clipped_any = False
    for before, at_step in zip(snapshot.before, optimizer.seen):
        twin = copy.deepcopy(model)
        for p, g in zip(twin.parameters(), before):
            p.grad = g.clone()
        gradclip.normalize_(twin, MODE, THRESHOLD)
        for p, a, b in zip(twin.parameters(), at_step, before):
            torch.testing.assert_close(a, p.grad, rtol=0, atol=0)
            clipped_any |= not torch.equal(a, b)
    assert clipped_any
    # Tied embeddings (wte / lm_head) are one layer, normalized once.
    assert callback.normalizer is not None
    names = [layer.name for layer in callback.normalizer.layers]
    assert "transformer.wte" in names and "lm_head" not in names


def test_norms_in_log_history(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trainer, model, _, snapshot, _callback = _train(tmp_path, steps=2)
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 2
    for entry, before in zip(train_logs, snapshot.before):
        key = "grad_norm/transformer.h.0.attn.c_attn"
        assert key in entry
        params = dict(zip([n for n, _ in model.named_parameters()], before))
        expected = torch.cat(
            [params[f"transformer.h.0.attn.c_attn.{p}"].flatten() for p in ("weight", "bias")]
        ).norm()
        assert entry[key] == pytest.approx(float(expected), rel=1e-5)


def test_norms_logged_at_each_epoch_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # logging_strategy="epoch": the Trainer decides to log after the step has ended
    trainer, model, _, snapshot, _callback = _train(
        tmp_path, steps=-1, num_train_epochs=2, logging_strategy="epoch"
    )
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [4, 8]  # 16 samples, 4 per step
    for entry in train_logs:
        params = dict(
            zip([n for n, _ in model.named_parameters()], snapshot.before[entry["step"] - 1])
        )
        expected = params["transformer.wpe.weight"].norm()
        assert entry["grad_norm/transformer.wpe"] == pytest.approx(float(expected), rel=1e-5)


def test_warns_when_trainer_clips_too(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.warns(UserWarning, match="max_grad_norm"):
        _train(tmp_path, steps=1, max_grad_norm=1.0)


def test_bf16_autocast(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _trainer, model, optimizer, snapshot, _ = _train(tmp_path, steps=2, bf16=True)
    assert len(optimizer.seen) == 2
    for before, at_step in zip(snapshot.before, optimizer.seen):
        twin = copy.deepcopy(model)
        for p, g in zip(twin.parameters(), before):
            p.grad = g.clone()
        gradclip.normalize_(twin, MODE, THRESHOLD)
        for p, a in zip(twin.parameters(), at_step):
            torch.testing.assert_close(a, p.grad, rtol=0, atol=0)
