"""``prance finetune``: joint fine-tuning of an adaptive model, or the static-plan baseline of it."""

from __future__ import annotations

import argparse
import os
from typing import Any

from prance.cli.common import add_device_argument, add_run_folder_arguments, check_positive, set_threads
from prance.errors import PranceError
from prance.files import check_writable_dir


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``finetune``: the meta-network trained under its selector's per-image decisions (or one static plan)."""
    p = sub.add_parser("finetune", parents=[debug], help="joint fine-tuning under the selector's decisions",
                       description="Fine-tune the meta-network of an adaptive model under its selector's per-image "
                       "decisions (masked execution with gradients), distilling from the dense teacher; the selector "
                       "is re-calibrated onto its budget on the holdout after every epoch and the best epoch is "
                       "written as adaptive.pt. With --static-plan, the fair baseline instead: the same fine-tuning "
                       "under one plan for every image (best.pt of kind meta and plan.yaml). Runs under torchrun.")
    p.add_argument("--adaptive", required=True, help="the adaptive model (e.g. runs/selector/adaptive.pt)")
    p.add_argument("--teacher", default=None,
                   help="dense teacher: a prance dense checkpoint or timm:PATH (default: the dense model the "
                        "adaptive model's pipeline records)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training images (default 1)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    p.add_argument("--batch-size", type=int, default=128, help="images per step and process (default 128)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (default 50)")
    p.add_argument("--distill-weight", type=float, default=0.5,
                   help="loss = (1 - w) CE + w KD from the teacher (default 0.5)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train without random crops and flips (a short run from a model trained without them "
                        "does better without them too)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    p.add_argument("--alternate", type=int, default=0,
                   help="every N steps one PPO update of the selector on the current weights (default 0: off)")
    p.add_argument("--static-plan", default=None,
                   help="the static-plan baseline: a plan file (.yaml) or auto (the best static subnet on the "
                        "holdout within the adaptive model's mean MACs)")
    p.add_argument("--static-candidates", type=int, default=16,
                   help="auto: how many of the dearest fitting static subnets the holdout compares (default 16)")
    p.add_argument("--static-slack", type=float, default=0.01,
                   help="auto: only subnets at most this fraction of the dense MACs below the adaptive model's "
                        "(default 0.01: the same compute; 1: any that fits)")
    p.add_argument("--limit", type=int, default=None, help="train on a random subset of this many training images")
    p.add_argument("--holdout-limit", type=int, default=None,
                   help="calibrate and choose on at most this many held-out images")
    p.add_argument("--data-dir", default=None, help="where the adaptive model's data set lives (default: its own)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also write last.pt every N steps (default: at epoch ends)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_run_folder_arguments(p)
    add_device_argument(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> None:
    from prance.training.finetune import FinetuneConfig, run_finetune

    for flag in ("epochs", "max_steps", "batch_size", "lr", "limit", "holdout_limit", "static_candidates"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.alternate < 0 or args.checkpoint_every < 0 or args.warmup_steps < 0:
        raise PranceError("--alternate, --checkpoint-every and --warmup-steps must be 0 or more")
    set_threads(args.threads)
    out = check_writable_dir(args.out)
    cfg = FinetuneConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=args.warmup_steps, distill_weight=args.distill_weight,
                         temperature=args.temperature, augment=args.augment, alternate=args.alternate,
                         static_plan=args.static_plan, static_candidates=args.static_candidates,
                         static_slack=args.static_slack, seed=args.seed,
                         limit=args.limit, holdout_limit=args.holdout_limit, checkpoint_every=args.checkpoint_every)
    summary = run_finetune(args.adaptive, cfg, out, teacher=args.teacher, data_dir=args.data_dir,
                           resume=args.resume, overwrite=args.overwrite, device=args.device)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not summary["complete"]:
        print(f"fine-tuning in {summary['out']}: paused at step {summary['step']}/{summary['total_steps']}; "
              "continue with --resume")
    elif "adaptive" in summary:
        print(f"joint fine-tuning in {summary['out']}: best epoch {summary['best_epoch']}, holdout top-1 "
              f"{summary['holdout_top1']:.2f}% at {summary['holdout_macs_ratio']:.4f} of the dense MACs; adaptive "
              f"model {summary['adaptive']}")
    else:
        print(f"static-plan fine-tuning in {summary['out']}: best epoch {summary['best_epoch']}, holdout top-1 "
              f"{summary['best_score']:.2f}%; evaluate with `prance evaluate --checkpoint {summary['best']} --plan "
              f"{summary['plan']}`")
