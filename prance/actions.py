"""A selector's raw actions and plan entries, mapped both ways by one function (DESIGN.md §3).

Before stage ``s >= 1`` a selector emits, per image, a raw action in ``[0, 1]^A``:

* the stage's residual width (one number);
* the MLP ratio of each block of the stage (``stage_depth`` numbers, or one for the whole
  stage with ``mlp_per_stage=True``);
* the heads of each block of the stage, when the search space has elastic heads;
* the keep ratio(s) of the token mode: ``prune_keep`` (prune), ``merge_keep`` (merge), both
  (prune_merge).

Discrete choices come from equal-width bins of ``[0, 1]`` (what a categorical head's index
``i`` of ``n`` encodes as ``(i + 0.5) / n``); keep ratios map linearly onto ``[min_keep, 1]``
and snap to the search space's ``keep_grid`` when it is set. A selector may keep its ratios on
a coarser grid of its own (``keep_grid``, a multiple of the space's): fewer distinct token
counts make larger groups in the engine (DESIGN.md §5); its ratios are then raised to that
grid, never lowered. Every decoded action is a valid plan entry, and decoding an encoded valid
entry gives it back (keep ratios to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.plan import Plan, on_grid, snap_keep, snap_keep_up


@dataclass(frozen=True)
class ActionDim:
    """One number of the raw action: a discrete choice among ``choices``, or a continuous keep ratio."""

    name: str
    choices: tuple[float, ...] | None  # None: continuous in [low, 1]
    low: float = 0.0

    @property
    def categorical(self) -> bool:
        return self.choices is not None


class ActionSpace:
    """The raw actions of one stage's decision for a meta-network's search space (see module doc)."""

    def __init__(self, config: ViTConfig, space: SearchSpace, mlp_per_stage: bool = False,
                 keep_grid: float = 0.0) -> None:
        self.config, self.space, self.mlp_per_stage = config, space, mlp_per_stage
        self.keep_grid = check_selector_grid(keep_grid, space)
        k = config.stage_depth
        dims = [ActionDim("width", tuple(float(w) for w in space.widths))]
        ratios = tuple(space.mlp_ratios)
        dims += [ActionDim("mlp_ratio", ratios)] if mlp_per_stage else [ActionDim(f"mlp_ratio[{j}]", ratios)
                                                                        for j in range(k)]
        if space.elastic_heads:
            dims += [ActionDim(f"heads[{j}]", tuple(float(h) for h in space.heads)) for j in range(k)]
        if space.token_mode in ("prune", "prune_merge"):
            dims.append(ActionDim("prune_keep", None, space.min_keep))
        if space.token_mode in ("merge", "prune_merge"):
            dims.append(ActionDim("merge_keep", None, space.min_keep))
        self.dims: tuple[ActionDim, ...] = tuple(dims)
        self._full = Plan.full(config)  # the default base of decoded plans (immutable)
        # Column-wise decoding tables: choices (padded), their number, keep floors, which columns.
        widest = max((len(d.choices) for d in dims if d.categorical), default=1)
        self._table = torch.tensor([list(d.choices) + [0.0] * (widest - len(d.choices)) if d.categorical
                                    else [0.0] * widest for d in dims], dtype=torch.float64)
        self._n = torch.tensor([len(d.choices) if d.categorical else 1 for d in dims], dtype=torch.float64)
        self._low = torch.tensor([d.low for d in dims], dtype=torch.float64)
        self._is_keep = torch.tensor([not d.categorical for d in dims])
        self._column = {d.name: j for j, d in enumerate(dims)}

    # ------------------------------------------------------------------ sizes the selector needs
    @property
    def size(self) -> int:
        """A: numbers per raw action."""
        return len(self.dims)

    @property
    def categorical_sizes(self) -> list[int]:
        """Number of choices of each discrete dimension, in action order."""
        return [len(d.choices) for d in self.dims if d.categorical]

    @property
    def continuous(self) -> list[bool]:
        """Per dimension: True for a continuous keep ratio, False for a discrete choice."""
        return [not d.categorical for d in self.dims]

    # ------------------------------------------------------------------ raw action <-> plan
    def decode(self, action: torch.Tensor, stage: int, base: Plan | None = None) -> Plan:
        """Plan rows whose stage-``stage`` entries are the raw actions ``[B, A]`` (or ``[A]``);
        the other stages are ``base``'s (default: full size)."""
        self._check_stage(stage)
        a = torch.as_tensor(action, dtype=torch.float64).detach().cpu()
        a = a[None] if a.dim() == 1 else a
        if a.dim() != 2 or a.shape[1] != self.size:
            raise PranceError(f"raw actions have shape {tuple(a.shape)}, expected [B, {self.size}] "
                              f"({', '.join(d.name for d in self.dims)})")
        if not bool(((a >= 0) & (a <= 1)).all()):
            raise PranceError("raw actions must lie in [0, 1]; squash the selector's outputs (e.g. a sigmoid)")
        cfg, b, k = self.config, a.shape[0], self.config.stage_depth
        base = (self._full if base is None else base).expand(b)
        fields = {name: getattr(base, name).clone() for name in ("widths", "mlp_ratios", "heads", "keep", "merge_keep")}
        blocks = slice(stage * k, (stage + 1) * k)
        value, col = self._values(a), self._column
        fields["widths"][:, stage] = value[:, col["width"]].to(torch.int64)
        fields["mlp_ratios"][:, blocks] = (value[:, col["mlp_ratio"], None].expand(b, k) if self.mlp_per_stage else
                                           value[:, [col[f"mlp_ratio[{j}]"] for j in range(k)]])
        if self.space.elastic_heads:
            fields["heads"][:, blocks] = value[:, [col[f"heads[{j}]"] for j in range(k)]].to(torch.int64)
        for name, dim in (("keep", "prune_keep"), ("merge_keep", "merge_keep")):
            fields[name][:, stage] = value[:, col[dim]] if dim in col else 1.0
        return Plan(**fields)

    def encode(self, plan: Plan, stage: int) -> torch.Tensor:
        """``[B, A]`` raw actions that decode to ``plan``'s stage-``stage`` entries (bin centres for
        discrete choices). Raises if the entries are outside this action space."""
        self._check_stage(stage)
        plan = plan.validate(self.config, self.space)
        k = self.config.stage_depth
        blocks = range(stage * k, (stage + 1) * k)
        if self.mlp_per_stage and bool((plan.mlp_ratios[:, blocks] != plan.mlp_ratios[:, blocks[:1]]).any()):
            raise PranceError("this action space takes one MLP ratio per stage, but the plan's blocks differ; "
                              "build it with mlp_per_stage=False")
        entries = {"width": plan.widths[:, stage].double(), "mlp_ratio": plan.mlp_ratios[:, blocks[0]],
                   "prune_keep": plan.keep[:, stage], "merge_keep": plan.merge_keep[:, stage]}
        for j, i in enumerate(blocks):
            entries[f"mlp_ratio[{j}]"] = plan.mlp_ratios[:, i]
            entries[f"heads[{j}]"] = plan.heads[:, i].double()
        return torch.stack([self._raw(d, entries[d.name]) for d in self.dims], 1)

    def _values(self, u: torch.Tensor) -> torch.Tensor:
        """``[B, A]`` plan values of raw actions ``u``, every column at once: a discrete choice's
        bin, or a keep ratio mapped onto ``[low, 1]`` and snapped to the grid."""
        # min / max are exact, so these equal clamp(low, high) column by column (and cost less than a
        # clamp with tensor bounds)
        index = torch.minimum((u * self._n).floor().clamp_min(0.0), self._n - 1).long()
        chosen = self._table.gather(1, index.t()).t()
        keep = torch.maximum(self._low + u * (1 - self._low), self._low).clamp_max(1.0)
        if self.keep_grid > 0:
            keep = snap_keep_up(keep, self.keep_grid)
        elif self.space.keep_grid > 0:
            keep = snap_keep(keep, self.space.keep_grid, self.space.min_keep)  # every keep part's floor
        keep = torch.where(u >= 1, 1.0, keep)  # exactly 1 is always valid, on a grid or not
        return torch.where(self._is_keep, keep, chosen)

    @staticmethod
    def _raw(d: ActionDim, value: torch.Tensor) -> torch.Tensor:
        if d.categorical:
            choices = torch.tensor(d.choices, dtype=torch.float64)
            index = (value[:, None] == choices).double().argmax(1)
            return (index.double() + 0.5) / len(d.choices)
        return torch.where(value >= 1, 1.0, (value - d.low) / (1 - d.low)).clamp(0.0, 1.0)

    def _check_stage(self, stage: int) -> None:
        if not 1 <= stage < self.config.num_stages:
            raise PranceError(f"decisions are taken before stages 1..{self.config.num_stages - 1}, not {stage}")


def check_selector_grid(grid: float, space: SearchSpace) -> float:
    """A selector's own keep grid: 0 (the search space's), or a step in (0, 1] that is a multiple
    of the space's ``keep_grid`` (else its ratios would leave the grid the meta-network knows)."""
    grid = float(grid)
    if grid == 0:
        return 0.0
    if not 0 < grid <= 1:
        raise PranceError(f"selector keep grid {grid:g} must be in (0, 1], e.g. 0.125 (0: the search space's)")
    if space.keep_grid > 0 and not on_grid(grid, space.keep_grid):
        raise PranceError(f"selector keep grid {grid:g} is not a multiple of the meta-network's keep_grid "
                          f"{space.keep_grid:g}; give a coarser multiple of it, e.g. {2 * space.keep_grid:g}")
    return grid


__all__ = ["ActionDim", "ActionSpace", "check_selector_grid"]
