"""What is timed: each method as a callable with its exact per-image cost, built at matched MACs.

Methods, all on the same weights and the same input batches:

* ``dense-timm``    — timm's ``VisionTransformer`` of the same shape (the speed-up reference);
* ``dense``         — our :class:`~prance.model.MetaViT` at full size;
* ``evit``          — :class:`~prance.tokens.EViTReducer` at the stage starts, keep rate matched to the target MACs;
* ``tome``          — :class:`~prance.tokens.ToMeReducer` with ``r`` matched to the target MACs;
* ``static-subnet`` — one plan for every image (a sweep's YAML, or the closest uniform subnet);
* ``prance``        — :class:`~prance.engine.DynamicExecutor` with one plan per image, or, for an
  :class:`~prance.adaptive.AdaptiveViT`, its whole forward: the selector decides, the engine executes;
* ``prance-padded`` — the same with ``attention="padded"`` (one attention call per block).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from prance.accounting import macs_per_sample, params_per_sample, token_fractions
from prance.adaptive import AdaptiveViT, ImageStats
from prance.bench.plans import RANDOM_PLANS_LABEL, SELECTOR_PLANS_LABEL, random_plans
from prance.errors import PranceError
from prance.model.metavit import MetaViT
from prance.plan import Plan

METHODS = ("dense-timm", "dense", "evit", "tome", "static-subnet", "prance", "prance-padded")
#: A uniform channel-only subnet this close to the target (fraction of dense MACs) is preferred to token pruning.
STATIC_TOLERANCE = 0.02


@dataclass
class Method:
    """One benchmarked way of running the model: a callable plus its exact per-image cost.

    ``forward(x, j)`` runs input batch ``j`` (per-image methods look their plans up by ``j``).
    Costs are given per pooled image, so a batch's cost is the mean over its images' rows.
    """

    name: str
    forward: Callable[[torch.Tensor, int], torch.Tensor]
    macs: torch.Tensor  # [pool] MACs of each pooled image
    params: torch.Tensor  # [pool] activated parameters of each pooled image
    tokens: torch.Tensor  # [pool] token fraction of each pooled image (see token_fraction)
    settings: dict[str, Any] = field(default_factory=dict)
    pool_plans: Plan | None = None  # [pool] per-image plans (per-image methods only)
    decides: Callable[[torch.Tensor], Plan] | None = None  # runs a batch untimed, returns the plans it executed


def reducer_macs(model: MetaViT, reducer: Any) -> int:
    """MACs per image of the full-size model with a static token reducer."""
    return int(macs_per_sample(model, None, reducer)[0])


def token_fraction(model: MetaViT, plan: Plan | None = None, reducer: Any = None) -> torch.Tensor:
    """``[B]`` mean over stages of the fraction of patch tokens each stage ends with (as ``evaluate`` reports)."""
    plan = Plan.full(model.config) if plan is None else plan
    return token_fractions(model.config, plan, reducer).mean(1)


def stage_starts(model: MetaViT) -> list[int]:
    """Blocks where PRANCE decides (and EViT prunes): the first block of stages 1.."""
    cfg = model.config
    return [s * cfg.stage_depth for s in range(1, cfg.num_stages)]


def match_evit_keep(model: MetaViT, target: float) -> float:
    """The EViT keep rate (at the stage starts) whose MACs are closest to ``target`` × dense."""
    from prance.tokens.baselines import EViTReducer

    dense, blocks = float(macs_per_sample(model)[0]), stage_starts(model)
    n = model.config.num_patches
    # MACs only change where round(keep · patches) does: try every kept count of the first reduction.
    candidates = sorted({round(k / n, 6) for k in range(1, n + 1)} | {round(i / 100, 2) for i in range(1, 101)})
    best = min(candidates, key=lambda k: (abs(reducer_macs(model, EViTReducer(k, blocks)) / dense - target), -k))
    return float(best)


def match_tome_r(model: MetaViT, target: float) -> int:
    """The ToMe merges per block whose MACs are closest to ``target`` × dense."""
    from prance.tokens.baselines import ToMeReducer

    dense = float(macs_per_sample(model)[0])
    return min(range(model.config.num_patches // 2 + 1),
               key=lambda r: (abs(reducer_macs(model, ToMeReducer(r)) / dense - target), r))


def _token_kwargs(model: MetaViT, keep: float) -> dict[str, float]:
    """``keep`` as the plan field the search space's token mode uses."""
    return {"merge_keep": keep} if model.space.token_mode == "merge" else {"keep": keep}


