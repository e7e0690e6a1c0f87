"""Static-subnet sweep: accuracy against MACs, and the best static subnet for a MACs budget.

This is the "best static subnet of the meta-network at the same MACs" baseline (DESIGN.md §6).
A spread of one-plan-for-every-image subnets (largest, smallest, uniform ladders and random
ones, chosen to cover the MACs range evenly) is evaluated on a **held-out part of the training
data** — the images meta-training left out (``prance.data.splits``) — and the most
accurate subnet whose MACs fit the budget is chosen there. Only then is its test accuracy
measured: the test split never influences the choice.

Outputs (in ``out_dir``): ``sweep.json``, ``sweep.csv``, ``sweep.png`` (accuracy vs GMACs)
and ``best_plan.yaml``, usable as ``prance evaluate --plan best_plan.yaml``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from prance.accounting import count_macs
from prance.config import SearchSpace, ViTConfig
from prance.data.splits import Holdout, final_test_set, holdout_set
from prance.errors import PranceError
from prance.evaluation.evaluate import evaluate, write_json
from prance.model.metavit import MetaViT
from prance.plan import Plan, snap_keep
from prance.training.subnets import (
    largest_subnet,
    min_keep_ratio,
    plan_token_mode,
    random_subnet,
    smallest_subnet,
    with_keep,
)

# ----------------------------------------------------------------------------- which subnets
def candidate_subnets(config: ViTConfig, space: SearchSpace, num_random: int = 64, seed: int = 0
                      ) -> list[tuple[str, Plan]]:
    """Named one-row plans: max, min (fewest tokens too), every uniform (width, MLP ratio) pair at
    a few keep ratios of the space's token mode, and random ones drawn as meta-training draws them.

    "Uniform" subnets run stages 1.. at one width and blocks of stages 1.. at one MLP ratio
    (heads at their smallest choice for the smallest width when heads are elastic); ``-kK``
    names the keep ratio of every stage ≥ 1 (each ratio of the token mode).
    """
    s, k = config.num_stages, config.stage_depth
    plans: list[tuple[str, Plan]] = [("max", largest_subnet(config)), ("min", smallest_subnet(config, space))]
    for w in space.widths:
        for r in space.mlp_ratios:
            ratios = [config.mlp_ratio] * k + [r] * (config.depth - k)
            plan = Plan.uniform(config, [config.embed_dim] + [w] * (s - 1), ratios)
            plans += [(f"uniform-w{w}-r{r:g}" + ("" if keep == 1 else f"-k{keep:g}"), with_keep(plan, space, keep))
                      for keep in _keep_ladder(space)]
    generator = torch.Generator().manual_seed(seed)
    for i in range(num_random):
        plans.append((f"random-{i}", random_subnet(config, space, 1, generator)))
    unique: dict[tuple, tuple[str, Plan]] = {}
    for name, plan in plans:
        unique.setdefault(plan.key(0), (name, plan.validate(config, space)))
    return list(unique.values())


def _keep_ladder(space: SearchSpace) -> list[float]:
    """1, 3/4, 1/2 and the smallest keep ratio of the space (on its grid, if any)."""
    lowest = min_keep_ratio(space)
    levels = [1.0, 0.75, 0.5] if space.keep_grid <= 0 else [float(snap_keep(torch.tensor(v), space.keep_grid))
                                                            for v in (1.0, 0.75, 0.5)]
    return sorted({v for v in levels if v > lowest} | {lowest}, reverse=True)


def spread_subnets(
    config: ViTConfig, space: SearchSpace, count: int = 12, seed: int = 0
) -> list[tuple[str, Plan]]:
    """``count`` static subnets spread evenly over the MACs range (max and min always included), by MACs.

    When the space reduces tokens, half of them (min among them) reduce tokens and the others
    (max among them) do not, each half spread over its own MACs range, so that the table
    compares channel-only and token-reducing subnets at similar MACs.
    """
    if count < 2:
        raise PranceError(f"--count {count}: a sweep needs at least 2 subnets (max and min)")
    candidates = candidate_subnets(config, space, seed=seed)
    macs = {name: count_macs(config, plan) for name, plan in candidates}
    by_name = dict(candidates)
    reducing = [n for n, plan in candidates if plan_token_mode(plan) is not None]
    if reducing and count >= 4:
        channels_only = [n for n in by_name if n not in reducing]
        chosen = spread_by_macs(channels_only, macs, count - count // 2) + spread_by_macs(reducing, macs, count // 2)
    else:
        chosen = spread_by_macs(list(by_name), macs, count)
    chosen.sort(key=lambda n: (macs[n], n))
    return [(n, by_name[n]) for n in chosen]


def spread_by_macs(names: Sequence[str], macs: dict[str, int], count: int) -> list[str]:
    """Up to ``count`` of ``names``: the cheapest and dearest ("min" / "max" when present) and those
    closest to evenly spaced MACs between them."""
    ordered = sorted(names, key=lambda n: (macs[n], n))
    lo = "min" if "min" in names else ordered[0]
    hi = "max" if "max" in names else ordered[-1]
    chosen = [hi, lo] if macs[hi] != macs[lo] else [hi]
    targets = [macs[lo] + (macs[hi] - macs[lo]) * (i + 1) / (count - 1) for i in range(count - 2)]
    for target in targets:
        free = [n for n in ordered if n not in chosen]
        if not free:
            break
        chosen.append(min(free, key=lambda n: (abs(macs[n] - target), n)))
    return chosen


# ----------------------------------------------------------------------------- evaluation and choice
def evaluate_subnets(
    model: MetaViT,
    dataset: Dataset,
    subnets: Sequence[tuple[str, Plan]],
    *,
    batch_size: int = 256,
    progress: bool | None = None,
    desc: str = "",
) -> dict[str, dict[str, Any]]:
    """``{name: evaluate(...) result}`` of every subnet on ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return {name: evaluate(model, loader, plan, progress=progress, desc=f"{desc} {name}".strip())
            for name, plan in subnets}


