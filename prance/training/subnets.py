"""What meta-network training samples each step, derived from the search space alone.

The selector will choose, per image and per stage ≥ 1, a width, an MLP ratio per block, heads
when elastic, and the keep ratio(s) of the search space's token mode, never below
``min_keep`` (DESIGN.md §3). Meta-training must cover exactly those choices, so every step
runs the sandwich (DESIGN.md §1):

* the **largest** subnet — every width, ratio and head at maximum, no token reduction;
* the **smallest** subnet — the smallest width, MLP ratio and head count of the space *and*
  the fewest tokens: every ratio of the token mode at ``min_keep`` in every stage ≥ 1 (the
  lowest MACs any plan of the space can reach);
* ``num_random`` **random** subnets. By default (``"per-image"``) each image draws its own
  plan — widths, MLP ratios, heads if elastic, and keep ratios — as the selector's decisions
  will differ per image; a batch of mixed plans runs in masked mode. ``"batch-shared"``
  draws one plan for the whole batch and runs it physically (sliced weights and tokens):
  faster, but every image of a step sees the same subnet.

Keep ratios are drawn uniformly in ``[min_keep, 1]`` (uniformly over the grid's points when
the space has a ``keep_grid``). Uniform is the right prior because (1) the selector's keep
head starts as a near-uniform distribution over exactly that range (a Beta(1, 1)-like
exploration) and keeps exploring all of it during PPO, so every ratio it may try needs
trained weights; (2) the ratios compound over three stages, so even uniform per-stage draws
put most of the mass on fewer surviving tokens than a moderate selector keeps — skewing
the draws further towards small ratios would starve the moderate region the selector
converges to, while the ends are trained every step anyway (largest: keep 1, smallest:
``min_keep``).

Every draw comes from the ``torch.Generator`` the caller passes; the training loop seeds it
with (seed, step), identical on every DDP rank, so every rank runs the same subnets.

:func:`require_trained_for` is the check later stages (evaluate, sweep, the selector) use to
refuse a meta-network trained for another token mode or search space, in one line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.plan import Plan, snap_keep

#: How random subnets are drawn: one plan per image (masked mode) or one per batch (physical).
RANDOM_SUBNETS = ("per-image", "batch-shared")

#: Token mode of ``prance train-meta`` when the starting model was trained for none (a dense
#: model or timm weights): merging, the paper's headline setting; merged tokens keep the
#: information of the removed ones, so few surviving tokens cost less accuracy than pruning.
DEFAULT_TOKEN_MODE = "merge"

#: The fix when a checkpoint was trained for another token mode.
_TRAIN_FOR = "train a meta-network with --token-mode {mode} or use one trained for it"

#: The plan fields each token mode sets (the other field stays at 1).
_RATIOS = {"prune": ("keep",), "merge": ("merge_keep",), "prune_merge": ("keep", "merge_keep")}


@dataclass(frozen=True)
class Subnet:
    """One member of a sandwich: its role, its plan and the execution mode it runs in."""

    role: str
    """"largest", "smallest" or "random{i}"."""
    plan: Plan
    mode: str = "physical"


# ----------------------------------------------------------------------------- keep ratios
def token_ratios(space: SearchSpace) -> tuple[str, ...]:
    """The plan fields (``keep``, ``merge_keep``) the space's token mode decides."""
    return _RATIOS[space.token_mode]


def keep_choices(space: SearchSpace) -> torch.Tensor | None:
    """The keep ratios a plan may use when the space has a ``keep_grid``: the grid's points in
    ``[min_keep, 1]`` (as :func:`~prance.plan.snap_keep` computes them) and 1; None when continuous."""
    if space.keep_grid <= 0:
        return None
    grid = space.keep_grid
    first, last = max(1, math.ceil(space.min_keep / grid - 1e-9)), math.floor(1.0 / grid + 1e-9)
    points = torch.arange(first, last + 1, dtype=torch.float64) * grid
    return torch.unique(torch.cat([points.clamp_max(1.0), torch.ones(1, dtype=torch.float64)]))


