"""The demo's two tasks: the data, the model, and what "learned" means.

**The adding problem** (`adding`, Hochreiter & Schmidhuber 1997). Each input is
a sequence of `(value, marker)` pairs with values drawn from `U(0, 1)`; exactly
two positions carry the marker 1 (one in each half of the sequence), and the
target is the sum of the two marked values. A network that ignores its input
can do no better than predicting the mean, `E[a + b] = 1`, which scores the
variance of the target, `Var(a + b) = 2 · Var(U(0, 1)) = 1/6 ≈ 0.1667`. The
model is a tanh `nn.RNN` and a linear head on its last hidden state; its
recurrent matrix starts orthogonal and scaled by `init_scale` (1.5), so a
gradient sent back through `T` steps can grow like `1.5^T` — the exploding
gradient problem of Bengio et al. (1994) and Pascanu et al. (2013).

**Mixed-scale regression** (`scales`). Eight standard normal variables `z`;
the target is `sin(z0) + z1·z4 + tanh(z5 − z2) + 0.5·z6·z3`. The network sees
`x = z · s` where the last four features are in units `large_scale` (30) times
larger than the first four (`s = (1, 1, 1, 1, 30, 30, 30, 30)`), as raw data in
mixed units are. The model is a tanh MLP `8 → 64 → 64 → 1` whose first layer is
initialised for those units (the weights of the large features divided by 30,
so the network starts unsaturated). The first layer's weight gradient is
`δ · xᵀ`: its columns for the large features are 30 times larger than they
would be for standardised data, so that one layer carries most of the global
gradient norm while the other layers' gradients are of order 1. A single global
clip then scales every layer by the first layer's norm. The baseline is the
held-out variance of the target (predicting its mean, 0).

References:
    Hochreiter and Schmidhuber, "Long short-term memory", Neural Computation 1997
    (the adding problem).
    Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
    networks", ICML 2013 (norm clipping).
    LeCun, Bottou, Orr and Müller, "Efficient BackProp", 1998 (inputs of
    different scales and the conditioning of the first layer).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

__all__ = [
    "TASKS",
    "AddingRNN",
    "MixedScaleMLP",
    "Task",
    "TaskSettings",
    "adding_problem_batch",
    "baseline_mse",
    "feature_scales",
    "mixed_scale_batch",
]


def adding_problem_batch(
    batch: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the adding problem.

    Args:
        batch: number of sequences.
        seq_len: sequence length `T` (at least 2).
        generator: the random source (the same seed gives the same batches).

    Returns:
        `(x, y)`: `x` of shape `(batch, T, 2)` holding `(value, marker)` pairs,
        `y` of shape `(batch, 1)`, the sum of the two marked values.

    Raises:
        ValueError: `seq_len` below 2.

    Examples:
        >>> x, y = adding_problem_batch(4, 6, torch.Generator().manual_seed(0))
        >>> x.shape, y.shape
        (torch.Size([4, 6, 2]), torch.Size([4, 1]))
        >>> x[..., 1].sum(dim=1).tolist()  # two markers per sequence
        [2.0, 2.0, 2.0, 2.0]
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    values = torch.rand(batch, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (batch, 1), generator=generator)
    second = torch.randint(half, seq_len, (batch, 1), generator=generator)
    markers = torch.zeros(batch, seq_len)
    markers.scatter_(1, first, 1.0)
    markers.scatter_(1, second, 1.0)
    x = torch.stack([values, markers], dim=-1)
    y = (values * markers).sum(dim=1, keepdim=True)
    return x, y


def feature_scales(large_scale: float, features: int = 8) -> torch.Tensor:
    """`(1, ..., 1, large_scale, ..., large_scale)`: the second half of the features is large."""
    if features < 8:
        raise ValueError(f"the mixed-scale task needs at least 8 features, got {features}")
    scales = torch.ones(features)
    scales[features // 2 :] = large_scale
    return scales


def mixed_scale_batch(
    batch: int, large_scale: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of the mixed-scale regression.

    Args:
        batch: number of samples.
        large_scale: how much larger the units of features 4-7 are.
        generator: the random source.

    Returns:
        `(x, y)`: `x` of shape `(batch, 8)`, the features in their units, and
        `y` of shape `(batch, 1)`, a function of the standardised features.

    Examples:
        >>> x, y = mixed_scale_batch(10_000, 30.0, torch.Generator().manual_seed(0))
        >>> [round(s) for s in x.std(dim=0).tolist()]
        [1, 1, 1, 1, 30, 30, 30, 30]
    """
    z = torch.randn(batch, 8, generator=generator)
    x = z * feature_scales(large_scale)
    y = (
        torch.sin(z[:, 0])
        + z[:, 1] * z[:, 4]
        + torch.tanh(z[:, 5] - z[:, 2])
        + 0.5 * z[:, 6] * z[:, 3]
    ).unsqueeze(1)
    return x, y