def pick_for_budget(rows: Sequence[dict[str, Any]], budget_gmacs: float, key: str = "holdout_top1") -> dict[str, Any]:
    """The row with the best ``key`` among those within ``budget_gmacs`` (ties: fewer MACs, then name)."""
    fitting = [r for r in rows if r["gmacs"] <= budget_gmacs * (1 + 1e-9)]
    if not fitting:
        cheapest = min(r["gmacs"] for r in rows)
        raise PranceError(f"no static subnet fits {budget_gmacs} GMACs (the smallest needs {cheapest:.4g}); "
                          "raise --budget-gmacs")
    return max(fitting, key=lambda r: (r[key], -r["gmacs"], r["name"]))


@dataclass
class SweepData:
    """The two data sets a sweep uses: held-out training images (for the choice) and the test split."""

    holdout: Dataset
    test: Dataset | None


def sweep_data(
    config: ViTConfig,
    *,
    data: str = "fashion-mnist",
    data_dir: str | None = None,
    holdout: Holdout = Holdout(),
    holdout_limit: int | None = None,
    test_limit: int | None = None,
    with_test: bool = True,
    seed: int = 0,
) -> SweepData:
    """The holdout of the training split (the one the meta-network was trained without) and the test split.

    ``holdout_limit`` / ``test_limit`` keep random subsets of that many images, drawn with ``seed``.
    """
    held = holdout_set(data, img_size=config.img_size, in_chans=config.in_chans, holdout=holdout, root=data_dir,
                       limit=holdout_limit, seed=seed)
    test = None
    if with_test:
        test = final_test_set(data, img_size=config.img_size, in_chans=config.in_chans, root=data_dir,
                              limit=test_limit, seed=seed)
    return SweepData(held, test)