def min_keep_ratio(space: SearchSpace) -> float:
    """The smallest keep ratio a plan of the space may use (``min_keep``, or the grid point above it)."""
    choices = keep_choices(space)
    return space.min_keep if choices is None else float(choices[0])


def random_keep(space: SearchSpace, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Keep ratios of ``shape``: uniform in ``[min_keep, 1]``, or uniform over the grid's points."""
    choices = keep_choices(space)
    if choices is not None:
        return choices[torch.randint(len(choices), shape, generator=generator)]
    lo = space.min_keep
    return lo + (1.0 - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)


def with_keep(plan: Plan, space: SearchSpace, keep: float) -> Plan:
    """``plan`` with every ratio of the space's token mode at ``keep`` in stages 1.. (e.g. a sweep's ladder)."""
    values = torch.full((plan.batch_size, len(token_ratios(space)), plan.keep.shape[1] - 1), keep, dtype=torch.float64)
    return _with_ratios(plan, space, values)


def _with_ratios(plan: Plan, space: SearchSpace, values: torch.Tensor) -> Plan:
    """``plan`` with the token mode's ratios of stages 1.. set to ``values`` ``[rows, len(fields), S-1]``."""
    fields = {"keep": plan.keep.clone(), "merge_keep": plan.merge_keep.clone()}
    for i, name in enumerate(token_ratios(space)):
        fields[name][:, 1:] = values[:, i]
    return Plan(plan.widths, plan.mlp_ratios, plan.heads, fields["keep"], fields["merge_keep"])


# ----------------------------------------------------------------------------- the sandwich
def largest_subnet(config: ViTConfig) -> Plan:
    """Every width, MLP ratio and head at maximum, every token kept."""
    return Plan.full(config)


def smallest_subnet(config: ViTConfig, space: SearchSpace) -> Plan:
    """The smallest widths, MLP ratios and heads of the space, and the fewest tokens: every ratio
    of the token mode at ``min_keep`` (stage 0 always runs at full size)."""
    return with_keep(Plan.smallest(config, space), space, min_keep_ratio(space))


def random_subnet(config: ViTConfig, space: SearchSpace, rows: int, generator: torch.Generator | None) -> Plan:
    """``rows`` independent random plans over the whole space, keep ratios included."""
    plan = Plan.random(config, space, rows, generator)
    s = config.num_stages
    return _with_ratios(plan, space, random_keep(space, (rows, len(token_ratios(space)), s - 1), generator))


def sample_subnets(
    config: ViTConfig,
    space: SearchSpace,
    num_random: int,
    generator: torch.Generator,
    batch: int,
    random_subnets: str = "per-image",
) -> list[Subnet]:
    """The sandwich of one step: largest, smallest and ``num_random`` random subnets.

    ``random_subnets="per-image"``: each random subnet is a plan row per image (``batch``
    rows), run in masked mode. ``"batch-shared"``: one plan for the batch, run physically.
    """
    if random_subnets not in RANDOM_SUBNETS:
        raise PranceError(f"unknown random-subnet sampling {random_subnets!r}; use {' or '.join(RANDOM_SUBNETS)}")
    per_image = random_subnets == "per-image"
    subnets = [Subnet("largest", largest_subnet(config)), Subnet("smallest", smallest_subnet(config, space))]
    for i in range(num_random):
        plan = random_subnet(config, space, batch if per_image else 1, generator)
        subnets.append(Subnet(f"random{i}", plan, "masked" if per_image else "physical"))
    return subnets


# ----------------------------------------------------------------------------- what a checkpoint was trained for
def plan_token_mode(plan: Plan) -> str | None:
    """The token mode a plan needs: "prune", "merge", "prune_merge", or None (no token reduction)."""
    prunes, merges = bool((plan.keep < 1).any()), bool((plan.merge_keep < 1).any())
    return {(True, False): "prune", (False, True): "merge", (True, True): "prune_merge"}.get((prunes, merges))


def require_trained_for(
    ckpt: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    token_mode: str | None = None,
    space: SearchSpace | None = None,
    plans: Sequence[Plan] = (),
) -> None:
    """Refuse, in one line naming the fix, a checkpoint not trained for what a later stage asks.

    ``token_mode``: the mode the caller runs (a plan that only prunes also fits a prune-merge
    network); ``space``: every choice the caller (e.g. the selector) may take must lie in the
    space the network was trained for, keep ratios not below its ``min_keep``; ``plans``:
    static plans to run. A dense checkpoint was trained for no subnet, so it passes: its
    slices are evaluated on purpose, e.g. as the sweep's comparison.
    """
    if ckpt.get("kind") == "dense":
        return
    trained = SearchSpace.from_dict(dict(ckpt["space"]))
    if token_mode is not None:
        _require_space(trained, replace(trained, token_mode=token_mode), path)
    if space is not None:
        _require_space(trained, space, path)
    for plan in plans:
        needed = plan_token_mode(plan)
        if needed is not None and needed != trained.token_mode and trained.token_mode != "prune_merge":
            raise PranceError(f"{path} was trained for token mode {trained.token_mode!r}, but the plan needs "
                              f"{needed!r} ({' and '.join(_RATIOS[needed])} below 1); give a plan in "
                              f"{trained.token_mode!r} mode or " + _TRAIN_FOR.format(mode=needed))
        low = min(float(plan.keep[:, 1:].min()), float(plan.merge_keep[:, 1:].min()), 1.0)
        if low < trained.min_keep - 1e-9:
            raise PranceError(f"{path} was trained for keep ratios down to min_keep {trained.min_keep:g}, but the "
                              f"plan keeps {low:g}; raise the plan's keep ratios or train with --min-keep {low:g}")


def _require_space(trained: SearchSpace, wanted: SearchSpace, path: str | os.PathLike[str]) -> None:
    if wanted.token_mode != trained.token_mode:
        raise PranceError(f"{path} was trained for token mode {trained.token_mode!r}, not {wanted.token_mode!r}; "
                          + _TRAIN_FOR.format(mode=wanted.token_mode))
    for name, flag in (("widths", "--widths"), ("mlp_ratios", "--mlp-ratios")):
        extra = sorted(set(getattr(wanted, name)) - set(getattr(trained, name)))
        if extra:
            raise PranceError(f"{path} was trained for {name} {list(getattr(trained, name))}, not {extra}; use "
                              f"choices it was trained for or train a meta-network with {flag} covering them")
    if wanted.elastic_heads and (not trained.elastic_heads or not set(wanted.heads) <= set(trained.heads)):
        raise PranceError(f"{path} was not trained for head counts {list(wanted.heads)}; use fixed heads or train "
                          "a meta-network with --elastic-heads")
    if wanted.min_keep < trained.min_keep - 1e-9:
        raise PranceError(f"{path} was trained for keep ratios down to min_keep {trained.min_keep:g}, not "
                          f"{wanted.min_keep:g}; raise min_keep or train with --min-keep {wanted.min_keep:g}")
    if trained.keep_grid > 0:
        wanted_grid = keep_choices(wanted)
        on_grid = wanted_grid is not None and torch.equal(snap_keep(wanted_grid, trained.keep_grid), wanted_grid)
        if not on_grid:
            raise PranceError(f"{path} was trained for keep ratios on a {trained.keep_grid:g} grid only; use "
                              f"--keep-grid {trained.keep_grid:g} or train with --keep-grid 0 (continuous)")


__all__ = [
    "DEFAULT_TOKEN_MODE",
    "RANDOM_SUBNETS",
    "Subnet",
    "keep_choices",
    "largest_subnet",
    "min_keep_ratio",
    "plan_token_mode",
    "random_keep",
    "random_subnet",
    "require_trained_for",
    "sample_subnets",
    "smallest_subnet",
    "token_ratios",
    "with_keep",
]
