"""What a normalization step measured: norms before normalization, per layer and per tensor.

Everything stays on the gradients' device as tensors; nothing is read to the
host until you ask (``to_dict()``, ``print(report)``, ``changed_layers()``),
and then everything is read with one transfer.

On a sharded model (FSDP2) every rank's report holds the same norms and
statistics, read from values reduced over ranks; so are the ``changed`` flags
of scaling rules, derived from them. An in-place rule such as
`AdaptiveGradClip` decides per unit (a row) on the pieces the rank holds: its
``changed`` flag says whether *this rank* changed the layer, and
`NormReport.across_ranks` combines them over ranks.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gradclip.core.plan import Plan

__all__ = ["NormReport"]


class NormReport:
    """Norms measured by one step, before normalization.

    Attributes:
        tensor_norms: ``(T,)`` L2 norm of each gradient (NaN where not measured:
            ``None`` layers and element-wise clipping, unless ``measure_all``).
        layer_norm_vector: ``(L,)`` L2 norm of each of the model's layers
            (indexed like the normalizer's layers; NaN where not measured).
        changed_vector: ``(L,)`` bool, whether normalization changed the layer
            (for an in-place rule on a sharded model: on this rank, see
            `across_ranks`).

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 1))
        >>> for p in net.parameters():
        ...     p.grad = torch.full_like(p, 0.5)
        >>> report = gradclip.normalize_(net, "ClipL2PerLayer", threshold=1.0)
        >>> report.layer_norms["0"]                 # a 0-d tensor on the gradients' device
        tensor(1.5811)
        >>> report.to_dict()["changed"]             # everything, read with one transfer
        {'0': True, '1': False}
        >>> print(report)
        layer   norm  changed  param norms
        ------------------------------------------------
        0      1.581  yes      weight=1.414, bias=0.7071
        1      0.866  no       weight=0.7071, bias=0.5
    """

    def __init__(
        self,
        plan: Plan,
        tensor_norms: torch.Tensor,
        layer_norms: torch.Tensor,
        changed: torch.Tensor,
        stats: Sequence[tuple[list[str], dict[str, torch.Tensor]]] = (),
        unknown: Sequence[Sequence[int]] = (),
    ) -> None:
        self._plan = plan
        self.tensor_norms = tensor_norms.to(plan.report_dtype)
        self.layer_norm_vector = layer_norms.to(plan.report_dtype)
        self.changed_vector = changed
        self.stats = list(stats)
        # layers whose rule could not tell whether it changed them, read when needed
        self._unknown = unknown
        #: on pipeline stages: the stages (`gradclip.core.pipeline.Pipeline`) and the
        #: sum of squared norms over every stage, when the step's collective brought it
        self.stages: tuple[Any, torch.Tensor | None] | None = None

    @property
    def param_names(self) -> list[str]:
        """Qualified names (``"layer.param"``) of the step's gradients, in the engine's order."""
        return self._plan.names

    @property
    def layer_names(self) -> list[str]:
        """Layers that had gradients this step, in model order."""
        plan = self._plan
        return [n for n, has in zip(plan.layer_names, plan.layer_has_grad) if has]

    @classmethod
    def unchanged(
        cls, plan: Plan, tensor_norms: torch.Tensor, layer_norms: torch.Tensor
    ) -> NormReport:
        """The report of a step that changed nothing (``nonfinite="skip"`` or ``"error"``)."""
        flags = torch.zeros(plan.num_layers, dtype=torch.bool, device=plan.device)
        return cls(plan, tensor_norms, layer_norms, flags)

    @classmethod
    def empty(cls, plan: Plan) -> NormReport:
        """The report of a step in which no parameter had a gradient."""
        dtype = plan.report_dtype
        return cls(
            plan,
            torch.zeros(0, dtype=dtype, device=plan.device),
            torch.full((plan.num_layers,), math.nan, dtype=dtype, device=plan.device),
            torch.zeros(plan.num_layers, dtype=torch.bool, device=plan.device),
        )

    # -- device-side views (no sync) -------------------------------------------
    @property
    def layer_norms(self) -> dict[str, torch.Tensor]:
        """``{layer: 0-d norm tensor}`` for the layers that had gradients."""
        plan = self._plan
        return {
            name: self.layer_norm_vector[i]
            for i, (name, has) in enumerate(zip(plan.layer_names, plan.layer_has_grad))
            if has
        }

    @property
    def param_norms(self) -> dict[str, torch.Tensor]:
        """``{"layer.param": 0-d norm tensor}`` for every gradient of the step."""
        return dict(zip(self.param_names, self.tensor_norms.unbind(0)))

    @property
    def changed(self) -> dict[str, torch.Tensor]:
        """``{layer: 0-d bool tensor}``: whether normalization changed the layer's gradients.

        A rule that cannot tell without an extra read (element-wise clipping)
        raises no flag: there ``True`` means changed and ``False`` only that
        no other rule of the layer changed it; `to_dict` reads ``None`` for it.
        """
        plan = self._plan
        return {
            name: self.changed_vector[i]
            for i, (name, has) in enumerate(zip(plan.layer_names, plan.layer_has_grad))
            if has
        }

    def across_ranks(self) -> NormReport:
        """This report with ``changed`` true where normalization changed the layer on any rank.

        A collective: call it on every rank, e.g. on the steps you log. On a
        sharded model with an in-place rule (`AdaptiveGradClip`, element-wise
        clipping), whose ``changed`` flags are per rank, it combines them with one
        ``all_reduce`` of ``L`` int32 (``L`` layers); the report is then the same
        on every rank. Otherwise every flag is already the same on every rank and
        it returns this report, without communicating (the same on every rank:
        it depends on the model and the configuration only).

        Returns:
            A report sharing this one's norms and statistics.

        Examples:
            >>> report = gradclip.normalize_(model, gradclip.AdaptiveGradClip())
            >>> report.across_ranks() is report  # one process: nothing to combine
            True

            On a sharded model, call it on every rank (on the steps you log), then
            read it on one: ``logged = report.across_ranks()``.
        """
        group = self._plan.changes_group
        if group is None:
            return self
        import torch.distributed as dist

        flags = self.changed_vector.to(torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group.group)
        combined = copy.copy(self)
        combined.changed_vector = flags > 0
        return combined

    def total_norm(self) -> torch.Tensor:
        """0-d L2 norm of all measured gradients together (NaN-free only if all were measured).

        On pipeline stages (``pp_mesh``) it spans every stage: from the step's
        collective when the configuration has a rule that spans layers, else with
        one ``all_reduce`` of one float over the stages, a collective to call on
        every rank.
        """
        plan = self._plan
        measured = (
            self.tensor_norms
            if plan.all_measured
            else self.tensor_norms.index_select(0, plan.measured_positions_t)
        )
        if self.stages is None:
            total: torch.Tensor = torch.linalg.vector_norm(measured.to(plan.acc_dtype))
            return total.to(self.tensor_norms.dtype)
        pipeline, every_stage = self.stages
        squares = measured.to(plan.acc_dtype).square().sum()
        if every_stage is not None:
            squares = every_stage
        else:
            import torch.distributed as dist

            squares = squares.reshape(1).clone()
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=pipeline.group)
            squares = squares[0]
        return squares.sqrt().to(self.tensor_norms.dtype)

    # -- host side (one transfer) ------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything as Python values, read from the device with one transfer.

        Returns:
            ``{"layer_norms": {layer: float | None}, "param_norms": {name: float | None},
            "changed": {layer: bool | None}, "stats": {name: float | list[float]}}``
            where ``None`` marks a norm that was not measured, or a change the
            strategy cannot tell without an extra pass (element-wise clipping).
        """
        plan = self._plan
        pieces = [
            self.tensor_norms.double(),
            self.layer_norm_vector.double(),
            self.changed_vector.double(),
        ]
        stat_items: list[tuple[str, torch.Tensor]] = []
        named: set[str] = set()
        for layers, stats in self.stats:
            for key, value in stats.items():
                # equal rules under two override keys: the second is named by its first layer
                key = f"{key}[{layers[0]}]" if key in named and layers else key
                named.add(key)
                stat_items.append((key, value))
                pieces.append(value.detach().double().reshape(-1).to(self.tensor_norms.device))
        values = torch.cat(pieces).tolist() if pieces else []
        t, n_layers = len(self.param_names), plan.num_layers
        tensor_values = values[:t]
        layer_values = values[t : t + n_layers]
        changed_values = values[t + n_layers : t + 2 * n_layers]
        offset = t + 2 * n_layers
        stats_out: dict[str, float | list[float]] = {}
        for key, value in stat_items:
            n = value.numel()
            chunk = values[offset : offset + n]
            offset += n
            stats_out[key] = chunk[0] if value.dim() == 0 else chunk

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else x

        layer_norms: dict[str, float | None] = {}
        changed: dict[str, bool | None] = {}
        unknown = {lid for ids in self._unknown for lid in ids}
        for i, name in enumerate(plan.layer_names):
            if plan.layer_has_grad[i]:
                layer_norms[name] = clean(layer_values[i]) if plan.layer_measured[i] else None
                # a flag raised by any rule is certain, even in a chain with a member
                # (element-wise clipping) that cannot tell; only a lowered flag is unsure
                flagged = bool(changed_values[i])
                changed[name] = flagged if flagged or i not in unknown else None
        param_norms = {name: clean(v) for name, v in zip(self.param_names, tensor_values)}
        return {
            "layer_norms": layer_norms,
            "param_norms": param_norms,
            "changed": changed,
            "stats": stats_out,
        }

    def changed_layers(self) -> list[str]:
        """Names of the layers whose gradients were changed (reads the device once)."""
        return [name for name, c in self.to_dict()["changed"].items() if c]

    def nonfinite_layers(self) -> list[str]:
        """Names of the measured layers whose norm was inf or NaN (reads the device once).

        With ``nonfinite="zero"``, ``"error"`` or ``"skip"`` every layer is
        measured; with ``"propagate"`` only the layers whose rule reads norms.
        """
        plan = self._plan
        values = self.layer_norm_vector.tolist()
        return [
            name
            for name, value, measured in zip(plan.layer_names, values, plan.layer_measured)
            if measured and not math.isfinite(value)
        ]

    def table(self) -> str:
        """A readable table: one row per layer, its norm and whether it was changed.

        Norms and the rules' stats are printed to 4 significant digits (``.4g``):
        what a float32 norm holds reliably on any CPU, short enough to read.
        """
        data = self.to_dict()
        plan = self._plan
        by_layer: dict[str, list[tuple[str, float | None]]] = {}
        for p, (name, value) in enumerate(data["param_norms"].items()):
            layer = plan.layer_names[plan.tensor_layer_ids[p]]
            by_layer.setdefault(layer, []).append(
                (name[len(layer) + 1 :] if layer else name, value)
            )

        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"

        rows = [("layer", "norm", "changed", "param norms")]
        for layer, norm in data["layer_norms"].items():
            params = ", ".join(f"{p}={fmt(v)}" for p, v in by_layer.get(layer, []))
            flag = data["changed"][layer]
            shown = "?" if flag is None else ("yes" if flag else "no")
            rows.append((layer or "(root)", fmt(norm), shown, params))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
            for r in rows
        ]
        lines.insert(1, "-" * max(len(line) for line in lines))
        for key, value in data["stats"].items():  # in the norms' format
            shown = fmt(value) if isinstance(value, float) else f"[{', '.join(map(fmt, value))}]"
            lines.append(f"{key}: {shown}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"NormReport(layers={len(self.layer_names)}, tensors={len(self.param_names)})"
