"""Pipeline stages, the model side: this rank's layers, overrides and state identity.

With pipeline parallelism each rank holds one or several stage modules, each a
copy of the whole model with the other stages' modules deleted, its layers
under their global names. Here: their layers together (`stage_layers`), the
overrides that name this rank's layers (`present_overrides`), and the identity
a stage's state dict records, keyed by layer name so that a distributed
checkpoint keeps each stage's own entries (`stage_identity`). The step's
collective across stages is in `gradclip.core.pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradclip.core.layers import Layer, build_layers, match_overrides, resolve_override_keys
from gradclip.core.pipeline import Pipeline, pipeline_of, spanning_slots
from gradclip.core.rule import Rule

__all__ = [
    "check_stage_identity",
    "check_stages",
    "configure_layers",
    "present_overrides",
    "setup_stages",
    "stage_identity",
    "stage_layers",
]


def stage_layers(chunks: Sequence[Any]) -> list[Layer]:
    """The layers of this rank's stage modules, in order, under their global names.

    Raises:
        TypeError: a chunk is not an ``nn.Module``.
        ValueError: two chunks hold a layer of the same name (the same layer
            twice, or stages that renamed their layers).
    """
    from torch import nn

    layers: list[Layer] = []
    seen: set[str] = set()
    for chunk in chunks:
        if not isinstance(chunk, nn.Module):
            raise TypeError(f"stages= takes the stage modules, got a {type(chunk).__name__}")
        for layer in build_layers(chunk):
            if layer.name in seen:
                raise ValueError(
                    f"two of the stages hold a layer named {layer.name!r}: every stage must "
                    "keep its layers under their names in the whole model (as torchtitan's "
                    "pipeline splitting does)"
                )
            seen.add(layer.name)
            layers.append(layer)
    return layers


def present_overrides(
    chunks: Sequence[Any], names: list[str], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """The overrides that name a layer this rank holds (the others are other stages'),
    with tied modules' names resolved in each chunk."""
    kept: dict[str, Any] = {}
    for key, value in overrides.items():
        for chunk in chunks:
            try:
                kept.update(resolve_override_keys(chunk, {key: value}))
                break
            except KeyError:
                continue
    out: dict[str, Any] = {}
    for key, value in kept.items():
        try:
            match_overrides(names, {key: value})
        except KeyError:
            continue
        out[key] = value
    return out


def check_stages(model: Any, stages: Sequence[Any] | None) -> list[Any] | None:
    """The stage modules of ``stages=``, checked (``None`` without).

    Raises:
        ValueError: both a model and ``stages`` given. TypeError: not modules.
    """
    from torch import nn

    if stages is None:
        return None
    if model is not None:
        raise ValueError(
            "pass the stage modules either as the model (one stage) or as stages= (several), "
            "not both: GradientNormalizer(None, mode, stages=[chunk0, chunk1], pp_mesh=...)"
        )
    chunks = list(stages)
    if not chunks or not all(isinstance(c, nn.Module) for c in chunks):
        raise TypeError("stages= takes a non-empty list of the nn.Module stages this rank holds")
    return chunks


def stage_identity(layers: Sequence[Layer], rules: Sequence[Rule]) -> dict[str, Any]:
    """What a stage's state dict records of its layers, keyed by layer name.

    A distributed checkpoint (DCP) keeps one copy of each key: keyed by layer
    name, each stage's entries are its own, where lists of every layer would
    be one stage's lists for all of them.
    """
    return {
        "stage_layers": {
            layer.name: {
                "params": [
                    f"{layer.qualified(k)}{tuple(p.shape)}" for k, p in enumerate(layer.params)
                ],
                "rule": rule.describe(),
            }
            for layer, rule in zip(layers, rules)
        }
    }


def check_stage_identity(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first of this stage's layers the state dict differs on."""
    theirs = saved.get("stage_layers")
    if not isinstance(theirs, Mapping):
        raise ValueError(
            "the state dict has no 'stage_layers' mapping: it was not saved by a normalizer "
            "built with pp_mesh= (a whole model's state loads into a whole model's normalizer)"
        )
    for name, entry in mine["stage_layers"].items():
        if name not in theirs:
            raise ValueError(f"the state dict has no entry for this stage's layer {name!r}")
        got = theirs[name]
        if not isinstance(got, Mapping) or dict(got) != entry:
            raise ValueError(
                f"this state dict was saved for a different model or configuration: layer "
                f"{name!r} is {entry} here but {got} in the state dict"
            )


def setup_stages(
    model: Any, stages: Sequence[Any] | None, pp_mesh: Any, nonfinite: str
) -> tuple[list[Any] | None, Any, Pipeline | None]:
    """``(stage modules, the model to hold, pipeline)`` of a normalizer's arguments.

    ``nonfinite`` ``"zero"`` and ``"skip"`` make every stage's step tell the others
    about its non-finite tensors (see `gradclip.core.pipeline.Pipeline.flags`).

    Raises:
        see `check_stages`, `pipeline_of`.
    """
    chunks = check_stages(model, stages)
    pipeline = None
    if pp_mesh is not None:
        found = pipeline_of(pp_mesh)
        pipeline = Pipeline(found.group, found.rank, found.size, nonfinite=nonfinite)
    return chunks, (chunks[0] if chunks is not None else model), pipeline


def configure_layers(
    target: Any,
    normalizer: Any,
    rules_of: tuple[
        Callable[..., tuple[list[Rule], list[str | None]]], Callable[[Any, float, str], Rule]
    ],
) -> tuple[list[Layer], list[Rule], list[str | None], Pipeline | None]:
    """A normalizer's layers, each one's rule and override key, and its pipeline's slots.

    ``normalizer`` gives its stage modules (``_stages``), pipeline (``_pipeline``),
    ``default`` rule, ``threshold`` and ``overrides``; ``rules_of`` is
    ``(assign, resolve)``: ``assign(layers, default, threshold, overrides)`` gives the
    rules and keys, ``resolve(value, threshold, key)`` one override's rule. On
    pipeline stages the overrides that name other stages' layers are theirs, and
    the slots come from every override (each rank has them alike).
    """
    chunks: Sequence[Any] | None = normalizer._stages
    pipeline: Pipeline | None = normalizer._pipeline
    default, threshold = normalizer.default, normalizer.threshold
    overrides: Mapping[str, Any] = normalizer.overrides
    assign, resolve = rules_of
    from torch import nn

    layers = stage_layers(chunks) if chunks is not None else build_layers(target)
    if pipeline is not None:
        names = [layer.name for layer in layers]
        every = [(resolve(v, threshold, k), k) for k, v in overrides.items()]
        pipeline = pipeline.with_slots(spanning_slots([(default, None), *every]))
        overrides = present_overrides(chunks or [target], names, overrides)
    elif isinstance(target, nn.Module):  # a tied module's name names its layer
        overrides = resolve_override_keys(target, overrides)
    rules, tags = assign(layers, default, threshold, overrides)
    return layers, rules, tags, pipeline
