"""The one collective of a sharded step, and the ranks' agreement checked inside it.

On a model whose parameters are ``DTensor`` s (FSDP2, HSDP, tensor parallel) a
step that needs global quantities sums them over ranks with one ``all_reduce``
of a vector indexed by tensor (`gradclip.core.sharding`). That is exact only if
every rank sends the same tensors in the same order, i.e. the ranks agree on
which parameters have a gradient and on their dtypes. A rank that does not
would add another layer's norm to its own; a vector of another length makes
gloo abort the process; a rank without gradients that skipped the collective
would leave the next one mismatched. So here:

* the vector's length depends on the model and the configuration only, never
  on this step's gradients: its blocks have the `Capacity` of a step in which
  every parameter has a gradient, the rest is zeros, and every rank takes part
  in every step's collective, with or without gradients;
* it starts with a fingerprint of the rank's gradients: per parameter a code
  ``c`` (0: no gradient, else ``1 +`` the index of its dtype), sent as
  ``c + c²·2^w``. Summed over the ``W`` ranks each float holds ``S₁ = Σ c``
  and ``S₂ = Σ c²`` exactly (integers below 2^53 in float64), and
  ``W·S₂ = S₁²`` holds if and only if every rank sent the same ``c``
  (Cauchy–Schwarz). One more float counts the ranks whose preparation of the
  step failed (a refused layout, a sparse gradient): they still take part,
  then raise their own error.

Every rank reads the same sums, so every rank reaches the same verdict: on a
disagreement all of them raise the same `RankMismatchError`, naming the
parameters, before any gradient or state is modified. The check costs
``P + 1`` floats in the collective the step runs anyway (``P`` parameters) and
one read of one flag to the host: free when the vector lives on the CPU
(gloo), a synchronization with the device on an accelerator.

A configuration that reduces nothing (``None``, element-wise clipping, AGC on
``Shard(0)`` weights only) has no collective and no check: each rank then
normalizes its own pieces, which needs nothing from the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from gradclip.core.layers import Layer
from gradclip.core.measure import capacity_of
from gradclip.core.plan import Plan, Signature
from gradclip.core.rule import InPlaceRule, Rule, stages_of
from gradclip.core.sharding import Capacity, RankGroup, Sharding, is_dtensor, local_tensors
from gradclip.core.state import StateStore

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["RankMismatchError", "ShardedModel", "StepCollective", "layout_codes", "sharded_model"]

# Gradient dtypes by code (1 + index); any other dtype shares the last code.
# Fixed here, not read from torch, so that ranks agree on the codes.
_DTYPES = (
    "float32",
    "bfloat16",
    "float16",
    "float64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)
_OTHER = len(_DTYPES) + 1
_CODE_OF = {getattr(torch, n): i + 1 for i, n in enumerate(_DTYPES) if hasattr(torch, n)}


def layout_codes(dtypes: Sequence[torch.dtype | None]) -> list[int]:
    """Per parameter, 0 if it has no gradient, else ``1 +`` its gradient dtype's index.

    Examples:
        >>> layout_codes([torch.float32, None, torch.bfloat16])
        [1, 0, 2]
    """
    return [0 if d is None else _CODE_OF.get(d, _OTHER) for d in dtypes]


class RankMismatchError(RuntimeError):
    """Ranks disagreed on a step's gradients or configuration, or one failed; nothing changed.

    Raised on every rank, with the same message, by a step of a sharded model
    (see `gradclip.core.collective`), or by the first step of replicas whose
    configurations differ (see `gradclip.core.agreement`).

    Attributes:
        params: the parameters the ranks disagree on (qualified names); for a
            configuration, the layers whose rules differ.
        failed_ranks: how many ranks raised an error of their own while preparing
            the step (their messages are in their own logs).
        settings: for a configuration, ``{setting: {rank: value}}`` of each
            setting that differs (``"layers"``, ``"rules"``, ``"nonfinite"``,
            ``"measure_all"``); empty otherwise.
    """

    def __init__(
        self,
        message: str,
        params: list[str],
        failed_ranks: int,
        *,
        settings: dict[str, dict[int, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.params = params
        self.failed_ranks = failed_ranks
        self.settings = settings or {}


@dataclass(eq=False)
class StepCollective:
    """The collective of every step of one engine on a sharded model.

    Built once per engine from a step in which every parameter has a gradient
    (so from the parameters, which every rank holds alike).

    Attributes:
        group: the process group (``None``: the default group).
        world: its number of ranks.
        rank: this rank's index in it.
        device: where the vector lives.
        dtype: its dtype (float64 on CPU and CUDA).
        names: qualified name of every parameter, in the engine's order.
        capacity: the blocks' sizes (see `gradclip.core.sharding.Sharding.pack`).
        width: bits of ``S₁`` in a fingerprint float; 0 when ``S₁`` and ``S₂``
            travel in two floats (very large worlds).
    """

    group: ProcessGroup | None
    world: int
    rank: int
    device: torch.device
    dtype: torch.dtype
    names: list[str]
    capacity: Capacity
    width: int = 0
    _cache: tuple[Any, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, sharding: Sharding, names: Sequence[str], capacity: Capacity) -> StepCollective:
        """The collective of a model whose step with every gradient has ``sharding``."""
        # integers below 2^mantissa are exact: 53 for float64, 24 for float32
        mantissa = 1 - round(math.log2(torch.finfo(sharding.dtype).eps))
        s1_max, s2_max = sharding.group_size * _OTHER, sharding.group_size * _OTHER**2
        width = s1_max.bit_length()  # S₁ < 2^width: it never carries into S₂'s bits
        if s1_max + (s2_max << width) >= 1 << mantissa:  # S₁ and S₂ in two floats
            width = 0
            if s1_max * s1_max >= 1 << mantissa:  # world·S₂ and S₁² must be exact too
                raise NotImplementedError(
                    "the rank-agreement fingerprint cannot be summed exactly over "
                    f"{sharding.group_size} ranks in {sharding.dtype}"
                )
        return cls(
            sharding.group,
            sharding.group_size,
            sharding.rank,
            sharding.device,
            sharding.dtype,
            list(names),
            capacity,
            width,
        )

    def cached(self, key: object) -> torch.Tensor | None:
        """The fingerprint last made for ``key`` (a plan), if it was the last one made."""
        return self._cache[1] if self._cache is not None and self._cache[0] is key else None

    def fingerprint(self, dtypes: Sequence[torch.dtype | None], key: object = None) -> torch.Tensor:
        """The fingerprint of gradients of these dtypes (``None``: no gradient).

        Kept for ``key`` (a plan: the same gradients' layout), see `cached`.
        """
        codes = layout_codes(dtypes)
        if self.width:
            values = [c + (c * c << self.width) for c in codes]
        else:
            values = list(codes) + [c * c for c in codes]
        out = torch.tensor(values, dtype=self.dtype, device=self.device)
        if key is not None:
            self._cache = (key, out)
        return out

    def exchange(
        self,
        fingerprint: torch.Tensor,
        failed: bool,
        body: torch.Tensor | None,
        reduce: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    ) -> tuple[torch.Tensor, list[bool]]:
        """Run the step's collective; return the reduced body, or raise on every rank.

        Args:
            fingerprint: this rank's `fingerprint`.
            failed: this rank could not prepare the step (it raises its own error
                after the collective; the others raise `RankMismatchError`).
            body: this rank's packed quantities
                (`gradclip.core.sharding.Sharding.pack`), or ``None`` for zeros.
            reduce: ``vector -> (its sum over this group, alarms)``, run instead of
                the ``all_reduce`` over ``group`` when the vector travels inside a
                larger one (pipeline stages, `gradclip.core.stage_transport`).
                ``alarms`` (a bool vector, or ``None``) are read to the host with
                the verdict, in the same one read; when the first is set, the
                vector was not laid out alike on every rank and no verdict is given.

        Returns:
            The reduced body, and the alarms as read (empty without).

        Raises:
            RankMismatchError: ranks disagree on the gradients, or another rank failed.
        """
        import torch.distributed as dist

        if body is None:
            body = torch.zeros(self.capacity.size(self.world), dtype=self.dtype, device=self.device)
        flag = torch.full((1,), float(failed), dtype=self.dtype, device=self.device)
        vector = torch.cat([fingerprint, flag, body])
        alarms: torch.Tensor | None = None
        if reduce is None:
            dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=self.group)
        else:
            vector, alarms = reduce(vector)
        n = fingerprint.numel()
        if failed:  # the caller raises this rank's own error
            return vector[n + 1 :], [] if alarms is None else [bool(a) for a in alarms.tolist()]
        mismatch, s1, s2 = self.verdict(vector[:n])
        failures = vector[n]
        # the one host read of the step (free on the CPU), the same on every rank
        trouble = mismatch.any() | (failures != 0)
        read = (
            [bool(trouble.item())]
            if alarms is None
            else torch.cat([trouble.reshape(1), alarms]).tolist()
        )
        raised, raised_alarms = bool(read[0]), [bool(a) for a in read[1:]]
        if raised and not (raised_alarms and raised_alarms[0]):
            self._raise(mismatch, s1, s2, int(failures.item()))
        return vector[n + 1 :], raised_alarms

    def verdict(self, summed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the fingerprints summed over ranks: per parameter, whether ranks differ.

        Returns:
            ``(mismatch, S₁, S₂)``, each ``(P,)``: ``mismatch`` is
            ``world·S₂ != S₁²``, true exactly where some rank's code differs.
        """
        if self.width:
            scale = float(1 << self.width)
            s2 = torch.div(summed, scale, rounding_mode="floor")
            s1 = summed - s2 * scale
        else:
            half = summed.numel() // 2
            s1, s2 = summed[:half], summed[half:]
        return s1 * s1 != s2 * self.world, s1, s2

    def _raise(
        self, mismatch: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, failures: int
    ) -> None:
        bad = mismatch.nonzero().flatten().tolist()
        sums = list(zip(s1.tolist(), s2.tolist()))
        params = [self.names[i] for i in bad]
        described = [f"{self.names[i]!r} ({self._describe(*sums[i])})" for i in bad[:20]]
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        parts = []
        if failures:
            parts.append(
                f"{failures} of {self.world} ranks raised an error while preparing this step "
                "(see the error on those ranks)"
            )
        if bad:
            parts.append(
                "ranks disagree on which parameters have a gradient, or on its dtype: "
                + ", ".join(described)
                + more
                + ". Every rank must call apply() with the same parameters having "
                "gradients: the norms are summed over ranks tensor by tensor. A parameter "
                "unused on some ranks can be given a zero gradient there (e.g. add "
                "0.0 * p.sum() to the loss)"
            )
        message = "; ".join(parts) + ". No gradient or state was modified, on any rank."
        raise RankMismatchError(
            message[0].upper() + message[1:],
            params,
            failures,
        )

    def _describe(self, s1: float, s2: float) -> str:
        # k ranks with one code c and the others none: S₁ = k·c, S₂ = k·c²
        if s1 > 0 and s2 > 0:
            c, k = s2 / s1, s1 * s1 / s2
            if c == int(c) and k == int(k) and int(k) * int(c) == int(s1):
                return f"a gradient on {int(k)} of {self.world} ranks"
        return "gradients of different dtypes on different ranks"


@dataclass(eq=False)
class ShardedModel:
    """What an engine on a model with ``DTensor`` parameters needs across ranks.

    Attributes:
        collective: the steps' collective; ``None`` if the configuration reduces
            nothing (each rank then normalizes its pieces on its own).
        changes: the group over which `gradclip.core.report.NormReport.across_ranks`
            combines the in-place rules' per-rank ``changed`` flags; ``None`` if no
            rule is in-place (every flag is then derived from reduced values).
    """

    collective: StepCollective | None
    changes: RankGroup | None


def sharded_model(
    layers: Sequence[Layer],
    rules: Sequence[Rule],
    params: Sequence[torch.Tensor],
    names: Sequence[str],
    *,
    trainable: Sequence[bool],
    measure_all: bool,
    store: StateStore,
    tags: Sequence[str | None] | None = None,
) -> ShardedModel | None:
    """Size the collective of an engine's steps from its parameters.

    ``None`` if no parameter is a ``DTensor`` (one process, DDP): no collective.

    The sizes are those of a step in which every parameter has a gradient
    shaped and placed like the parameter (FSDP2's gradients are), built from
    facts every rank holds alike. If the layout of the parameters that never
    get a gradient is refused (a frozen layer split over devices), those of the
    ``trainable`` ones are used.

    Raises:
        whatever `gradclip.core.plan.Plan` refuses in the trainable parameters'
        layout: on every rank, before any collective.
    """
    if not any(is_dtensor(p) for p in params):
        return None
    signature: Signature = [(p.device, p.dtype, p.layout) for p in params]
    trainable_only: Signature = [s if t else None for s, t in zip(signature, trainable)]
    template: Plan | None = None
    for candidate in (signature, trainable_only):
        try:
            template = Plan(
                layers,
                rules,
                candidate,
                params=params,
                grads=params,
                measure_all=measure_all,
                store=store,
                tags=tags,
            )
            break
        except Exception:
            if candidate is trainable_only or trainable_only == signature:
                raise
    assert template is not None
    sharding = template.sharding
    if sharding is None:  # every DTensor parameter is frozen: an unsharded step
        return None
    stand_ins = local_tensors(template.select(list(params)))
    capacity = capacity_of(template, stand_ins)
    in_place = any(isinstance(s, InPlaceRule) for rule in rules for s in stages_of(rule))
    changes = RankGroup(sharding.group) if in_place else None
    if capacity.size(sharding.group_size) == 0:
        return ShardedModel(None, changes)
    return ShardedModel(StepCollective.of(sharding, names, capacity), changes)
