"""One normalizer per optimizer: each optimizer's step normalizes its own parameters.

A module trained with several optimizers (a GAN's generator and discriminator)
steps each on its own; a normalizer over the whole module would measure, clip
and learn from the other network's gradients as well. So every optimizer gets
a `GradientNormalizer` over the layers of the module restricted to that
optimizer's parameters — the module's own layer names, the overrides that name
any of those layers, and a rule state of its own. The parameters are the
optimizer's, as given: a parameter it holds is normalized whenever it has a
gradient (as the optimizer will apply that gradient), like Lightning's own
``clip_gradients(optimizer, ...)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradclip.core.layers import Layer, build_layers, match_overrides, resolve_override_keys
from gradclip.core.record import recording_path
from gradclip.core.report import NormReport
from gradclip.integrations._common import StepApplier, inner_optimizer, restore
from gradclip.integrations._state import pack, unpack
from gradclip.normalizer import GradientNormalizer, Mode

__all__ = ["PerOptimizer"]


def _groups(optimizer: torch.optim.Optimizer) -> tuple[tuple[int, int], ...]:
    """A cheap fingerprint of the parameter groups, to notice ``add_param_group``."""
    return tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups)


def _param_ids(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    return tuple(id(p) for g in optimizer.param_groups for p in g["params"])


@dataclass(eq=False)
class _Entry:
    optimizer: torch.optim.Optimizer
    params: tuple[int, ...]
    groups: tuple[tuple[int, int], ...]
    layer_names: tuple[str, ...]
    normalizer: GradientNormalizer
    applier: StepApplier


class PerOptimizer:
    """The normalizers of a module's optimizers, in the trainer's optimizer order.

    Args:
        mode, threshold: the default rule, as for `GradientNormalizer`.
        on_report: called with every report (the callback's ``last_report``).
    """

    def __init__(
        self,
        mode: Mode,
        threshold: float,
        on_report: Callable[[NormReport], None],
        recording: Mapping[str, Any] | None = None,
    ) -> None:
        self.recording = dict(recording or {})
        self._built = 0  # normalizers built: a rebuilt one records to a file of its own
        self.mode = mode
        self.threshold = threshold
        self._on_report = on_report
        self.model: nn.Module | None = None
        self._layers: list[Layer] = []
        self._overrides: dict[str, Any] = {}
        self.entries: list[_Entry] = []
        self.pending: list[dict[str, Any]] | None = None

    # -- building -----------------------------------------------------------------------------
    def bind(
        self, model: nn.Module, overrides: Mapping[str, Any], process_group: Any = None
    ) -> None:
        """Take ``model``'s layers and check ``overrides`` against them (all optimizers' layers).

        A different model than before drops the normalizers (and their state).
        ``process_group``: the ranks holding replicas of ``model`` (a DDP
        strategy's), whose configurations the normalizers compare.

        Raises:
            KeyError: an override key names no layer of the model.
        """
        resolved = resolve_override_keys(model, overrides)
        if model is not self.model:
            self.cancel()
            self.entries = []
        self.model = model
        self.process_group = process_group
        self._layers = build_layers(model)
        self._overrides = resolved

    def sync(self, optimizers: Sequence[Any]) -> None:
        """Make one normalizer per optimizer; keep those whose parameters did not change."""
        entries = []
        for i, optimizer in enumerate(optimizers):
            inner = inner_optimizer(optimizer)
            if inner is None:
                raise TypeError(
                    f"optimizer {i} is a {type(optimizer).__name__}, not a torch.optim.Optimizer "
                    "(or a wrapper of one); gradclip normalizes the parameters of an optimizer"
                )
            old = self.entries[i] if i < len(self.entries) else None
            entries.append(self._entry(inner, old, i, len(optimizers)))
        self.entries = entries
        if self.pending is not None:
            states, self.pending = self.pending, None
            self._install(states)

    def _target(self, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
        """``{layer: {param: tensor}}``: the module's layers, restricted to the optimizer's."""
        ids = set(_param_ids(optimizer))
        target: dict[str, dict[str, torch.Tensor]] = {}
        for layer in self._layers:
            named = {n: p for n, p in zip(layer.param_names, layer.params) if id(p) in ids}
            if named:
                target[layer.name] = named
        covered = {id(p) for named in target.values() for p in named.values()}
        if len(ids - covered):
            warnings.warn(
                f"{len(ids - covered)} parameters of an optimizer are not parameters of the "
                f"{type(self.model).__name__}; gradclip does not normalize them",
                UserWarning,
                stacklevel=4,
            )
        return target

    def _entry(
        self, optimizer: torch.optim.Optimizer, old: _Entry | None, index: int, count: int
    ) -> _Entry:
        params = _param_ids(optimizer)
        target = self._target(optimizer)
        names = tuple(target)
        if old is not None and old.params == params and old.layer_names == names:
            old.optimizer, old.groups = optimizer, _groups(optimizer)
            return old
        overrides = {
            key: value for key, value in self._overrides.items() if _names_any(key, list(names))
        }
        normalizer = GradientNormalizer(
            target,
            self.mode,
            self.threshold,
            overrides,
            process_group=self.process_group,
            **self._recording(index, count),
        )
        if old is not None:
            old.applier.cancel()
            old.normalizer.close()
            # the rows whose rule and layers are unchanged keep their state; new ones start
            # fresh, as when a normalizer's model changes (gradclip.core.identity)
            normalizer.load_state_dict(old.normalizer.state_dict(), strict=False)
        applier = StepApplier(normalizer, self._on_report)
        return _Entry(optimizer, params, _groups(optimizer), names, normalizer, applier)

    # -- stepping -----------------------------------------------------------------------------
    def applier(self, optimizer: Any) -> StepApplier:
        """The applier of ``optimizer``, rebuilt if a parameter group was added to it."""
        inner = inner_optimizer(optimizer)
        for i, entry in enumerate(self.entries):
            if entry.optimizer is inner:
                if _groups(entry.optimizer) != entry.groups:
                    entry = self.entries[i] = self._entry(
                        entry.optimizer, entry, i, len(self.entries)
                    )
                return entry.applier
        if inner is None or self.model is None:
            raise RuntimeError(
                "gradclip's callback was handed an optimizer before it was set up for fitting"
            )
        count = len(self.entries) + 1
        entry = self._entry(inner, None, len(self.entries), count)  # one the trainer did not list
        self.entries.append(entry)
        return entry.applier

    def reports(self) -> list[tuple[int, NormReport]]:
        """The reports of the steps taken since the last call, by optimizer index."""
        out = []
        for i, entry in enumerate(self.entries):
            report = entry.applier.take_report()
            if report is not None:
                out.append((i, report))
        return out

    def shared_layers(self) -> set[str]:
        """Layers some of whose parameters belong to one optimizer and some to another."""
        seen: set[str] = set()
        shared: set[str] = set()
        for entry in self.entries:
            shared |= seen & set(entry.layer_names)
            seen |= set(entry.layer_names)
        return shared

    def cancel(self) -> None:
        for entry in self.entries:
            entry.applier.cancel()

    def finish(self) -> None:
        """After the optimizers stepped: record the steps a scaler skipped."""
        for entry in self.entries:
            entry.applier.finish()

    def flush(self) -> None:
        """Write the recordings' steps to their files."""
        for entry in self.entries:
            entry.normalizer.flush()

    def _recording(self, index: int, count: int) -> dict[str, Any]:
        """The recording arguments of optimizer ``index``'s normalizer: with several
        optimizers, one file each (``name.opt<i>.ext``); a rebuilt one, a file of its own."""
        options = dict(self.recording)
        if options.get("record") is None:
            return {}
        self._built += 1
        part = f"opt{index}" if count > 1 else ""
        if self._built > count:  # rebuilt (a parameter group added): a new file
            part = f"{part}.{self._built - 1}" if part else str(self._built - 1)
        options["record"] = recording_path(options["record"], part)
        return options

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.entries:
            return pack([entry.normalizer.state_dict() for entry in self.entries])
        return pack(self.pending) if self.pending is not None else {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        states = unpack(state_dict)
        if self.entries:
            self._install(states)
        else:
            self.pending = states

    def _install(self, states: list[dict[str, Any]]) -> None:
        if len(states) != len(self.entries):
            raise ValueError(
                f"the state holds {len(states)} normalizers' state, one per optimizer, but the "
                f"module has {len(self.entries)} optimizers"
            )
        before = [entry.normalizer.state_dict() for entry in self.entries]
        try:
            for i, (entry, state) in enumerate(zip(self.entries, states)):
                try:
                    restore(entry.normalizer, state, f"optimizer {i}")
                except ValueError as error:
                    raise ValueError(f"optimizer {i}: {error}") from error
        except ValueError:
            for entry, state in zip(self.entries, before):
                entry.normalizer.load_state_dict(state)
            raise

    def has_state(self) -> bool:
        """Whether any normalizer keeps state between steps (an adaptive rule)."""
        return any(entry.normalizer.state_dict()["rules"] for entry in self.entries)


def _names_any(key: str, names: list[str]) -> bool:
    try:
        match_overrides(names, {key: None})
    except KeyError:
        return False
    return True
