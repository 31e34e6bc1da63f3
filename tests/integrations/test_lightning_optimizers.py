"""Several optimizers in Lightning: each step normalizes its own parameters, with its own state."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import gradclip  # noqa: E402
from gradclip.integrations.lightning import GradientNormalizationCallback  # noqa: E402

BATCHES = 4
ZCLIP = gradclip.ZClip(warmup_steps=2, z_thresh=0.5)


class GAN(pl.LightningModule):
    """A generator and a discriminator, trained by hand (manual optimization)."""

    def __init__(self, toggle: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
        self.toggle = toggle

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real, z = batch
        g_opt, d_opt = self.optimizers()
        if self.toggle:
            self.toggle_optimizer(g_opt)
        g_loss = nn.functional.softplus(-self.discriminator(self.generator(z))).mean()
        self.manual_backward(g_loss)
        g_opt.step()
        g_opt.zero_grad()
        if self.toggle:
            self.untoggle_optimizer(g_opt)
            self.toggle_optimizer(d_opt)
        fake = self.generator(z).detach()
        d_loss = (
            nn.functional.softplus(-self.discriminator(real)).mean()
            + nn.functional.softplus(self.discriminator(fake)).mean()
        )
        self.manual_backward(d_loss)
        d_opt.step()
        d_opt.zero_grad()
        if self.toggle:
            self.untoggle_optimizer(d_opt)

    def configure_optimizers(self) -> Any:
        return (
            torch.optim.SGD(self.generator.parameters(), lr=0.1),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.1),
        )


def _data() -> torch.utils.data.DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(8 * BATCHES, 6, generator=g) * 4 + 3
    z = torch.randn(8 * BATCHES, 4, generator=g)
    real[8:16] *= 30  # a spike for the adaptive rules
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(real, z), batch_size=8)


def _fit(module: pl.LightningModule, callback: GradientNormalizationCallback, **kw: Any) -> Any:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )
    trainer.fit(module, _data())
    return trainer


def _reference(module: GAN, normalize_g: Any, normalize_d: Any) -> None:
    """The GAN's loop written out in PyTorch, with a normalization before each step."""
    g_opt = torch.optim.SGD(module.generator.parameters(), lr=0.1)
    d_opt = torch.optim.SGD(module.discriminator.parameters(), lr=0.1)
    for real, z in _data():
        if module.toggle:
            module.discriminator.requires_grad_(False)
        nn.functional.softplus(-module.discriminator(module.generator(z))).mean().backward()
        normalize_g()
        g_opt.step()
        g_opt.zero_grad()
        if module.toggle:
            module.discriminator.requires_grad_(True)
            module.generator.requires_grad_(False)
        fake = module.generator(z).detach()
        d_loss = (
            nn.functional.softplus(-module.discriminator(real)).mean()
            + nn.functional.softplus(module.discriminator(fake)).mean()
        )
        d_loss.backward()
        normalize_d()
        d_opt.step()
        d_opt.zero_grad()
        if module.toggle:
            module.generator.requires_grad_(True)


