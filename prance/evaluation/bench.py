"""Wall-clock benchmark of PRANCE and its baselines at matched MACs (DESIGN.md §5, §6).

In the manner of timm's ``benchmark.py``: every input is a tensor made before timing starts
(data loading is never timed), each method gets warm-up calls and then timed calls under
``torch.inference_mode()``, and the result is a list of rows (JSON) plus a table and a plot.

Methods, all on the same weights and the same input batches:

* ``dense-timm``    — timm's ``VisionTransformer`` of the same shape (the speed-up reference);
* ``dense``         — our :class:`~prance.model.MetaViT` at full size;
* ``evit``          — :class:`~prance.tokens.EViTReducer` at the stage starts, keep rate matched to the target MACs;
* ``tome``          — :class:`~prance.tokens.ToMeReducer` with ``r`` matched to the target MACs;
* ``static-subnet`` — one plan for every image (a sweep's YAML, or the closest uniform subnet);
* ``prance``        — :class:`~prance.engine.DynamicExecutor` with one plan per image;
* ``prance-padded`` — the same with ``attention="padded"`` (one attention call per block).

Per-image plans come from a file or, until a trained selector exists, are *random per-image
plans* selected so their mean MACs hit the target; the output says which.

Before timing, glibc's allocator is told to keep freed memory (:func:`steady_allocator`), so
no method pays page faults for its activations; ``--profile`` adds, per method and batch
size, the operators the time went to. ``--distinct-plans K`` deals out only K random plans,
to show how the engine's speed depends on how diverse the per-image decisions are.

Timed runs are split into ``rounds``: in each round every method runs its share of timed calls
back to back (after one untimed call that re-warms the caches), and the method order rotates.
On a shared machine this keeps slow drifts in load from biasing one method, so the
speed-up ratios of one run are comparable even when absolute times are noisy.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from prance.accounting import macs_per_sample, params_per_sample, token_fractions
from prance.errors import PranceError
from prance.files import check_writable_dir
from prance.model.metavit import MetaViT
from prance.plan import Plan

METHODS = ("dense-timm", "dense", "evit", "tome", "static-subnet", "prance", "prance-padded")
DEFAULT_BATCH_SIZES = (1, 8, 64)
RANDOM_PLANS_LABEL = "random per-image plans (no trained selector yet), mean MACs matched to the target"
#: A uniform channel-only subnet this close to the target (fraction of dense MACs) is preferred to token pruning.
STATIC_TOLERANCE = 0.02


# ----------------------------------------------------------------------------- methods
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


def random_plans(model: MetaViT, target: float, size: int, seed: int = 0, keep_grid: float | None = None,
                 oversample: int = 32, distinct: int | None = None) -> Plan:
    """``size`` random per-image plans whose mean MACs are ``target`` × dense (as near as possible).

    Draws ``oversample × size`` plans of :meth:`Plan.random` (keep ratios uniform in
    ``[min_keep, 1]``, snapped to ``keep_grid`` if given), then selects ``size`` of them by
    exponentially tilted sampling without replacement (the tilt is bisected until the mean
    matches) and polishes the mean with single swaps. Stand-in for a trained selector.

    ``distinct = K`` draws only K such plans and deals them out to the ``size`` images in a
    random order (as evenly as possible): a selector whose decisions are less diverse.
    """
    if distinct is not None:
        if not 1 <= distinct <= size:
            raise PranceError(f"distinct plans must be between 1 and the pool size {size}, got {distinct}")
        few = random_plans(model, target, distinct, seed, keep_grid, oversample)
        g = torch.Generator().manual_seed(seed + 1)
        return few.select((torch.arange(size) % distinct)[torch.randperm(size, generator=g)])
    cfg, space = model.config, model.space
    if keep_grid is not None:
        space = replace(space, keep_grid=keep_grid)
    g = torch.Generator().manual_seed(seed)
    pool = Plan.random(cfg, space, size * oversample, generator=g, keep_range=(space.min_keep, 1.0))
    fractions = macs_per_sample(cfg, pool).double() / float(macs_per_sample(cfg)[0])
    index = select_mean(fractions, size, target, g)
    return pool.select(index)


def select_mean(values: torch.Tensor, k: int, target: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of ``k`` distinct entries of ``values`` whose mean is as close to ``target`` as found."""
    if k > len(values):
        raise PranceError(f"cannot select {k} of {len(values)} values")
    log_u = torch.rand(len(values), generator=generator, dtype=torch.float64).clamp_min(1e-300).log()

    def pick(lam: float) -> torch.Tensor:  # Efraimidis–Spirakis with weights exp(-lam · value)
        keys = log_u * torch.exp(lam * (values - values.mean()))
        return keys.topk(k).indices

    lo, hi = -200.0, 200.0  # larger lam favours smaller values
    best = pick(0.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        chosen = pick(mid)
        mean = float(values[chosen].mean())
        if abs(mean - target) < abs(float(values[best].mean()) - target):
            best = chosen
        lo, hi = (mid, hi) if mean > target else (lo, mid)
    chosen = best.clone()
    inside = torch.zeros(len(values), dtype=torch.bool)
    inside[chosen] = True
    for _ in range(4 * k):  # swap one in, one out, while that brings the mean closer
        need = k * (target - float(values[chosen].mean()))
        outside = (~inside).nonzero().flatten()
        if len(outside) == 0:
            break
        delta = values[outside][None, :] - values[chosen][:, None]  # [k, out]
        err = (delta - need).abs()
        flat = int(err.argmin())
        i, j = divmod(flat, len(outside))
        if float(err.view(-1)[flat]) >= abs(need) - 1e-12:
            break
        inside[chosen[i]] = False
        inside[outside[j]] = True
        chosen[i] = outside[j]
    return chosen


def load_plans(path: str | os.PathLike[str], model: MetaViT) -> tuple[Plan, str]:
    """Per-image plans from a file: a YAML mapping/list of plans, or ``torch.save`` of a :class:`Plan`.

    A saved plan may also be a dict of its five tensors or a list of Plans.
    """
    keys = [f.name for f in fields(Plan)]
    cfg, space = model.config, model.space
    path = Path(path)
    if not path.is_file():
        raise PranceError(f"--plans {path}: file not found; give a YAML plan list or a torch.save'd Plan")
    if path.suffix.lower() in (".yaml", ".yml"):
        from prance.evaluation.evaluate import plans_from_spec

        plan = Plan.cat([p for _, p in plans_from_spec(str(path), cfg, space)])
    else:
        try:
            with torch.serialization.safe_globals([Plan]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for foreign or corrupt files
            raise PranceError(f"cannot read plans {path} ({type(e).__name__}); save a Plan with torch.save "
                              "or write a YAML list of plans") from None
        if isinstance(obj, dict) and set(obj) == set(keys):
            obj = Plan(**{k: torch.as_tensor(obj[k]) for k in keys})
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(p, Plan) for p in obj):
            obj = Plan.cat(list(obj))
        if not isinstance(obj, Plan):
            raise PranceError(f"plans file {path} holds a {type(obj).__name__}, not a Plan; save a Plan "
                              "(one row per image) with torch.save")
        plan = obj
    return plan.validate(cfg, space), f"per-image plans from {path} ({plan.batch_size} rows)"


def load_static_plan(path: str | os.PathLike[str], model: MetaViT, target: float) -> tuple[Plan, str]:
    """A static plan from a sweep YAML; with several plans, the one closest to the target MACs."""
    from prance.evaluation.evaluate import plans_from_spec

    if not Path(path).is_file():
        raise PranceError(f"--static-plan {path}: file not found; give the plan YAML written by the sweep")
    named = plans_from_spec(str(path), model.config, model.space)
    dense = float(macs_per_sample(model.config)[0])
    name, plan = min(named, key=lambda p: abs(float(macs_per_sample(model.config, p[1])[0]) / dense - target))
    return plan, f"plan {name!r} from {path}"


@dataclass(frozen=True)
class MethodOptions:
    """How the methods meet the MACs target; None means chosen automatically."""

    evit_keep: float | None = None
    tome_r: int | None = None
    static_plan: Plan | None = None
    static_label: str | None = None
    plans: Plan | None = None
    """Per-image plans for the PRANCE methods (default: random plans at the target)."""
    plans_label: str | None = None
    keep_grid: float | None = None
    distinct_plans: int | None = None
    """Random plans only: deal out this many distinct plans instead of one per image."""


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
    ``batch_plans(j)`` (the rows of the images in batch ``j``).
    """
    from prance.engine import DynamicExecutor
    from prance.model.timm_interop import timm_kwargs, to_timm_state_dict
    from prance.tokens.baselines import EViTReducer, ToMeReducer

    o = options or MethodOptions()
    evit_keep, tome_r, static_plan, keep_grid = o.evit_keep, o.tome_r, o.static_plan, o.keep_grid
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
            plan = search_static_plan(model, target) if static_plan is None else static_plan
            label = o.static_label or "closest uniform subnet to the target MACs (small search)"
            static(name, lambda x, p=plan: model(x, p), int(macs_per_sample(model, plan)[0]),
                   params_per_sample(model, plan), float(token_fraction(model, plan)[0]),
                   {"plan": plan.to_dict(), "source": label})
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


# ----------------------------------------------------------------------------- timing
def _check_args(batch_sizes: Sequence[int], methods: Sequence[str], target: float, runs: int, warmup: int,
                rounds: int) -> None:
    if not batch_sizes:
        raise PranceError("give at least one batch size, e.g. --batch-sizes 1,8,64")
    bad = [b for b in batch_sizes if not isinstance(b, int) or b < 1]
    if bad:
        raise PranceError(f"batch sizes must be positive whole numbers, got {bad[0]}; e.g. --batch-sizes 1,8,64")
    if not methods:
        raise PranceError(f"give at least one method: {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PranceError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if "dense-timm" not in methods and "dense" not in methods:
        raise PranceError("speed-ups need a reference: include dense-timm (or dense) in --methods")
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= 1):
        raise PranceError(f"--target-macs is a fraction of the dense MACs in (0, 1], got {target}")
    if runs < 1:
        raise PranceError(f"--runs must be at least 1, got {runs}")
    if warmup < 0:
        raise PranceError(f"--warmup must be >= 0, got {warmup}")
    if rounds < 1:
        raise PranceError(f"--rounds must be at least 1, got {rounds}")


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), for a handful of timings."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def benchmark(
    model: MetaViT,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    methods: Sequence[str] = METHODS,
    target_macs: float = 0.5,
    runs: int = 20,
    warmup: int = 5,
    rounds: int = 4,
    images: torch.Tensor | None = None,
    images_label: str | None = None,
    pool: int | None = None,
    options: MethodOptions | None = None,
    seed: int = 0,
    model_label: str = "model",
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    profile_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Time every method at every batch size; returns ``{"meta": {...}, "rows": [...]}``.

    With ``profile_dir``, each method is also run under ``torch.profiler`` after its timing
    and the operators it spent its time in are written to ``profile-<method>-b<batch>.txt``.

    ``images`` (pre-loaded, ``[N, C, H, W]``) are cycled through; without them random
    normal images are made. ``pool`` images (default: at least 64 and the largest batch)
    are split into batches, and timed run ``k`` uses batch ``k`` mod the number of batches,
    so at small batch sizes per-image plans vary from run to run as they would in use.
    MACs, parameters and tokens of per-image methods are averaged over the images of the
    timed runs.
    """
    methods = list(dict.fromkeys(methods))
    batch_sizes = list(batch_sizes)
    _check_args(batch_sizes, methods, target_macs, runs, warmup, rounds)
    rounds = min(rounds, runs)
    log = log or (lambda s: None)
    device = torch.device(device)
    model = model.eval().to(device)
    cfg = model.config
    pool = max(64, *batch_sizes) if pool is None else pool
    if pool < max(batch_sizes):
        raise PranceError(f"the image pool ({pool}) must hold the largest batch ({max(batch_sizes)})")
    if images is None:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(pool, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
        images_label = images_label or f"random normal images ({pool}, pre-generated)"
    else:
        model.check_input(images)
        images = images[torch.arange(pool) % len(images)].contiguous()
        images_label = images_label or f"{len(images)} pre-loaded images"

    allocator = steady_allocator()
    layout: dict[str, list[Plan]] = {"plans": []}  # per-image plans of each batch, for the current batch size
    built = build_methods(model, methods, pool, target_macs, lambda j: layout["plans"][j], options, seed=seed)
    reference = "dense-timm" if "dense-timm" in built else "dense"
    pool_plans = next((m.pool_plans for m in built.values() if m.pool_plans is not None), None)
    dense_macs = float(macs_per_sample(cfg)[0])
    load_before = _loadavg()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for b in batch_sizes:
        n_batches = max(1, min(pool // b, warmup + runs + rounds))
        index = [torch.arange(j * b, (j + 1) * b) for j in range(n_batches)]
        xs = [images[i].to(device, model.head.weight.dtype).contiguous() for i in index]
        layout["plans"] = [pool_plans.select(i) for i in index] if pool_plans is not None else []
        log(f"batch {b}: {len(built)} methods x ({warmup} warm-up + {runs} timed runs in {rounds} rounds) "
            f"over {n_batches} distinct batch(es)")
        times = _time_methods(list(built.values()), xs, runs, warmup, rounds)
        batch_rows = []
        for name, m in built.items():
            timed = torch.cat([index[j] for j, _ in times[name]])
            batch_rows.append(_row(m, b, [t for _, t in times[name]], timed, dense_macs))
        ref = next(r for r in batch_rows if r["method"] == reference)
        for row in batch_rows:
            row["speedup"] = ref["ms_median"] / row["ms_median"]
            row["ideal_speedup"] = ref["gmacs"] / row["gmacs"]
            row["efficiency"] = row["speedup"] / row["ideal_speedup"]
            log(f"  {row['method']:>14}: {row['ms_median']:9.2f} ms/batch  speed-up {row['speedup']:.2f}x "
                f"(ideal {row['ideal_speedup']:.2f}x)")
        rows.extend(batch_rows)
        if profile_dir is not None:
            for name, m in built.items():
                path = write_profile(m, xs, Path(profile_dir) / f"profile-{name}-b{b}.txt", calls=max(1, min(runs, 5)))
                log(f"  profile of {name} -> {path}")
    meta = _meta(model, model_label, built, reference, batch_sizes, target_macs, runs, warmup, rounds, pool,
                 images_label, seed, command, load_before, time.perf_counter() - started)
    meta["allocator"] = allocator
    meta["device"] = str(device)
    meta["dtype"] = str(model.head.weight.dtype).removeprefix("torch.")
    return {"meta": meta, "rows": rows}


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator() -> str:
    """Keep freed memory for reuse, so no method is timed paging fresh memory in (glibc only).

    By default glibc hands blocks above a moving threshold back to the kernel on free, and the
    next call of the same size page-faults them in again. That costs the dense baselines, with
    their large activations, up to 20 % of their time on this CPU and makes them noisy.
    Raising the mmap and trim thresholds (as ``GLIBC_TUNABLES`` would) keeps every method on
    warm memory. Returns what was done, for the result's metadata.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.libc_ver()[0] != "glibc":
        return "system default (not glibc)"
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc, mmap/trim thresholds raised to 256 MiB / 1 GiB" if ok else "glibc default (mallopt failed)"


def write_profile(method: Method, xs: list[torch.Tensor], path: Path, calls: int = 5, rows: int = 25) -> Path:
    """Where ``method``'s time goes: torch.profiler operator totals over ``calls`` calls, per call."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        method.forward(xs[0], 0)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for k in range(calls):
                method.forward(xs[k % len(xs)], k % len(xs))
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"{method.name}: {calls} call(s), {total / calls / 1e3:.2f} ms of operator self time per call "
             "(profiler overhead included)", "", f"{'operator':<52} {'ms/call':>9} {'share':>7} {'calls/call':>11}"]
    for e in events[:rows]:
        lines.append(f"{e.key[:52]:<52} {e.self_cpu_time_total / calls / 1e3:9.3f} "
                     f"{e.self_cpu_time_total / max(total, 1):7.1%} {e.count / calls:11.1f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _time_methods(methods: list[Method], xs: list[torch.Tensor], runs: int, warmup: int,
                  rounds: int) -> dict[str, list[tuple[int, float]]]:
    """``{method: [(batch index, seconds), ...]}`` of the timed calls (see the module docstring)."""
    calls = {m.name: 0 for m in methods}
    timed: dict[str, list[tuple[int, float]]] = {m.name: [] for m in methods}

    def call(m: Method) -> tuple[int, float]:
        j = calls[m.name] % len(xs)
        calls[m.name] += 1
        synchronize(xs[j].device)  # a GPU times only this call's kernels, all of them
        t0 = time.perf_counter()
        m.forward(xs[j], j)
        synchronize(xs[j].device)
        return j, time.perf_counter() - t0

    with torch.inference_mode():
        for m in methods:
            # Per-image methods warm up on every distinct batch once: the engine caches weight
            # views per (block, size) on first use, a one-time cost that steady serving never pays.
            for _ in range(max(warmup, len(xs)) if m.pool_plans is not None and warmup > 0 else warmup):
                call(m)
        for r, share in enumerate(_split(runs, rounds)):
            for m in methods[r % len(methods):] + methods[: r % len(methods)]:
                if r > 0 or warmup == 0:
                    call(m)  # untimed: re-warm the caches the other methods used
                timed[m.name].extend(call(m) for _ in range(share))
    return timed


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (a no-op on CPU, where calls return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _row(m: Method, batch: int, seconds: list[float], rows: torch.Tensor, dense_macs: float) -> dict[str, Any]:
    ms = [1000 * s for s in seconds]
    median = statistics.median(ms)
    return {
        "method": m.name,
        "batch_size": batch,
        "runs": len(ms),
        "ms_median": median,
        "ms_p10": _quantile(ms, 0.10),
        "ms_p25": _quantile(ms, 0.25),
        "ms_p75": _quantile(ms, 0.75),
        "ms_p90": _quantile(ms, 0.90),
        "images_per_s": 1000 * batch / median,
        "gmacs": float(m.macs[rows].double().mean()) / 1e9,
        "macs_fraction": float(m.macs[rows].double().mean()) / dense_macs,
        "params_m": float(m.params[rows].double().mean()) / 1e6,
        "token_fraction": float(m.tokens[rows].mean()),
        "per_image_plans": m.pool_plans is not None,
        "note": m.settings.get("plans", "") if m.pool_plans is not None else "",
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not every platform has it
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(model: MetaViT, model_label: str, methods: dict[str, Method], reference: str, batch_sizes: list[int],
          target: float, runs: int, warmup: int, rounds: int, pool: int, images_label: str | None, seed: int,
          command: str | None, load_before: list[float] | None, seconds: float) -> dict[str, Any]:
    import timm

    import prance

    dense = float(macs_per_sample(model.config)[0])
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command or "prance.evaluation.bench.benchmark (Python API)",
        "prance_version": prance.__version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "seconds": round(seconds, 2),
        "model": model_label,
        "config": model.config.to_dict(),
        "space": model.space.to_dict(),
        "dense_gmacs": dense / 1e9,
        "target_macs": target,
        "reference": reference,
        "batch_sizes": batch_sizes,
        "runs": runs,
        "warmup": warmup,
        "rounds": rounds,
        "pool": pool,
        "inputs": images_label,
        "seed": seed,
        "inference_mode": True,
        "methods": {name: m.settings for name, m in methods.items()},
    }


# ----------------------------------------------------------------------------- output
_COLUMNS = ("batch", "method", "img/s", "ms/batch", "p10-p90 ms", "GMACs", "MACs", "params M", "tokens",
            "speed-up", "ideal", "eff.")


def format_table(result: dict[str, Any]) -> str:
    """The rows as an aligned text table, with the run's settings and the plan source underneath."""
    meta = result["meta"]
    dense = meta["dense_gmacs"]
    lines = []
    for r in result["rows"]:
        lines.append((str(r["batch_size"]), r["method"] + ("*" if r["per_image_plans"] else ""),
                      f"{r['images_per_s']:.1f}", f"{r['ms_median']:.2f}", f"{r['ms_p10']:.2f}-{r['ms_p90']:.2f}",
                      f"{r['gmacs']:.4f}", f"{r['macs_fraction']:.3f}", f"{r['params_m']:.3f}",
                      f"{r['token_fraction']:.3f}", f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
                      f"{r['efficiency']:.2f}"))
    widths = [max(len(c), *(len(row[i]) for row in lines)) if lines else len(c) for i, c in enumerate(_COLUMNS)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i != 1 else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(_COLUMNS), fmt(["-" * w for w in widths])]
    last_batch = None
    for row in lines:
        if last_batch is not None and row[0] != last_batch:
            out.append("")
        out.append(fmt(row))
        last_batch = row[0]
    out.append("")
    out.append(f"model {meta['model']}; dense {dense:.4f} GMACs; target {meta['target_macs']:g} x dense MACs; "
               f"{meta.get('device', 'cpu')} {meta.get('dtype', 'float32')}, {meta['threads']} thread(s); "
               f"{meta['runs']} timed runs (+{meta['warmup']} warm-up, "
               f"{meta['rounds']} rounds); speed-up = {meta['reference']} median / method median; "
               "ideal = dense MACs / method MACs; eff. = speed-up / ideal; tokens = fraction of patch tokens each "
               "stage ends with, mean over stages")
    settings = meta["methods"]
    for name in ("evit", "tome", "static-subnet"):
        if name in settings:
            shown = {k: v for k, v in settings[name].items() if k != "plan"}
            if name == "static-subnet":
                plan = settings[name]["plan"]
                shown["widths"], shown["mlp_ratios"] = plan["widths"], plan["mlp_ratios"]
                if any(v != 1 for v in plan["keep"] + plan["merge_keep"]):
                    shown["keep"], shown["merge_keep"] = plan["keep"], plan["merge_keep"]
            out.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    per_image = [n for n in ("prance", "prance-padded") if n in settings]
    if per_image:
        out.append(f"* {', '.join(per_image)}: {settings[per_image[0]]['plans']}")
    out.append(f"inputs: {meta['inputs']}; load average {meta['loadavg_before']} -> {meta['loadavg_after']}")
    if "allocator" in meta:
        out.append(f"allocator: {meta['allocator']}")
    return "\n".join(out)


def plot_speedups(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """PNG of speed-up over the reference vs batch size per method; ideal speed-ups dashed."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    meta, rows = result["meta"], result["rows"]
    fig = Figure(figsize=(9.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    colors = {name: f"C{i}" for i, name in enumerate(METHODS)}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in mine]
        label = name + (" (random per-image plans)" if mine[0]["per_image_plans"] and "random" in str(
            meta["methods"][name].get("plans", "")) else "")
        ax.plot(bs, [r["speedup"] for r in mine], "o-", color=colors[name], label=label)
        if name != meta["reference"]:
            ax.plot(bs, [r["ideal_speedup"] for r in mine], "--", color=colors[name], alpha=0.6, linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["batch_size"] for r in rows}), [str(b) for b in sorted({r["batch_size"] for r in rows})])
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"speed-up over {meta['reference']} (median time ratio)")
    ax.set_title(f"{meta['model']}: target {meta['target_macs']:g} x dense MACs, {meta['threads']} thread(s)\n"
                 "solid: measured, dashed: ideal (dense MACs / method MACs)", fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8)
    ax.grid(True, alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike[str], stem: str = "bench") -> tuple[Path, Path]:
    """``out_dir/stem.json`` (rows + metadata) and ``out_dir/stem.png`` (the speed-up plot)."""
    from prance.evaluation.evaluate import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_json(result, out / f"{stem}.json"), plot_speedups(result, out / f"{stem}.png")


# ----------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``prance bench`` options (the CLI adds them to its ``bench`` subcommand)."""
    from prance.model.presets import DEFAULT_PRESET

    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="a prance checkpoint (e.g. RUN/best.pt)")
    src.add_argument("--timm", default=None, metavar="PATH", help="a local timm/DeiT .pth (plain ViT layout)")
    src.add_argument("--preset", default=None,
                     help=f"a preset with random weights (default {DEFAULT_PRESET}; e.g. deit-small, fmnist-tiny)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of a --timm model whose width is not a standard DeiT/ViT width")
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                   help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--target-macs", type=float, default=0.5,
                   help="MACs target as a fraction of dense, in (0, 1] (default 0.5)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per method and batch size (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per method (default 5)")
    p.add_argument("--rounds", type=int, default=4,
                   help="timed runs are split into this many interleaved rounds (default 4; 1 = one method after "
                        "the other, like timm)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; recorded)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu; recorded, and synchronised "
                   "around every timed call)")
    p.add_argument("--evit-keep", type=float, default=None, help="EViT keep rate (default: matched to the target)")
    p.add_argument("--tome-r", type=int, default=None, help="ToMe merges per block (default: matched to the target)")
    p.add_argument("--static-plan", default=None, metavar="YAML",
                   help="static subnet plan from the sweep (default: closest uniform subnet to the target)")
    p.add_argument("--plans", default=None, metavar="FILE",
                   help="per-image plans for prance: torch.save'd Plan or YAML list (default: random per-image "
                        "plans at the target MACs)")
    p.add_argument("--keep-grid", type=float, default=None,
                   help="snap random per-image keep ratios to this step (default: the search space's)")
    p.add_argument("--distinct-plans", type=int, default=None, metavar="K",
                   help="random plans: deal out only K distinct plans (how speed depends on the diversity of "
                        "per-image decisions; default: every image its own)")
    p.add_argument("--profile", action="store_true",
                   help="also write profile-<method>-b<batch>.txt: the operators each method spends its time in")
    p.add_argument("--pool", type=int, default=None,
                   help="images (and per-image plans) cycled through (default: max(64, largest batch))")
    p.add_argument("--data", default=None,
                   help="time on test images of fashion-mnist or folder, or on random ones (random); default: a "
                        "checkpoint's own data set when it records one, else random")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX folder, or an ImageNet-style root (default: the checkpoint's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images and plans (default 0)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png (default bench-results)")


def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PranceError(f"{flag} takes comma-separated whole numbers, got {text!r}; e.g. {flag} 1,8,64") from None


def load_model(checkpoint: str | None = None, timm_path: str | None = None, preset: str | None = None,
               stage_depth: int = 3, num_heads: int | None = None) -> tuple[MetaViT, str]:
    """The model to benchmark and a label for it: a prance checkpoint, a timm .pth or a preset.

    ``stage_depth`` and ``num_heads`` apply to timm weights only (checkpoints and presets carry
    their own); ``num_heads`` is needed for widths other than the published DeiT/ViT ones.
    """
    if checkpoint is not None:
        from prance.training.checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(checkpoint)
        return model_from_checkpoint(ckpt), f"{checkpoint} ({ckpt['kind']})"
    if timm_path is not None:
        from prance.model.timm_interop import from_timm

        return from_timm(timm_path, num_heads=num_heads, stage_depth=stage_depth).eval(), f"{timm_path} (timm weights)"
    from prance.model.presets import DEFAULT_PRESET, create_model

    name = preset or DEFAULT_PRESET
    torch.manual_seed(0)
    return create_model(name).eval(), f"{name} (random weights)"


def load_images(model: MetaViT, data: str | None, data_dir: str | None, n: int, seed: int,
                checkpoint: str | None = None) -> tuple[torch.Tensor | None, str | None]:
    """``n`` test images as one tensor (loaded before any timing), or ``(None, None)`` for random inputs.

    A checkpoint's images are those of the data set it was trained on (``data`` overrides it,
    with the same classes); ``data`` "random", or None without a recorded data set, means random.
    """
    from prance.data.provenance import checkpoint_dataset, trained_on
    from prance.data.splits import final_test_set

    if data == "random":
        return None, None
    if checkpoint is not None:
        from prance.training.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
        if data is None and trained_on(ckpt).data is None:
            return None, None
        ds = checkpoint_dataset(ckpt, checkpoint, data=data, data_dir=data_dir, limit=n, seed=seed)
    elif data is None:
        return None, None
    else:
        cfg = model.config
        ds = final_test_set(data, img_size=cfg.img_size, in_chans=cfg.in_chans, root=data_dir, limit=n, seed=seed)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return images, f"{len(ds)} {ds.info.name} {ds.info.split} images (pre-loaded)"


def run(args: argparse.Namespace, command: str | None = None) -> dict[str, Any]:
    """``prance bench``: check the options, benchmark, print the table, write JSON and PNG.

    ``command`` is recorded in the JSON (default: the equivalent ``prance bench`` command line,
    every option spelled out, so the run can be repeated exactly).
    """
    command = command or _command_line(args)
    batch_sizes = _parse_ints(args.batch_sizes, "--batch-sizes")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    _check_args(batch_sizes, methods, args.target_macs, args.runs, args.warmup, args.rounds)
    if args.threads is not None:
        if args.threads < 1:
            raise PranceError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.pool is not None and args.pool < max(batch_sizes):
        raise PranceError(f"--pool {args.pool} must be at least the largest batch size ({max(batch_sizes)})")
    if args.keep_grid is not None and not 0 < args.keep_grid <= 1:
        raise PranceError(f"--keep-grid must be in (0, 1], got {args.keep_grid}")
    if args.distinct_plans is not None and args.plans is not None:
        raise PranceError("--distinct-plans applies to random plans only; drop it or --plans")
    from prance.devices import resolve_device

    device = resolve_device(getattr(args, "device", "cpu"))
    out = check_writable_dir(args.out)
    model, label = load_model(args.checkpoint, args.timm, args.preset, num_heads=args.num_heads)
    pool = args.pool or max(64, *batch_sizes)
    images, images_label = load_images(model, args.data, args.data_dir, pool, args.seed, args.checkpoint)
    static_plan = static_label = plans = plans_label = None
    if args.static_plan is not None:
        static_plan, static_label = load_static_plan(args.static_plan, model, args.target_macs)
    if args.plans is not None:
        plans, plans_label = load_plans(args.plans, model)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    result = benchmark(model, batch_sizes=batch_sizes, methods=methods, target_macs=args.target_macs,
                       runs=args.runs, warmup=args.warmup, rounds=args.rounds, images=images,
                       images_label=images_label, pool=pool,
                       options=MethodOptions(args.evit_keep, args.tome_r, static_plan, static_label, plans,
                                             plans_label, args.keep_grid, args.distinct_plans),
                       seed=args.seed, model_label=label, command=command, log=log,
                       profile_dir=out if args.profile else None, device=device)
    print(format_table(result))
    json_path, png_path = write_outputs(result, out)
    print(f"wrote {json_path} and {png_path}")
    return result


def _command_line(args: argparse.Namespace) -> str:
    import shlex

    words = ["prance", "bench"]
    for dest, value in vars(args).items():
        if dest in ("func", "command", "debug") or value is None or value is False:
            continue
        words += [f"--{dest.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return shlex.join(words)


__all__ = [
    "METHODS",
    "Method",
    "add_arguments",
    "MethodOptions",
    "benchmark",
    "build_methods",
    "format_table",
    "load_model",
    "load_plans",
    "load_static_plan",
    "match_evit_keep",
    "match_tome_r",
    "plot_speedups",
    "random_plans",
    "reducer_macs",
    "run",
    "search_static_plan",
    "select_mean",
    "token_fraction",
    "write_outputs",
]