def run_sweep(
    model: MetaViT,
    data: SweepData,
    out_dir: str | os.PathLike[str],
    *,
    budget_gmacs: float | None = None,
    count: int = 12,
    seed: int = 0,
    batch_size: int = 256,
    compare: dict[str, MetaViT] | None = None,
    progress: bool | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``count`` static subnets, write the curve, and choose the best one for ``budget_gmacs``.

    ``compare``: other models (e.g. the dense weights the meta-network started from) whose same
    subnets are also evaluated on the test split, for the table only.
    Returns the JSON written to ``sweep.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    subnets = spread_subnets(model.config, model.space, count, seed)
    held = evaluate_subnets(model, data.holdout, subnets, batch_size=batch_size, progress=progress, desc="holdout")
    test = (evaluate_subnets(model, data.test, subnets, batch_size=batch_size, progress=progress, desc="test")
            if data.test is not None else {})
    others = {}
    for label, other in (compare or {}).items():
        if data.test is None:
            raise PranceError("comparing models needs the test split; drop --no-test")
        other.space = model.space
        others[label] = evaluate_subnets(other, data.test, subnets, batch_size=batch_size, progress=progress,
                                         desc=f"test {label}")
    rows = []
    for name, plan in subnets:
        r = held[name]
        row = {"name": name, "gmacs": r["gmacs"], "macs": r["macs"], "params_m": r["params_m"],
               "holdout_top1": r["top1"], "test_top1": test[name]["top1"] if test else None,
               **{f"test_top1_{label}": res[name]["top1"] for label, res in others.items()},
               "plan": plan.to_dict()}
        rows.append(row)
    result: dict[str, Any] = {**(meta or {}), "holdout_images": len(data.holdout),
                              "test_images": None if data.test is None else len(data.test),
                              "selection_split": "holdout (training data)", "rows": rows, "best": None}
    if budget_gmacs is not None:
        best = pick_for_budget(rows, budget_gmacs)
        result["best"] = {"budget_gmacs": budget_gmacs, **{k: v for k, v in best.items() if k != "plan"},
                          "plan": best["plan"], "plan_file": str(out / "best_plan.yaml")}
        write_plan_yaml(out / "best_plan.yaml", best["name"], best["plan"])
    write_json(result, out / "sweep.json")
    write_csv(rows, out / "sweep.csv")
    plot_sweep(rows, out / "sweep.png", result["best"], list(others))
    return result


def sweep_checkpoint(
    checkpoint: str,
    out_dir: str | os.PathLike[str],
    *,
    compare: Mapping[str, str] | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    holdout: float | None = None,
    holdout_limit: int | None = None,
    test_limit: int | None = None,
    with_test: bool = True,
    budget_gmacs: float | None = None,
    count: int = 12,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Everything ``prance sweep`` does with a checkpoint file; returns what it writes to ``sweep.json``.

    The data set is the checkpoint's own (``data`` / ``data_dir`` override it, same classes only),
    the holdout the one its pipeline recorded, and ``compare`` maps labels to other checkpoints
    whose same subnets are evaluated on the test split (e.g. ``{"dense": "RUN/dense/best.pt"}``).
    """
    from prance.data.provenance import check_same_classes, data_source, trained_on
    from prance.devices import resolve_device
    from prance.training.checkpoint import load_checkpoint, model_from_checkpoint
    from prance.training.run import pipeline_holdout

    device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt).to(device).eval()
    dense_gmacs = count_macs(model) / 1e9
    if budget_gmacs is not None and budget_gmacs > dense_gmacs:
        raise PranceError(f"--budget-gmacs {budget_gmacs} is above the full network's {dense_gmacs:.4f} "
                          "GMACs; give a budget in GMACs (1e9 MACs) at most that large")
    others = {label: (path, load_checkpoint(path)) for label, path in (compare or {}).items()}
    origin = trained_on(ckpt)
    data, data_dir = data_source(origin, data, data_dir)
    held = pipeline_holdout(data, {"--checkpoint": str(checkpoint)}, holdout)  # the run's own
    sets = sweep_data(model.config, data=data, data_dir=data_dir, holdout=held, holdout_limit=holdout_limit,
                      test_limit=test_limit, with_test=with_test)
    check_same_classes(origin, sets.holdout.info, str(checkpoint), data_dir)
    for path, other in others.values():
        check_same_classes(trained_on(other), sets.holdout.info, str(path), data_dir)
    return run_sweep(model, sets, out_dir, budget_gmacs=budget_gmacs, count=count, seed=seed, batch_size=batch_size,
                     compare={label: model_from_checkpoint(other).to(device).eval()
                              for label, (_, other) in others.items()},
                     progress=progress, meta={"checkpoint": str(checkpoint), "kind": ckpt["kind"],
                                              "holdout": held.fraction, "holdout_seed": held.seed, "data": data,
                                              "device": str(device)})


# ----------------------------------------------------------------------------- output
def write_plan_yaml(path: Path, name: str, plan: dict[str, list]) -> Path:
    """A plan file for ``prance evaluate --plan PATH`` (see ``plans_from_spec``)."""
    import yaml

    path.write_text(yaml.safe_dump({"name": name, **plan}, sort_keys=False))
    return path


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    columns = [k for k in rows[0] if k != "plan"] + ["widths", "mlp_ratios", "heads"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            plan = r["plan"]
            writer.writerow({**{k: r[k] for k in columns[:-3]},
                             **{k: " ".join(f"{v:g}" for v in plan[k]) for k in ("widths", "mlp_ratios", "heads")}})
    return path


def plot_sweep(rows: Sequence[dict[str, Any]], path: Path, best: dict[str, Any] | None, others: Sequence[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    g = [r["gmacs"] for r in rows]
    ax.plot(g, [r["holdout_top1"] for r in rows], "o-", label="holdout (train split)")
    if rows[0]["test_top1"] is not None:
        ax.plot(g, [r["test_top1"] for r in rows], "s--", label="test")
    for label in others:
        ax.plot(g, [r[f"test_top1_{label}"] for r in rows], "^:", label=f"test, {label} weights")
    if best is not None:
        ax.axvline(best["budget_gmacs"], color="grey", lw=0.8, ls="--", label="budget")
        ax.plot([best["gmacs"]], [best["holdout_top1"]], "r*", ms=14, label=f"chosen: {best['name']}")
    ax.set_xlabel("GMACs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("static subnets: accuracy vs MACs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of a sweep (one line per subnet)."""
    extra = [k for k in rows[0] if k.startswith("test_top1_")]
    head = ["subnet", "GMACs", "params (M)", "holdout top-1", "test top-1",
            *[k.removeprefix("test_top1_") + " test top-1" for k in extra]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['gmacs']:.4f}", f"{r['params_m']:.3f}", f"{r['holdout_top1']:.2f}",
                 "-" if r["test_top1"] is None else f"{r['test_top1']:.2f}", *[f"{r[k]:.2f}" for k in extra]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "SweepData",
    "candidate_subnets",
    "evaluate_subnets",
    "format_table",
    "pick_for_budget",
    "plot_sweep",
    "run_sweep",
    "spread_by_macs",
    "spread_subnets",
    "sweep_checkpoint",
    "sweep_data",
    "write_csv",
    "write_plan_yaml",
]
