"""Training runs for the resume tests, each phase in a process of its own.

    python resume_runs.py {lightning,transformers} full   WORKDIR RULE...
    python resume_runs.py {lightning,transformers} resume WORKDIR RULE... [--strip RULE...]

``full`` trains 16 optimizer steps without stopping, leaving the checkpoint of
step 8 and the final parameters and gradclip state in ``WORKDIR/<trainer>-<RULE>/``;
``resume`` starts from that step-8 checkpoint and trains to step 16, leaving
``resumed.pt`` there, and for the rules after ``--strip`` also ``stripped.pt``:
resumed from the checkpoint without gradclip's state. Everything runs on the CPU.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from typing import Any

import torch
from torch import nn

import gradclip

STEPS, SAVE_AT = 16, 8
torch.set_num_threads(1)  # tiny models: threads only contend
RULES: dict[str, Any] = {
    "zclip-global": gradclip.ZClip(warmup_steps=3, z_thresh=0.5),
    "zclip-layer": gradclip.ZClip(warmup_steps=3, z_thresh=0.5, scope="layer"),
    "autoclip-global": gradclip.AutoClip(percentile=10.0),
    "autoclip-layer": gradclip.AutoClip(percentile=10.0, scope="layer"),
    "stateless": gradclip.ClipL2PerLayer(0.05),
}


def _save_result(directory: str, name: str, model: nn.Module, callback: Any) -> None:
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"params": params, "state": callback.state_dict()}, os.path.join(directory, name))


# -- Lightning ---------------------------------------------------------------------------------
def _lightning(directory: str, rule: Any, resume: str | None, result: str) -> None:
    import lightning.pytorch as pl

    from gradclip.integrations.lightning import GradientNormalizationCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
            self.head = nn.Linear(16, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.head(self.body(x)), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    module = Net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=g) * 3
    y = torch.randn(32, 1, generator=g) * 5
    y[8:16] *= 20  # a spike in every epoch
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    callback = GradientNormalizationCallback(rule)
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=directory, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=STEPS // len(data),
        callbacks=[callback, checkpoints],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data, ckpt_path=resume)
    _save_result(directory, result, module, callback)


def _lightning_checkpoint(directory: str, strip: bool) -> str:
    path = os.path.join(directory, f"epoch={SAVE_AT // 4 - 1}-step={SAVE_AT}.ckpt")
    if not strip:
        return path
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["callbacks"] = {
        k: v for k, v in checkpoint["callbacks"].items() if "GradientNormalization" not in k
    }
    stripped = os.path.join(directory, "stripped.ckpt")
    torch.save(checkpoint, stripped)
    return stripped


# -- Hugging Face ------------------------------------------------------------------------------
class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (16, 12), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _transformers(directory: str, rule: Any, resume: str | None, result: str) -> None:
    import transformers

    from gradclip.integrations.transformers import GradientNormalizationCallback

    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, n_inner=64
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=directory,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_grad_norm=0.0,
        save_strategy="steps",
        save_steps=SAVE_AT,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    callback = GradientNormalizationCallback(rule)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), callbacks=[callback]
    )
    trainer.train(resume_from_checkpoint=resume)
    _save_result(directory, result, model, callback)


def _transformers_checkpoint(directory: str, strip: bool) -> str:
    """A new run directory holding only the step-8 checkpoint (without gradclip's file)."""
    resumed = os.path.join(directory, "stripped" if strip else "resumed")
    shutil.rmtree(resumed, ignore_errors=True)
    ignore = shutil.ignore_patterns("gradclip_state.pt") if strip else None
    checkpoint = os.path.join(resumed, f"checkpoint-{SAVE_AT}")
    shutil.copytree(os.path.join(directory, f"checkpoint-{SAVE_AT}"), checkpoint, ignore=ignore)
    return checkpoint


def main(argv: list[str]) -> None:
    trainer, phase, workdir, *names = argv
    rules = names[: names.index("--strip")] if "--strip" in names else names
    strip = names[len(rules) + 1 :]
    run = {"lightning": _lightning, "transformers": _transformers}[trainer]
    find = {"lightning": _lightning_checkpoint, "transformers": _transformers_checkpoint}[trainer]
    for name, stripped in [(r, False) for r in rules] + [(r, True) for r in strip]:
        directory = os.path.join(workdir, f"{trainer}-{name}")
        if phase == "full":
            os.makedirs(directory, exist_ok=True)
            run(directory, RULES[name], None, "full.pt")
            continue
        checkpoint = find(directory, stripped)
        result = "stripped.pt" if stripped else "resumed.pt"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(os.path.dirname(checkpoint), RULES[name], checkpoint, result)
        for warning in caught:
            if "gradclip" in str(warning.message):
                print(
                    f"WARNING {trainer}-{name}{'-stripped' if stripped else ''}: {warning.message}"
                )
        if os.path.dirname(checkpoint) != directory:
            shutil.copy(os.path.join(os.path.dirname(checkpoint), result), directory)


if __name__ == "__main__":
    main(sys.argv[1:])
