"""Accuracy and per-sample cost of a model under a plan, over a whole data set.

``evaluate`` runs a :class:`~prance.model.MetaViT` on every batch of a loader, with one
static plan for all images or a callable that returns a plan per batch (one row per image,
e.g. a selector's decisions), and reports top-1 together with the exact per-sample cost
of what ran: MACs, activated parameters and surviving tokens (DESIGN.md §4).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from prance.accounting import CostedReducer, macs_per_sample, params_per_sample, token_fractions
from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.files import atomic_write, load_yaml
from prance.model.metavit import MetaViT
from prance.plan import Plan

#: A static plan (one row, or one row per image of every batch), a function of the batch, or None (full size).
PlanSource = Plan | Callable[[torch.Tensor], Plan] | None


def evaluate(
    model: MetaViT,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    plan: PlanSource = None,
    mode: str = "physical",
    *,
    reducer: CostedReducer | None = None,
    progress: bool | None = False,
    desc: str = "evaluate",
) -> dict[str, Any]:
    """Top-1 and mean per-sample cost of ``model`` on ``loader`` under ``plan``.

    Returns a JSON-ready dict:

    * ``top1`` — accuracy in percent; ``images`` — how many were evaluated;
    * ``macs`` / ``gmacs`` — mean MACs per image (GMACs = 1e9 MACs, what papers call GFLOPs);
    * ``params`` / ``params_m`` — mean parameters an image activates (millions for ``_m``);
    * ``tokens`` — mean number of patch tokens per stage (cls excluded), averaged over stages
      and images; ``token_fractions`` — mean fraction of the patch tokens each stage runs with;
    * ``mode``, ``seconds`` and ``images_per_second`` (wall clock of the whole loop).

    ``reducer`` adds a static token-reduction baseline (EViT / ToMe) on top of the plan.

    Batches are moved to the model's device. The model is put in eval mode and restored to
    its previous mode afterwards.
    """
    cfg = model.config
    device = model.cls_token.device
    was_training = model.training
    model.eval()
    n = correct = 0
    macs_sum = params_sum = 0
    fraction_sum = torch.zeros(cfg.num_stages, dtype=torch.float64)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            for images, labels in tqdm(loader, desc=desc, disable=_tqdm_disable(progress), leave=False):
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                b = images.shape[0]
                batch_plan = plan(images) if callable(plan) else (Plan.full(cfg) if plan is None else plan)
                logits = model(images, batch_plan, mode=mode, reducer=reducer)
                correct += int((logits.argmax(dim=-1) == labels).sum())
                n += b
                rows = b if batch_plan.batch_size == 1 else 1  # a one-row plan stands for every image
                macs_sum += int(macs_per_sample(model, batch_plan, reducer).sum()) * rows
                params_sum += int(params_per_sample(model, batch_plan).sum()) * rows
                fraction_sum += token_fractions(cfg, batch_plan, reducer).sum(dim=0) * rows
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    if n == 0:
        raise PranceError("the evaluation set is empty; check the data folder or raise --limit")
    fractions = (fraction_sum / n).tolist()
    return {
        "top1": 100.0 * correct / n,
        "images": n,
        "macs": macs_sum / n,
        "gmacs": macs_sum / n / 1e9,
        "params": params_sum / n,
        "params_m": params_sum / n / 1e6,
        "tokens": sum(fractions) / len(fractions) * cfg.num_patches,
        "token_fractions": fractions,
        "mode": mode,
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else math.inf,
    }


def evaluate_adaptive(
    adaptive: Any, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], *, progress: bool | None = False,
    desc: str = "evaluate", indices: Sequence[int] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Top-1 and cost of an :class:`~prance.adaptive.AdaptiveViT`, and one record per image.

    Every image runs its own selector decisions; MACs include the selector's. The summary has
    the keys of :func:`evaluate` plus ``macs_ratio`` (mean MACs / dense MACs) and per-image
    MACs quantiles; each per-image record holds its label, prediction, MACs, tokens per stage
    and the decisions (widths, MLP ratios, heads, keep ratios), and its ``index``: where the image sits in its
    split (``indices``, in the loader's order; default: its position in the loader).
    """
    device = adaptive.model.cls_token.device
    records: list[dict[str, Any]] = []
    correct = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc=desc, disable=_tqdm_disable(progress), leave=False):
            images, labels = images.to(device), labels.to(device)
            predictions = adaptive(images).argmax(-1)
            correct += int((predictions == labels).sum())
            for row, y, p in zip(adaptive.last.rows(), labels.tolist(), predictions.tolist()):
                k = len(records)
                records.append({"index": k if indices is None else int(indices[k]), "label": y, "prediction": p,
                                **row})
    seconds = time.perf_counter() - start
    n = len(records)
    if n == 0:
        raise PranceError("the evaluation set is empty; check the data folder or raise --limit")
    cfg = adaptive.model.config
    macs = torch.tensor([r["macs"] for r in records], dtype=torch.float64)
    params = torch.tensor([r["params"] for r in records], dtype=torch.float64)
    tokens = torch.tensor([r["tokens"] for r in records], dtype=torch.float64)
    fractions = tokens.mean(0).tolist()
    summary = {
        "top1": 100.0 * correct / n, "images": n, "macs": float(macs.mean()), "gmacs": float(macs.mean()) / 1e9,
        "macs_ratio": float(macs.mean()) / adaptive.last.dense_macs,
        "macs_quantiles": {str(q): float(macs.quantile(q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
        "params": float(params.mean()), "params_m": float(params.mean()) / 1e6,
        "tokens": sum(fractions) / len(fractions) * cfg.num_patches, "token_fractions": fractions,
        "mode": "adaptive", "seconds": seconds, "images_per_second": n / seconds if seconds > 0 else math.inf,
    }
    return summary, records


def write_csv(records: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Per-image records as CSV (list values joined by spaces), atomically."""
    import csv
    import io

    buf = io.StringIO()
    if records:
        writer = csv.DictWriter(buf, fieldnames=list(records[0]))
        writer.writeheader()
        for r in records:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})
    return atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _tqdm_disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None lets tqdm decide (off when not a terminal)."""
    return None if progress is None else not progress


# ----------------------------------------------------------------------------- plans by name
def plans_from_spec(
    spec: str, config: ViTConfig, space: SearchSpace, seed: int = 0
) -> list[tuple[str, Plan]]:
    """Static plans named on the command line, as ``(name, one-row Plan)`` pairs.

    ``max`` — the full-size network; ``min`` — the smallest subnet of the search space;
    ``random:K`` — K random subnets (widths, MLP ratios and, if elastic, heads; no token
    reduction), drawn with ``seed``; any other value is a YAML file holding one plan
    (a mapping, see :meth:`Plan.from_dict`) or a list of them; each may carry a ``name``.
    """
    if spec == "max":
        return [("max", Plan.full(config))]
    if spec == "min":
        return [("min", Plan.smallest(config, space))]
    if spec.startswith("random:"):
        k = spec.split(":", 1)[1]
        if not k.isdigit() or int(k) < 1:
            raise PranceError(f"--plan {spec}: K must be a positive whole number, e.g. random:8")
        g = torch.Generator().manual_seed(seed)
        return [(f"random-{i}", Plan.random(config, space, 1, generator=g)) for i in range(int(k))]
    return _plans_from_yaml(Path(spec), config, space)


def _plans_from_yaml(path: Path, config: ViTConfig, space: SearchSpace) -> list[tuple[str, Plan]]:
    if not path.is_file():
        raise PranceError(f"--plan {path}: not max, min, random:K or an existing YAML file; check the value")
    data = load_yaml(path, "plan file")
    entries = data if isinstance(data, list) else [data]
    plans = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise PranceError(f"plan file {path}: entry {i} is not a mapping with widths and mlp_ratios")
        entry = dict(entry)
        name = str(entry.pop("name", f"{path.stem}-{i}" if len(entries) > 1 else path.stem))
        plans.append((name, Plan.from_dict(config, entry).validate(config, space)))
    if not plans:
        raise PranceError(f"plan file {path} holds no plan; add widths and mlp_ratios")
    return plans


# ----------------------------------------------------------------------------- output
def write_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON, atomically (the old file survives any failure)."""
    text = json.dumps(obj, indent=2, allow_nan=True) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


__all__ = ["PlanSource", "evaluate", "evaluate_adaptive", "plans_from_spec", "write_csv", "write_json"]
