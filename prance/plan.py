"""Per-sample execution plans: which widths, MLP ratios, heads and keep ratios each image uses.

A :class:`Plan` is a small batch of tensors with one row per sample (a single row broadcasts
over any batch). The selector produces plans, the meta-network and the execution engine
consume them, and :func:`prance.count_macs` prices them; validation against the
:class:`~prance.config.SearchSpace` happens here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError

_KEYS = ("widths", "mlp_ratios", "heads", "keep", "merge_keep")


@dataclass(frozen=True)
class Plan:
    """Choices for a batch of samples (row ``i`` belongs to sample ``i``; one row broadcasts).

    widths:     ``[B, S]`` int64, residual width of every stage (stage 0 is always full).
    mlp_ratios: ``[B, depth]`` float64, MLP ratio of every block.
    heads:      ``[B, depth]`` int64, attention heads of every block.
    keep:       ``[B, S]`` float64, fraction of patch tokens kept by pruning at the start of
                each stage (1 = none removed; stage 0 is always 1).
    merge_keep: ``[B, S]`` float64, fraction of the remaining patch tokens kept by merging.
    """

    widths: torch.Tensor
    mlp_ratios: torch.Tensor
    heads: torch.Tensor
    keep: torch.Tensor
    merge_keep: torch.Tensor

    # ----------------------------------------------------------------- construction
    @classmethod
    def uniform(
        cls,
        config: ViTConfig,
        widths: Sequence[int],
        mlp_ratios: Sequence[float] | float,
        heads: Sequence[int] | int | None = None,
        keep: Sequence[float] | float = 1.0,
        merge_keep: Sequence[float] | float = 1.0,
    ) -> "Plan":
        """One sample's plan from per-stage widths and per-block (or one) MLP ratio.

        ``keep`` and ``merge_keep`` are given for stages 1.. (a scalar repeats); stage 0 is 1.
        """
        s, d = config.num_stages, config.depth
        if isinstance(widths, (str, bytes)) or not hasattr(widths, "__len__"):
            raise PranceError(f"plan widths must be a list of {s} whole numbers (one per stage), got {widths!r}")
        if len(widths) != s:
            raise PranceError(f"plan needs {s} stage widths, got {len(widths)}; give one per stage")
        _check_numbers(widths, "widths", whole=True)
        ratios = _per(mlp_ratios, d, "MLP ratios", "block")
        head_list = _per(config.num_heads if heads is None else heads, d, "head counts", "block", whole=True)
        keeps = [1.0] + _per(keep, s - 1, "keep ratios", "stage after the first")
        merges = [1.0] + _per(merge_keep, s - 1, "merge keep ratios", "stage after the first")
        return cls(
            widths=torch.tensor([list(widths)], dtype=torch.int64),
            mlp_ratios=torch.tensor([ratios], dtype=torch.float64),
            heads=torch.tensor([head_list], dtype=torch.int64),
            keep=torch.tensor([keeps], dtype=torch.float64),
            merge_keep=torch.tensor([merges], dtype=torch.float64),
        )

    @classmethod
    def full(cls, config: ViTConfig) -> "Plan":
        """The largest subnet: every width, ratio and head at maximum, no token reduction."""
        return cls.uniform(config, [config.embed_dim] * config.num_stages, config.mlp_ratio)

    @classmethod
    def smallest(cls, config: ViTConfig, space: SearchSpace) -> "Plan":
        """The smallest subnet (stage 0 stays full); no token reduction."""
        s, k = config.num_stages, config.stage_depth
        widths = [config.embed_dim] + [space.widths[0]] * (s - 1)
        ratios = [config.mlp_ratio] * k + [space.mlp_ratios[0]] * (config.depth - k)
        heads = [config.num_heads] * k + [_min_heads(config, space)] * (config.depth - k)
        return cls.uniform(config, widths, ratios, heads)

    @classmethod
    def random(
        cls,
        config: ViTConfig,
        space: SearchSpace,
        batch: int = 1,
        generator: torch.Generator | None = None,
        keep_range: tuple[float, float] | None = None,
    ) -> "Plan":
        """``batch`` independent random plans; keep ratios uniform in ``keep_range`` if given."""
        s, d, k = config.num_stages, config.depth, config.stage_depth

        def pick(choices: Sequence[Any], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            idx = torch.randint(len(choices), shape, generator=generator)
            return torch.tensor(list(choices), dtype=dtype)[idx]

        widths = pick(space.widths, (batch, s), torch.int64)
        widths[:, 0] = config.embed_dim
        ratios = pick(space.mlp_ratios, (batch, d), torch.float64)
        ratios[:, :k] = config.mlp_ratio
        heads = torch.full((batch, d), config.num_heads, dtype=torch.int64)
        if space.elastic_heads:
            heads[:, k:] = pick(space.heads, (batch, d - k), torch.int64)
        keep = torch.ones(batch, s, dtype=torch.float64)
        merge_keep = torch.ones(batch, s, dtype=torch.float64)
        if keep_range is not None:
            lo, hi = keep_range
            for t in ([keep] if space.token_mode == "prune" else [merge_keep] if space.token_mode == "merge"
                      else [keep, merge_keep]):
                t[:, 1:] = lo + (hi - lo) * torch.rand(batch, s - 1, generator=generator, dtype=torch.float64)
                if space.keep_grid > 0:
                    t[:, 1:] = snap_keep(t[:, 1:], space.keep_grid, space.min_keep)
        return cls(widths, ratios, heads, keep, merge_keep)

    @classmethod
    def cat(cls, plans: Sequence["Plan"]) -> "Plan":
        return cls(*(torch.cat([getattr(p, k) for p in plans]) for k in _KEYS))

    @classmethod
    def from_dict(cls, config: ViTConfig, d: dict[str, Any]) -> "Plan":
        """A single-sample plan from a YAML/JSON mapping (see :meth:`to_dict`)."""
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise PranceError(f"unknown plan keys {unknown}; use {', '.join(_KEYS)}")
        if "widths" not in d or "mlp_ratios" not in d:
            raise PranceError("a plan file needs at least 'widths' and 'mlp_ratios'")
        keep = d.get("keep", 1.0)
        merge = d.get("merge_keep", 1.0)
        # Accept either the stages-after-the-first form or the full per-stage form.
        keep = keep[1:] if isinstance(keep, list) and len(keep) == config.num_stages else keep
        merge = merge[1:] if isinstance(merge, list) and len(merge) == config.num_stages else merge
        return cls.uniform(config, d["widths"], d["mlp_ratios"], d.get("heads"), keep, merge)

    def to_dict(self, i: int = 0) -> dict[str, list]:
        """Sample ``i``'s plan as plain lists (YAML/JSON friendly)."""
        return {k: getattr(self, k)[i].tolist() for k in _KEYS}

    # ----------------------------------------------------------------- batch handling
    @property
    def batch_size(self) -> int:
        return self.widths.shape[0]

    def expand(self, batch: int) -> "Plan":
        """Broadcast a one-row plan to ``batch`` rows (a plan of that size is returned as is)."""
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise PranceError(f"plan has {self.batch_size} rows but the batch has {batch} images; give one per image")
        return Plan(*(getattr(self, k).expand(batch, -1) for k in _KEYS))

    def select(self, index: torch.Tensor | Sequence[int] | int) -> "Plan":
        """Rows ``index`` of the plan (a one-row plan broadcasts)."""
        if isinstance(index, int):
            index = [index]
        index = torch.as_tensor(index, dtype=torch.long)
        if self.batch_size == 1:
            return Plan(*(getattr(self, k).expand(len(index), -1) for k in _KEYS))
        return Plan(*(getattr(self, k)[index] for k in _KEYS))

    def with_stage(self, config: ViTConfig, stage: int, decision: "Plan") -> "Plan":
        """This plan with stage ``stage``'s choices (its width, keep ratios and the MLP ratios and
        heads of its blocks) taken from ``decision``; either may be one row that broadcasts."""
        b = max(self.batch_size, decision.batch_size)
        base, new = self.expand(b), decision.expand(b)
        blocks = slice(stage * config.stage_depth, (stage + 1) * config.stage_depth)
        fields = {}
        for k in _KEYS:
            t = getattr(base, k).clone()
            cols = blocks if k in ("mlp_ratios", "heads") else slice(stage, stage + 1)
            t[:, cols] = getattr(new, k)[:, cols]
            fields[k] = t
        return Plan(**fields)

    def key(self, i: int) -> tuple:
        """A hashable identity of sample ``i``'s plan (equal keys ⇒ identical execution)."""
        return tuple(tuple(getattr(self, k)[i].tolist()) for k in _KEYS)

    def groups(self) -> list[torch.Tensor]:
        """Indices of samples that share an identical plan, in first-seen order."""
        buckets: dict[tuple, list[int]] = {}
        for i in range(self.batch_size):
            buckets.setdefault(self.key(i), []).append(i)
        return [torch.tensor(v, dtype=torch.long) for v in buckets.values()]

    # ----------------------------------------------------------------- derived sizes
    def block_widths(self, config: ViTConfig) -> torch.Tensor:
        """``[B, depth]`` residual width each block runs at."""
        return self.widths.repeat_interleave(config.stage_depth, dim=1)

    def mlp_hidden(self, config: ViTConfig) -> torch.Tensor:
        """``[B, depth]`` MLP hidden width each block runs at (``round(ratio · width)``); computed
        once per plan, which is immutable (the engine asks at every stage)."""
        cached = self.__dict__.get("_mlp_hidden")
        if cached is not None and cached[0] == config:
            return cached[1]
        hidden = torch.round(self.mlp_ratios * self.block_widths(config).to(torch.float64))
        hidden = hidden.clamp_min(1).to(torch.int64)
        object.__setattr__(self, "_mlp_hidden", (config, hidden))
        return hidden

    # ----------------------------------------------------------------- validation
    def validate(self, config: ViTConfig, space: SearchSpace) -> "Plan":
        """Raise :class:`PranceError` unless every row is executable by this meta-network.

        A plan is immutable, so a successful check is remembered (per config and space) and
        repeated forwards with the same plan object skip it.
        """
        if self.__dict__.get("_valid_for") == (config, space):
            return self
        s, d, k = config.num_stages, config.depth, config.stage_depth
        shapes = {"widths": s, "mlp_ratios": d, "heads": d, "keep": s, "merge_keep": s}
        for name, n in shapes.items():
            t = getattr(self, name)
            if t.dim() != 2 or t.shape[1] != n or t.shape[0] != self.batch_size:
                raise PranceError(f"plan field {name} has shape {tuple(t.shape)}, expected [B, {n}]")
        # Plain Python on the values: a few hundred numbers check faster than a dozen tensor ops.
        widths, ratios, heads, keep, merge_keep = (getattr(self, name).tolist() for name in _KEYS)
        _check_in([w[1:] for w in widths], space.widths, "width", "search-space widths")
        if any(w[0] != config.embed_dim for w in widths):
            raise PranceError(f"stage 0 always runs at full width {config.embed_dim}; fix the plan")
        _check_in([r[k:] for r in ratios], space.mlp_ratios, "MLP ratio", "search-space MLP ratios")
        if any(v != config.mlp_ratio for r in ratios for v in r[:k]):
            raise PranceError(f"stage 0 always runs at MLP ratio {config.mlp_ratio}; fix the plan")
        allowed_heads = space.heads if space.elastic_heads else (config.num_heads,)
        _check_in([h[k:] for h in heads], allowed_heads, "head count",
                  "search-space heads (enable elastic_heads to vary them)")
        if any(v != config.num_heads for h in heads for v in h[:k]):
            raise PranceError(f"stage 0 always runs all {config.num_heads} heads; fix the plan")
        for name, rows in (("keep", keep), ("merge_keep", merge_keep)):
            if not all(0 < v <= 1 for row in rows for v in row):  # also False for NaN
                raise PranceError(f"{name} ratios must be in (0, 1], got {[v for row in rows for v in row][:8]}")
            if any(row[0] != 1 for row in rows):
                raise PranceError(f"stage 0 keeps every token: {name}[0] must be 1")
            _check_keep_space(name, [v for row in rows for v in row[1:] if v != 1], space)
        if space.token_mode == "prune" and any(v != 1 for row in merge_keep for v in row):
            raise PranceError("token mode 'prune' takes no merge_keep ratios; use token_mode 'prune_merge'")
        if space.token_mode == "merge" and any(v != 1 for row in keep for v in row):
            raise PranceError("token mode 'merge' takes merge_keep, not keep; use token_mode 'prune_merge'")
        object.__setattr__(self, "_valid_for", (config, space))
        return self