def search_static_plan(model: MetaViT, target: float) -> Plan:
    """The uniform subnet (one width and MLP ratio for stages 1..) closest to ``target`` × dense MACs.

    Channel-only subnets are searched first; token pruning (one keep ratio for stages 1..,
    in steps of 0.05) is added only when none is within :data:`STATIC_TOLERANCE` of the target.
    """
    cfg, space = model.config, model.space
    dense = float(macs_per_sample(cfg)[0])
    k = cfg.stage_depth

    def plans(keeps: Sequence[float]) -> list[Plan]:
        return [Plan.uniform(cfg, [cfg.embed_dim] + [w] * (cfg.num_stages - 1),
                             [cfg.mlp_ratio] * k + [r] * (cfg.depth - k), **_token_kwargs(model, keep))
                for keep in keeps for w in reversed(space.widths) for r in reversed(space.mlp_ratios)]

    def closest(candidates: list[Plan]) -> tuple[float, Plan]:
        fractions = macs_per_sample(cfg, Plan.cat(candidates)).double() / dense
        i = int((fractions - target).abs().argmin())
        return abs(float(fractions[i]) - target), candidates[i]

    error, plan = closest(plans([1.0]))
    if error > STATIC_TOLERANCE:
        steps = [round(1.0 - 0.05 * i, 2) for i in range(20)]
        error2, plan2 = closest(plans([s for s in steps if s >= space.min_keep]))
        if error2 < error:
            plan = plan2
    return plan




@dataclass(frozen=True)
class MethodOptions:
    """How the methods meet the MACs target; None means chosen automatically."""

    evit_keep: float | None = None
    tome_r: int | None = None
    static_plans: Sequence[tuple[str, Plan]] | None = None
    """Named candidates for the static subnet, the one closest to the target used (default: a search)."""
    static_source: str | None = None
    plans: Plan | None = None
    """Per-image plans for the PRANCE methods (default: random plans at the target)."""
    plans_label: str | None = None
    keep_grid: float | None = None
    distinct_plans: int | None = None
    """Random plans only: deal out this many distinct plans instead of one per image."""
    adaptive: AdaptiveViT | None = None
    """PRANCE is this adaptive model deciding for itself (its meta-network is the model benchmarked)."""
    decisions: ImageStats | None = None
    """With ``adaptive``: its decisions on the pooled images (:func:`~prance.bench.plans.selector_plans`)."""


