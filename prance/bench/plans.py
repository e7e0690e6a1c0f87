"""The plans the methods run: an adaptive model's own decisions, random plans at a MACs target, files.

PRANCE's per-image plans are the *selector plans* of an adaptive model (what its selector
decides for each image, timed together with the selector), plans from a file, or *random
per-image plans* selected so their mean MACs hit the target (a stand-in for a selector's
decisions); the output says which.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path

import torch

from prance.accounting import macs_per_sample, token_fractions
from prance.adaptive import AdaptiveViT, ImageStats
from prance.config import ViTConfig
from prance.errors import PranceError
from prance.model.metavit import MetaViT
from prance.plan import Plan

RANDOM_PLANS_LABEL = "random per-image plans (no trained selector yet), mean MACs matched to the target"
SELECTOR_PLANS_LABEL = ("selector plans: the adaptive model's own per-image decisions, selector and engine timed "
                        "together; the baselines matched to their mean MACs (selector included)")


def selector_plans(adaptive: AdaptiveViT, images: torch.Tensor, batch_size: int) -> ImageStats:
    """What ``adaptive`` decides for each of ``images`` and what that costs, selector included.

    Runs the full adaptive forward in batches of ``batch_size`` under inference mode; an
    image's decisions do not depend on its batch, so these are the plans it gets when timed.
    """
    parts: list[ImageStats] = []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            adaptive(chunk)
            assert adaptive.last is not None
            parts.append(adaptive.last)
    plan = Plan.cat([p.plan for p in parts])
    budgets = [p.budget for p in parts]
    return ImageStats(plan=Plan(**{f.name: getattr(plan, f.name).cpu() for f in fields(Plan)}),
                      macs=torch.cat([p.macs.cpu() for p in parts]), dense_macs=parts[0].dense_macs,
                      params=torch.cat([p.params.cpu() for p in parts]),
                      tokens=torch.cat([p.tokens.cpu() for p in parts]),
                      budget=None if any(b is None for b in budgets) else torch.cat([b.cpu() for b in budgets]))


def differing_decisions(executed: Plan, costed: Plan, config: ViTConfig) -> torch.Tensor:
    """``[B]`` True where an executed plan runs differently from the costed one: another width, MLP
    ratio or head count, or another token count at some stage. Keep ratios themselves may differ in
    the last bits (a batched matrix product rounds the selector's features differently) without
    changing what runs."""
    exact = [(getattr(executed, k).cpu() != getattr(costed, k).cpu()).flatten(1).any(1)
             for k in ("widths", "mlp_ratios", "heads")]
    tokens = token_fractions(config, executed).cpu() != token_fractions(config, costed).cpu()
    return torch.stack(exact + [tokens.any(1)]).any(0)


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


def load_static_plan(path: str | os.PathLike[str], model: MetaViT) -> list[tuple[str, Plan]]:
    """The named static plans of a sweep YAML (the static subnet is the one closest to the target MACs)."""
    from prance.evaluation.evaluate import plans_from_spec

    if not Path(path).is_file():
        raise PranceError(f"--static-plan {path}: file not found; give the plan YAML written by the sweep")
    return plans_from_spec(str(path), model.config, model.space)