def kept_count(num_patches: torch.Tensor | int, ratio: torch.Tensor | float) -> torch.Tensor:
    """Patch tokens that survive keeping ``ratio`` of ``num_patches``: round, at least 1.

    The single rule for token counts, shared by physical, masked and MACs code paths.
    """
    n = torch.as_tensor(num_patches, dtype=torch.float64)
    r = torch.as_tensor(ratio, dtype=torch.float64)
    count = torch.floor(n * r + 0.5)
    return torch.minimum(count.clamp_min(1), n).to(torch.int64)


def snap_keep(ratio: torch.Tensor, grid: float, min_keep: float = 0.0) -> torch.Tensor:
    """Snap keep ratios to the nearest multiple of ``grid``, never below ``min_keep`` (then the
    smallest multiple above it) or one grid step, never above 1."""
    lowest = max(1, math.ceil(min_keep / grid - 1e-9)) * grid
    return (torch.round(ratio / grid) * grid).clamp(min(lowest, 1.0), 1.0)


def snap_keep_up(ratio: torch.Tensor, grid: float) -> torch.Tensor:
    """Keep ratios raised to the next multiple of ``grid`` (never lowered, so never below the
    ``min_keep`` they already respect), at most 1."""
    return (torch.ceil(ratio / grid - 1e-9) * grid).clamp(max=1.0)