def baseline_mse(y: torch.Tensor, prediction: float) -> float:
    """MSE of the constant `prediction` on the targets `y`."""
    return float(((y - prediction) ** 2).mean())


class AddingRNN(nn.Module):
    """A one-layer tanh RNN and a linear read-out of its last hidden state.

    Layers `rnn` and `head`.
    """

    def __init__(self, hidden: int, init_scale: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden, 1)
        recurrent = self.rnn.get_parameter("weight_hh_l0")
        with torch.no_grad():
            nn.init.orthogonal_(recurrent)
            recurrent.mul_(init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        y: torch.Tensor = self.head(out[:, -1])
        return y


class MixedScaleMLP(nn.Module):
    """A tanh MLP whose first layer is initialised for inputs in mixed units.

    Layers `input`, `hidden`, `head`. PyTorch's default initialisation of the
    first layer is divided, column by column, by the scale of its feature.
    """

    def __init__(self, hidden: int, large_scale: float) -> None:
        super().__init__()
        self.input = nn.Linear(8, hidden)
        self.hidden = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)
        with torch.no_grad():
            self.input.weight.div_(feature_scales(large_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.input(x))
        h = torch.tanh(self.hidden(h))
        y: torch.Tensor = self.head(h)
        return y


class TaskSettings(Protocol):
    """What `Task.batch`, `Task.model` and `Task.describe` read (`DemoConfig` has all of it)."""

    seq_len: int
    hidden: int
    init_scale: float
    large_scale: float


class Task:
    """One of the demo's tasks: its batches, its model and how a run is judged.

    Attributes:
        key: `"adding"` or `"scales"` (`--task`).
        title: the name tables and plots use.
        learned_fraction: a run *learned* if its held-out MSE is under this
            fraction of the baseline.
    """

    key: str
    title: str
    learned_fraction: float

    def __init__(self, key: str, title: str, learned_fraction: float) -> None:
        self.key = key
        self.title = title
        self.learned_fraction = learned_fraction

    def batch(
        self, size: int, settings: TaskSettings, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` samples `(x, y)` drawn with `generator`."""
        if self.key == "adding":
            return adding_problem_batch(size, settings.seq_len, generator)
        return mixed_scale_batch(size, settings.large_scale, generator)

    def model(self, settings: TaskSettings) -> nn.Module:
        """A freshly initialised model (seed torch's RNG first)."""
        if self.key == "adding":
            return AddingRNN(settings.hidden, settings.init_scale)
        return MixedScaleMLP(settings.hidden, settings.large_scale)

    def baseline(self, y: torch.Tensor) -> float:
        """The held-out MSE of predicting the target's mean (1 for adding, 0 for scales)."""
        return baseline_mse(y, 1.0 if self.key == "adding" else 0.0)

    def describe(self, settings: TaskSettings) -> str:
        """One line: the task and its model."""
        if self.key == "adding":
            return (
                f"adding problem, T={settings.seq_len}, tanh RNN hidden={settings.hidden}, "
                f"recurrent init {settings.init_scale} x orthogonal"
            )
        return (
            f"mixed-scale regression, features 4-7 in units {settings.large_scale:g}x larger, "
            f"tanh MLP 8-{settings.hidden}-{settings.hidden}-1"
        )

    def __repr__(self) -> str:
        return f"Task({self.key!r})"


#: The tasks by `--task` key, in the order the demo runs them.
TASKS: dict[str, Task] = {
    "adding": Task("adding", "adding problem", learned_fraction=0.5),
    "scales": Task("scales", "mixed-scale regression", learned_fraction=0.25),
}