def build_methods(
    model: MetaViT,
    names: Sequence[str],
    pool: int,
    target: float,
    batch_plans: Callable[[int], Plan],
    options: MethodOptions | None = None,
    *,
    seed: int = 0,
) -> dict[str, Method]:
    """The requested methods on ``model``'s weights, costed per pooled image.

    Per-image plans (``plans``, cycled to ``pool`` rows, or random ones at the target) are
    one per pooled image; a per-image method's ``forward(x, j)`` runs ``x`` with the plans
    ``batch_plans(j)`` (the rows of the images in batch ``j``). With ``options.adaptive`` the
    PRANCE methods run the adaptive model itself, costed by its ``options.decisions``.
    """
    from prance.engine import DynamicExecutor
    from prance.model.timm_interop import timm_kwargs, to_timm_state_dict
    from prance.tokens.baselines import EViTReducer, ToMeReducer

    o = options or MethodOptions()
    evit_keep, tome_r, keep_grid = o.evit_keep, o.tome_r, o.keep_grid
    plans, plans_label = o.plans, o.plans_label
    cfg = model.config
    full = Plan.full(cfg)
    dense_params = params_per_sample(model, full).expand(pool)
    ones = torch.ones(pool, dtype=torch.float64)
    dense_macs = macs_per_sample(model, full).expand(pool)
    out: dict[str, Method] = {}

    def static(name: str, fn: Callable[[torch.Tensor], torch.Tensor], macs: int, params: torch.Tensor,
               tokens: float, settings: dict[str, Any]) -> None:
        out[name] = Method(name, lambda x, j: fn(x), torch.full((pool,), macs, dtype=torch.int64),
                           params.expand(pool), ones * tokens, settings)

    for name in names:
        if name == "dense-timm":
            from timm.models.vision_transformer import VisionTransformer

            ref = VisionTransformer(**timm_kwargs(cfg)).eval()
            ref.load_state_dict(to_timm_state_dict(model), strict=True)
            ref = ref.to(model.head.weight.device, model.head.weight.dtype)
            static(name, ref, int(dense_macs[0]), dense_params, 1.0,
                   {"model": "timm.models.vision_transformer.VisionTransformer", "weights": "same as dense"})
        elif name == "dense":
            static(name, model, int(dense_macs[0]), dense_params, 1.0, {"model": "MetaViT, full size"})
        elif name == "evit":
            keep = match_evit_keep(model, target) if evit_keep is None else evit_keep
            reducer = EViTReducer(keep, stage_starts(model))
            static(name, lambda x, r=reducer: model(x, reducer=r), reducer_macs(model, reducer), dense_params,
                   float(token_fraction(model, reducer=reducer)[0]),
                   {"keep_rate": keep, "blocks": stage_starts(model), "matched": evit_keep is None})
        elif name == "tome":
            r = match_tome_r(model, target) if tome_r is None else tome_r
            reducer = ToMeReducer(r)
            static(name, lambda x, red=reducer: model(x, reducer=red), reducer_macs(model, reducer), dense_params,
                   float(token_fraction(model, reducer=reducer)[0]), {"r": r, "matched": tome_r is None})
        elif name == "static-subnet":
            if o.static_plans:
                plan_name, plan = closest_plan(model, o.static_plans, target)
                label = f"plan {plan_name!r} from {o.static_source or 'the given plans'}"
            else:
                plan = search_static_plan(model, target)
                label = "closest uniform subnet to the target MACs (small search)"
            static(name, lambda x, p=plan: model(x, p), int(macs_per_sample(model, plan)[0]),
                   params_per_sample(model, plan), float(token_fraction(model, plan)[0]),
                   {"plan": plan.to_dict(), "source": label})
        elif name in ("prance", "prance-padded") and o.adaptive is not None:
            out[name] = adaptive_method(name, o.adaptive, o.decisions, pool)
        elif name in ("prance", "prance-padded"):
            if plans is None:
                plans = random_plans(model, target, pool, seed=seed, keep_grid=keep_grid, distinct=o.distinct_plans)
                plans_label = RANDOM_PLANS_LABEL
                if o.distinct_plans is not None:
                    plans_label += f", {o.distinct_plans} distinct plans dealt out to the images"
            rows = plans.select(torch.arange(pool) % plans.batch_size) if plans.batch_size != pool else plans
            engine = DynamicExecutor(model, "padded" if name == "prance-padded" else "auto")
            out[name] = Method(name, lambda x, j, e=engine: e(x, batch_plans(j)), macs_per_sample(model, rows),
                               params_per_sample(model, rows), token_fraction(model, rows),
                               {"plans": plans_label, "attention": engine.attention,
                                "keep_grid": model.space.keep_grid if keep_grid is None else keep_grid},
                               pool_plans=rows)
        else:
            raise PranceError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return out


def closest_plan(model: MetaViT, named: Sequence[tuple[str, Plan]], target: float) -> tuple[str, Plan]:
    """The named one-row plan whose MACs are closest to ``target`` × dense."""
    dense = float(macs_per_sample(model.config)[0])
    return min(named, key=lambda p: abs(float(macs_per_sample(model.config, p[1])[0]) / dense - target))


def adaptive_method(name: str, adaptive: AdaptiveViT, decisions: ImageStats | None, pool: int) -> Method:
    """PRANCE as deployed: ``adaptive``'s full forward (selector + engine) on each batch, costed by
    ``decisions`` (its plans for the ``pool`` images, selector MACs included). ``prance-padded``
    runs a shallow copy whose engine pads attention (same weights, same selector)."""
    from prance.engine import DynamicExecutor

    if decisions is None or len(decisions.macs) != pool:
        raise PranceError(f"an adaptive model needs its decisions on the {pool} pooled images; compute them with "
                          "prance.bench.plans.selector_plans")
    net = adaptive
    if name == "prance-padded":
        net = copy.copy(adaptive)  # shares modules and settings; only the engine differs
        net.engine = DynamicExecutor(adaptive.model, "padded")

    def decide(x: torch.Tensor) -> Plan:
        with torch.inference_mode():
            net(x)
        return net.last.plan  # type: ignore[union-attr]  # set by the call

    return Method(name, lambda x, j: net(x), decisions.macs, decisions.params, decisions.tokens.mean(1),
                  {"plans": SELECTOR_PLANS_LABEL, "attention": net.engine.attention, "budget": adaptive.budget,
                   "selector_macs": adaptive.selector.macs_per_image(),
                   "representatives": adaptive.representatives is not None},
                  pool_plans=decisions.plan, decides=decide)