@pytest.mark.parametrize("toggle", [False, True])
def test_global_clip_measures_only_the_stepping_optimizers_parameters(toggle: bool) -> None:
    torch.manual_seed(0)
    module = GAN(toggle)
    twin = copy.deepcopy(module)
    measured: dict[str, list[float]] = {"g": [], "d": []}

    def clip(network: nn.Module, key: str) -> Any:
        def run() -> None:
            total = torch.nn.utils.clip_grad_norm_(network.parameters(), 0.05)
            measured[key].append(float(total))

        return run

    _reference(twin, clip(twin.generator, "g"), clip(twin.discriminator, "d"))
    callback = GradientNormalizationCallback(gradclip.ClipGlobalNorm(0.05))
    _fit(module, callback)

    for (name, a), b in zip(module.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    generator, discriminator = callback.normalizers
    assert [layer.name for layer in generator.layers] == ["generator.0", "generator.2"]
    assert [layer.name for layer in discriminator.layers] == ["discriminator.0", "discriminator.2"]
    assert all(n > 0.05 for n in measured["g"]), "the threshold is meant to clip every step"
    last = generator.last_report
    assert last is not None
    total = float(last.layer_norm_vector.double().norm())  # the generator's gradients only
    assert total == pytest.approx(measured["g"][-1], rel=1e-5)


@pytest.mark.parametrize("toggle", [False, True])
def test_each_optimizer_has_its_own_rule_state(toggle: bool) -> None:
    torch.manual_seed(0)
    module = GAN(toggle)
    twin = copy.deepcopy(module)
    g_norm = gradclip.GradientNormalizer(twin.generator, ZCLIP)
    d_norm = gradclip.GradientNormalizer(twin.discriminator, ZCLIP)
    _reference(twin, g_norm.apply, d_norm.apply)
    callback = GradientNormalizationCallback(ZCLIP)
    _fit(module, callback)

    clipped = [r.changed_layers() for r in (g_norm.last_report, d_norm.last_report) if r]
    assert clipped, "the reference is meant to clip"
    for (name, a), b in zip(module.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for normalizer, reference in zip(callback.normalizers, (g_norm, d_norm)):
        ((_, slot),) = normalizer.state_dict()["rules"].items()
        ((_, expected),) = reference.state_dict()["rules"].items()
        assert int(slot["rows"]["*"]["count"]) == BATCHES  # one rule step per batch
        for key, value in expected["rows"]["*"].items():
            torch.testing.assert_close(slot["rows"]["*"][key], value, rtol=1e-6, atol=0)


def test_overrides_name_layers_of_either_optimizer_and_norms_are_logged() -> None:
    torch.manual_seed(0)
    callback = GradientNormalizationCallback(
        "ClipL2PerLayer",
        1.0,
        overrides={"generator.2": "None", "discriminator.0": ("ClipL2PerLayer", 0.01)},
    )
    trainer = _fit(GAN(toggle=True), callback)
    generator, discriminator = callback.normalizers
    assert [r.describe() for r in generator.rules.values()] == [
        "ClipL2PerLayer(threshold=1.0)",
        "None()",
    ]
    assert [r.describe() for r in discriminator.rules.values()] == [
        "ClipL2PerLayer(threshold=0.01)",
        "ClipL2PerLayer(threshold=1.0)",
    ]
    logged = {k for k in trainer.callback_metrics if k.startswith("grad_norm/")}
    assert {"grad_norm/generator.0", "grad_norm/discriminator.0"} <= logged
    with pytest.raises(RuntimeError, match="normalizers"):
        _ = callback.normalizer


def test_override_key_of_no_layer_fails_before_the_first_step() -> None:
    callback = GradientNormalizationCallback("ClipL2PerLayer", overrides={"generater.2": "None"})
    module = GAN(toggle=False)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(KeyError, match=r"closest layer is 'generator\.2'"):
        _fit(module, callback)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


class Unfreezing(pl.Callback):
    """Adds the body to the optimizer after two steps, as ``BaseFinetuning`` does."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if idx == 2:
            pl_module.body.requires_grad_(True)
            trainer.optimizers[0].add_param_group({"params": list(pl_module.body.parameters())})


class Finetuned(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.body.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        real, _z = batch
        return self.head(self.body(real)).pow(2).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.head.parameters(), lr=0.01)


def test_parameter_group_added_mid_run_is_normalized_and_state_kept() -> None:
    torch.manual_seed(0)
    callback = GradientNormalizationCallback(gradclip.ZClip(warmup_steps=2, scope="layer"))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[Unfreezing(), callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Finetuned(), _data())
    normalizer = callback.normalizer
    assert normalizer is not None
    assert [layer.name for layer in normalizer.layers] == ["body.0", "head"]
    ((_, slot),) = normalizer.state_dict()["rules"].items()
    assert int(slot["rows"]["head"]["count"]) == BATCHES  # kept across the rebuild
    assert int(slot["rows"]["body.0"]["count"]) == BATCHES - 2


def test_logged_norm_names_of_a_layer_split_between_optimizers() -> None:
    class Split(Finetuned):
        def configure_optimizers(self) -> Any:
            head = self.head
            return torch.optim.SGD([head.weight], lr=0.01), torch.optim.SGD([head.bias], lr=0.01)

        def training_step(self, batch: Any, batch_idx: int) -> None:
            real, _z = batch
            for opt in self.optimizers():
                self.manual_backward(self.head(self.body(real)).pow(2).mean())
                opt.step()
                opt.zero_grad()

    module = Split()
    module.automatic_optimization = False
    callback = GradientNormalizationCallback("ClipL2PerLayer")
    trainer = _fit(module, callback)
    logged = {k for k in trainer.callback_metrics if k.startswith("grad_norm/")}
    assert logged == {"grad_norm/head/optimizer_0", "grad_norm/head/optimizer_1"}
    weight, bias = (n.layers[0] for n in callback.normalizers)
    assert (weight.param_names, bias.param_names) == (("weight",), ("bias",))
    assert all(math.isfinite(float(v)) for k, v in trainer.callback_metrics.items() if k in logged)
