"""Evaluate a checkpoint file as ``prance evaluate`` does: on the data it was trained on, under
static plans and baselines, or — for an adaptive model — under its own selector's decisions.

One function builds the JSON record the command writes (``--out``), so ``prance evaluate`` and
``prance run`` write the same files; the command line only parses flags and prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from prance.errors import PranceError
from prance.evaluation.evaluate import evaluate, evaluate_adaptive, plans_from_spec, write_csv, write_json


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    plan: str = "max",
    baselines: Sequence[str] = (),
    budget: float | None = None,
    split: str = "test",
    data: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    ckpt: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record ``prance evaluate --out`` writes for ``checkpoint`` (``ckpt``: the file, if already read).

    A meta or dense checkpoint gets one row per static plan of ``plan`` (max, min, random:K or a
    YAML file) and per baseline spec (``evit:KEEP``, ``tome:R``, run on the full-size model). An
    adaptive model gets its summary (top-1, mean and per-image MACs, tokens) and, under ``images``,
    every image's decisions; ``budget`` moves a budget-range selector.
    """
    from prance.adaptive import SELECTOR_KINDS
    from prance.devices import resolve_device
    from prance.training.checkpoint import load_checkpoint

    device = resolve_device(device)
    ckpt = load_checkpoint(checkpoint) if ckpt is None else ckpt
    path = str(checkpoint)
    if ckpt["kind"] in SELECTOR_KINDS:
        if plan != "max" or baselines:
            raise PranceError(f"{path} is an adaptive model: its selector decides every plan; drop --plan and "
                              "--baseline (evaluate its meta-network checkpoint for static plans)")
        return _adaptive(path, ckpt, budget, split, data, data_dir, limit, seed, batch_size, device)
    if budget is not None:
        raise PranceError(f"--budget is for adaptive models, and {path} is a {ckpt['kind']} checkpoint; drop it (or "
                          "give the adaptive.pt of `prance train-selector`)")
    return _static(path, ckpt, plan, baselines, split, data, data_dir, limit, seed, batch_size, device)


def _static(path: str, ckpt: Mapping[str, Any], spec: str, baselines: Sequence[str], split: str, data: str | None,
            data_dir: str | None, limit: int | None, seed: int, batch_size: int, device: torch.device
            ) -> dict[str, Any]:
    """Static plans and baselines of a meta or dense checkpoint: one row each."""
    from prance.data.provenance import checkpoint_dataset
    from prance.plan import Plan
    from prance.tokens.baselines import parse_reducer
    from prance.training.checkpoint import model_from_checkpoint
    from prance.training.subnets import require_trained_for

    model = model_from_checkpoint(ckpt).to(device).eval()
    cfg = model.config
    # Plans are read with every token mode allowed, so that a plan the checkpoint was not trained for is
    # refused by require_trained_for, naming the checkpoint and the fix; a dense model runs any plan's slices.
    any_tokens = replace(model.space, token_mode="prune_merge")
    plans = plans_from_spec(spec, cfg, any_tokens, seed=seed)
    require_trained_for(ckpt, path, plans=[plan for _, plan in plans])
    if ckpt["kind"] == "dense":
        model.space = any_tokens
    reducers = [parse_reducer(b) for b in baselines]
    dataset = checkpoint_dataset(ckpt, path, split=split, data=data, data_dir=data_dir, limit=limit, seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    runs = [(name, plan, None) for name, plan in plans] + [(b, Plan.full(cfg), r) for b, r in zip(baselines, reducers)]
    rows = [{"plan_name": name, "plan": plan.to_dict(), **evaluate(model, loader, plan, reducer=reducer, progress=None)}
            for name, plan, reducer in runs]
    return {"checkpoint": path, "kind": ckpt["kind"], "data": dataset.info.name, "split": split,
            "device": str(device), "config": cfg.to_dict(), "rows": rows}


def _adaptive(path: str, ckpt: Mapping[str, Any], budget: float | None, split: str, data: str | None,
              data_dir: str | None, limit: int | None, seed: int, batch_size: int, device: torch.device
              ) -> dict[str, Any]:
    """An adaptive model under its own decisions: summary and one record per image."""
    from prance.adaptive import AdaptiveViT
    from prance.data.provenance import checkpoint_dataset

    adaptive = AdaptiveViT.from_checkpoint(ckpt, path).to(device)
    if budget is not None:
        adaptive.set_budget(budget)
    dataset = checkpoint_dataset(ckpt, path, split=split, data=data, data_dir=data_dir, limit=limit, seed=seed)
    summary, records = evaluate_adaptive(adaptive, DataLoader(dataset, batch_size=batch_size, shuffle=False),
                                         indices=dataset.indices.tolist())
    return {"checkpoint": path, "kind": ckpt["kind"], "data": dataset.info.name, "split": split,
            "device": str(device), "budget": adaptive.budget, "budget_range": list(adaptive.budget_range),
            "calibration": ckpt.get("calibration"), "summary": summary, "images": records}


def write_evaluation(result: Mapping[str, Any], path: str | os.PathLike[str]) -> list[Path]:
    """``result`` as JSON at ``path``; an adaptive model's per-image decisions also as CSV next to it."""
    written = [write_json(dict(result), path)]
    if "images" in result:
        written.append(write_csv(list(result["images"]), Path(path).with_suffix(".csv")))
    return written


def describe(result: Mapping[str, Any]) -> list[str]:
    """The lines ``prance evaluate`` prints: one per plan or baseline, or the adaptive model's summary."""
    if "summary" in result:
        s = result["summary"]
        q = s["macs_quantiles"]
        return [f"adaptive  top-1 {s['top1']:6.2f}%  {s['gmacs']:.4f} GMACs ({s['macs_ratio']:.3f} of dense; per image "
                f"{float(q['0.05']) / 1e9:.4f}-{float(q['0.95']) / 1e9:.4f})  {s['params_m']:.3f} M params  "
                f"{s['tokens']:.1f} tokens  ({s['images']} {result['data']} {result['split']} images)"]
    return [f"{row['plan_name']:>12}  top-1 {row['top1']:6.2f}%  {row['gmacs']:.4f} GMACs  {row['params_m']:.3f} M "
            f"params  {row['tokens']:.1f} tokens  ({row['images']} {result['data']} {result['split']} images)"
            for row in result["rows"]]


__all__ = ["describe", "evaluate_checkpoint", "write_evaluation"]
