"""``prance evaluate``: accuracy, MACs, parameters and tokens of a checkpoint (static plans or its selector)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from prance.cli.common import (add_data_arguments, add_device_argument, check_data_flag, check_positive, load_model,
                               set_threads)
from prance.errors import PranceError
from prance.files import check_writable_dir


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``evaluate``: a checkpoint on the test split (or its holdout) under static plans or baselines."""
    from prance.data.provenance import EVALUATION_SPLITS

    e = sub.add_parser("evaluate", parents=[debug], help="evaluate a checkpoint under static plans",
                       description="Top-1, GMACs, parameters and tokens of a checkpoint on the test split of the "
                       "data it was trained on (or on its held-out training images, --split holdout).")
    e.add_argument("--checkpoint", required=True, help="a prance checkpoint (e.g. RUN/best.pt)")
    add_data_arguments(e)
    e.add_argument("--split", choices=EVALUATION_SPLITS, default="test",
                   help="test (final numbers, default) or holdout (the training images the run held out: for "
                        "choices)")
    e.add_argument("--limit", type=int, default=None, help="evaluate a random subset of this many images")
    e.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    e.add_argument("--plan", default="max",
                   help="max (full size, default), min (smallest subnet), random:K (K random subnets, one row "
                        "each) or a YAML plan file")
    e.add_argument("--baseline", action="append", default=[], metavar="SPEC",
                   help="also evaluate a static token-reduction baseline on the full-size model: evit:KEEP, "
                        "evit-fuse:KEEP or tome:R (repeatable)")
    e.add_argument("--budget", type=float, default=None,
                   help="an adaptive model's budget (mean MACs / dense) to evaluate at; inside the range its "
                        "selector was trained for (default: the budget the file records)")
    e.add_argument("--seed", type=int, default=0, help="seed of the data subset and of random:K (default 0)")
    e.add_argument("--out", default=None, help="write the JSON result here")
    e.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_device_argument(e)
    e.set_defaults(func=command)


def command(args: argparse.Namespace) -> None:
    """Static plans and baselines of a meta or dense checkpoint; an adaptive model's own decisions."""
    check_positive(args.batch_size, "--batch-size")
    check_positive(args.limit, "--limit")
    check_data_flag(args.data)
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            raise PranceError(f"--out {out} is a folder; give a file name such as {out / 'eval.json'}")
        check_writable_dir(out.parent if str(out.parent) else ".", "--out folder")
    set_threads(args.threads)

    from torch.utils.data import DataLoader

    from prance.data.provenance import checkpoint_dataset
    from prance.devices import resolve_device
    from prance.evaluation.evaluate import evaluate, plans_from_spec, write_json
    from prance.plan import Plan
    from prance.tokens.baselines import parse_reducer
    from prance.training.subnets import require_trained_for

    device = resolve_device(args.device)
    ckpt, model = load_model(args.checkpoint, device)
    cfg = model.config
    from prance.adaptive import SELECTOR_KINDS

    if ckpt["kind"] in SELECTOR_KINDS:
        return _evaluate_adaptive(args, ckpt, device)
    if args.budget is not None:
        raise PranceError(f"--budget is for adaptive models, and {args.checkpoint} is a {ckpt['kind']} checkpoint; "
                          "drop it (or give the adaptive.pt of `prance train-selector`)")
    # Plans are read with every token mode allowed, so that a plan the checkpoint was not trained for is
    # refused by require_trained_for, naming the checkpoint and the fix; a dense model runs any plan's slices.
    any_tokens = replace(model.space, token_mode="prune_merge")
    plans = plans_from_spec(args.plan, cfg, any_tokens, seed=args.seed)
    require_trained_for(ckpt, args.checkpoint, plans=[plan for _, plan in plans])
    if ckpt["kind"] == "dense":
        model.space = any_tokens
    baselines = [parse_reducer(spec) for spec in args.baseline]
    dataset = checkpoint_dataset(ckpt, args.checkpoint, split=args.split, data=args.data, data_dir=args.data_dir,
                                 limit=args.limit, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)

    rows: list[dict[str, Any]] = []
    runs = [(name, plan, None) for name, plan in plans] + [(spec, Plan.full(cfg), reducer)
                                                           for spec, reducer in zip(args.baseline, baselines)]
    for name, plan, reducer in runs:
        row = {"plan_name": name, "plan": plan.to_dict(),
               **evaluate(model, loader, plan, reducer=reducer, progress=None)}
        rows.append(row)
        print(f"{name:>12}  top-1 {row['top1']:6.2f}%  {row['gmacs']:.4f} GMACs  {row['params_m']:.3f} M params  "
              f"{row['tokens']:.1f} tokens  ({row['images']} {dataset.info.name} {args.split} images)")
    result = {"checkpoint": str(args.checkpoint), "kind": ckpt["kind"], "data": dataset.info.name,
              "split": args.split, "device": str(device), "config": cfg.to_dict(), "rows": rows}
    if args.out is not None:
        write_json(result, args.out)
        print(f"wrote {args.out}")


def _evaluate_adaptive(args: argparse.Namespace, ckpt: dict[str, Any], device: Any) -> None:
    """``evaluate`` of an adaptive model: top-1, mean and per-image MACs, tokens; per-image decisions to --out."""
    from torch.utils.data import DataLoader

    from prance.adaptive import AdaptiveViT
    from prance.data.provenance import checkpoint_dataset
    from prance.evaluation.evaluate import evaluate_adaptive, write_csv, write_json

    if args.plan != "max" or args.baseline:
        raise PranceError(f"{args.checkpoint} is an adaptive model: its selector decides every plan; drop --plan and "
                          "--baseline (evaluate its meta-network checkpoint for static plans)")
    adaptive = AdaptiveViT.from_checkpoint(ckpt, args.checkpoint).to(device)
    if args.budget is not None:
        adaptive.set_budget(args.budget)
    dataset = checkpoint_dataset(ckpt, args.checkpoint, split=args.split, data=args.data, data_dir=args.data_dir,
                                 limit=args.limit, seed=args.seed)
    summary, records = evaluate_adaptive(adaptive, DataLoader(dataset, batch_size=args.batch_size, shuffle=False))
    q = summary["macs_quantiles"]
    print(f"adaptive  top-1 {summary['top1']:6.2f}%  {summary['gmacs']:.4f} GMACs ({summary['macs_ratio']:.3f} of "
          f"dense; per image {float(q['0.05']) / 1e9:.4f}-{float(q['0.95']) / 1e9:.4f})  {summary['params_m']:.3f} M "
          f"params  {summary['tokens']:.1f} tokens  ({summary['images']} {dataset.info.name} {args.split} images)")
    if args.out is not None:
        csv_path = Path(args.out).with_suffix(".csv")
        write_json({"checkpoint": str(args.checkpoint), "kind": ckpt["kind"], "data": dataset.info.name,
                    "split": args.split, "device": str(device), "budget": adaptive.budget,
                    "budget_range": list(adaptive.budget_range),
                    "calibration": ckpt.get("calibration"), "summary": summary, "images": records}, args.out)
        write_csv(records, csv_path)
        print(f"wrote {args.out} and {csv_path} (per-image decisions)")