def on_grid(value: float, grid: float) -> bool:
    """Whether keep ratio ``value`` is a multiple of ``grid`` (within 1e-9) or exactly 1."""
    return value == 1 or abs(value - round(value / grid) * grid) <= 1e-9


def _check_keep_space(name: str, values: list[float], space: SearchSpace) -> None:
    """Keep ratios below 1 obey the search space: at least ``min_keep``, on ``keep_grid`` if set."""
    low = [v for v in values if v < space.min_keep]
    if low:
        raise PranceError(f"{name} ratio {low[0]:g} is below the search space's min_keep {space.min_keep:g}; "
                          f"keep at least {space.min_keep:g} (or exactly 1)")
    if space.keep_grid > 0:
        off = [v for v in values if not on_grid(v, space.keep_grid)]
        if off:
            raise PranceError(f"{name} ratio {off[0]:g} is not a multiple of the search space's keep_grid "
                              f"{space.keep_grid:g}; snap it with prance.plan.snap_keep")


def _per(value: Any, n: int, what: str, unit: str, whole: bool = False) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * n
    elif isinstance(value, (str, bytes, bool)) or value is None or not hasattr(value, "__iter__"):
        raise PranceError(f"plan {what} must be a number or a list of {n} numbers (one per {unit}), got {value!r}")
    value = list(value)
    if len(value) != n:
        raise PranceError(f"plan needs {n} {what} (one per {unit}), got {len(value)}")
    _check_numbers(value, what, whole)
    return value


def _check_numbers(values: Sequence[Any], what: str, whole: bool) -> None:
    """Plan files are user input: reject strings, nulls and (where counts are meant) fractions by name."""
    for v in values:
        try:
            ok = not isinstance(v, (str, bytes, bool)) and (float(v).is_integer() or not whole)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            kind = "whole numbers" if whole else "numbers"
            raise PranceError(f"plan {what} must be {kind}, got {v!r}; fix the plan")


def _min_heads(config: ViTConfig, space: SearchSpace) -> int:
    return space.heads[0] if space.elastic_heads else config.num_heads


def _check_in(rows: list[list[Any]], allowed: Sequence[Any], what: str, where: str) -> None:
    bad = {v for row in rows for v in row} - set(allowed)
    if bad:
        raise PranceError(f"{what} {sorted(bad)} is outside the search space; use one of the {where} {list(allowed)}")
