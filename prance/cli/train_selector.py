"""``prance train-selector``: the per-image selector, Result-to-Go PPO on a frozen meta-network."""

from __future__ import annotations

import argparse
import os
from typing import Any

from prance.cli.common import add_device_argument, add_run_folder_arguments, check_positive, set_threads
from prance.errors import PranceError
from prance.files import check_writable_dir


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``train-selector``: PPO with the Result-to-Go reward on a frozen meta-network, under a MACs budget."""
    from prance.selector.features import ENCODERS
    from prance.selector.reward import REWARD_KINDS
    from prance.training.selector import SelectorTrainConfig

    p = sub.add_parser("train-selector", parents=[debug], help="train the per-image selector (Result-to-Go PPO)",
                       description="Train the selector of a frozen meta-network with PPO and the Result-to-Go "
                       "reward, its MACs penalty adapted by dual ascent until the mean meets the budget; then "
                       "calibrate it on the holdout and write adaptive.pt (an AdaptiveViT), last.pt, log.jsonl and "
                       "curves.png into --out. Under `torchrun --nproc_per_node N` each process rolls out its own "
                       "images.")
    p.add_argument("--meta", required=True, help="the meta-network checkpoint (e.g. runs/meta/best.pt)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=float, default=None,
                        help="mean MACs as a fraction of the dense model's, selector included (default 0.5)")
    budget.add_argument("--gmacs", type=float, default=None, help="mean GMACs per image instead of --budget")
    budget.add_argument("--budget-range", default=None, metavar="LOW,HIGH",
                        help="one selector for every budget in LOW..HIGH (e.g. 0.3,0.8): the budget is drawn per "
                             "image in training and set at inference (AdaptiveViT.set_budget, evaluate --budget)")
    p.add_argument("--budget-bins", type=int, default=None,
                   help="with --budget-range: budgets λ is learned and the knob calibrated at, evenly spaced, "
                        "ends included (default 6)")
    p.add_argument("--encoder", choices=ENCODERS, default="keys",
                   help="state: 'keys' (the paper's per-token key means, default) or 'cls' (cls features)")
    p.add_argument("--updates", type=int, default=300, help="PPO updates, one rollout each (default 300)")
    p.add_argument("--batch-size", type=int, default=128, help="images per rollout and process (default 128)")
    p.add_argument("--hidden", type=int, default=128, help="selector MLP width (default 128)")
    p.add_argument("--mlp-per-stage", action="store_true", help="one MLP ratio per stage instead of per block")
    p.add_argument("--keep-grid", type=float, default=None,
                   help="raise the selector's keep ratios to multiples of this step (e.g. 0.125; a multiple of the "
                        "meta-network's keep grid): fewer distinct token counts, larger groups in the engine")
    p.add_argument("--round-up", type=int, default=None, metavar="K",
                   help="round every stage decision up to one of K learned on the holdout (never less compute), "
                        "calibrated so; fewer distinct plans (default: off; also `prance round-up` afterwards)")
    p.add_argument("--keep-penalty", type=float, default=0.01, help="penalty on kept tokens (default 0.01)")
    p.add_argument("--reward", choices=REWARD_KINDS, default=SelectorTrainConfig.reward,
                   help="'outcome': each decision is rewarded with its Result-to-Go outcome (the paper's); 'gain': "
                        "with how much it changed that outcome, so every return is the deployed run's (default "
                        f"{SelectorTrainConfig.reward})")
    p.add_argument("--lr", type=float, default=3e-4, help="PPO Adam learning rate (default 3e-4)")
    p.add_argument("--limit", type=int, default=None, help="roll out on a random subset of this many training images")
    p.add_argument("--holdout-limit", type=int, default=None, help="calibrate on at most this many held-out images")
    p.add_argument("--data-dir", default=None, help="where the meta-network's data set lives (default: its own)")
    p.add_argument("--checkpoint-every", type=int, default=25, help="write last.pt every N updates (default 25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_run_folder_arguments(p)
    add_device_argument(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> None:
    from prance.accounting import count_macs
    from prance.data.provenance import trained_on
    from prance.training.checkpoint import load_checkpoint, model_from_checkpoint
    from prance.training.selector import SelectorTrainConfig, train_selector

    for flag in ("updates", "batch_size", "hidden", "lr", "limit", "holdout_limit", "checkpoint_every", "gmacs",
                 "budget_bins", "keep_grid", "round_up"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    budget_range = None if args.budget_range is None else _budget_range(args.budget_range)
    if args.budget_bins is not None and budget_range is None:
        raise PranceError("--budget-bins splits a --budget-range; give --budget-range LOW,HIGH too, or drop it")
    ckpt = load_checkpoint(args.meta, kind=("meta", "joint"))
    budget = 0.5 if args.budget is None else args.budget
    if budget_range is not None:  # the written adaptive model starts in the middle of its range
        budget = 0.5 * (budget_range[0] + budget_range[1])
    if args.gmacs is not None:
        dense = count_macs(model_from_checkpoint(ckpt)) / 1e9
        budget = args.gmacs / dense
        if not 0 < budget <= 1:
            raise PranceError(f"--gmacs {args.gmacs} is above the dense model's {dense:.4f} GMACs; give at most that")
    trained = trained_on(ckpt)
    set_threads(args.threads)
    out = check_writable_dir(args.out)
    cfg = SelectorTrainConfig(budget=budget, updates=args.updates, batch_size=args.batch_size, encoder=args.encoder,
                              hidden=args.hidden, mlp_per_stage=args.mlp_per_stage, keep_penalty=args.keep_penalty,
                              reward=args.reward, keep_grid=args.keep_grid or 0.0, round_up=args.round_up or 0,
                              ppo={"lr": args.lr}, seed=args.seed, limit=args.limit, holdout_limit=args.holdout_limit,
                              checkpoint_every=args.checkpoint_every, data=trained.data or "fashion-mnist",
                              data_dir=args.data_dir or trained.data_dir, budget_range=budget_range,
                              budget_bins=args.budget_bins or 6)
    summary = train_selector(args.meta, cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0 and "adaptive" in summary and budget_range is not None:
        print(f"selector in {summary['out']}: {summary['update']} updates, budgets {budget_range[0]:g} to "
              f"{budget_range[1]:g}; adaptive model {summary['adaptive']} (evaluate it with --budget B)")
    elif int(os.environ.get("RANK", "0")) == 0 and "adaptive" in summary:
        print(f"selector in {summary['out']}: {summary['update']} updates; on the holdout top-1 "
              f"{summary['holdout_top1']:.2f}% at {summary['holdout_macs_ratio']:.4f} of the dense MACs (budget "
              f"{budget:.4g}); adaptive model {summary['adaptive']}")
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"selector in {summary['out']}: paused at update {summary['update']}/{summary['updates']}; continue "
              "with --resume")


def _budget_range(text: str) -> tuple[float, float]:
    """``LOW,HIGH`` from the command line, checked (both budgets in (0, 1], LOW < HIGH)."""
    from prance.selector.budget import check_budget_range

    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2:
        raise PranceError(f"--budget-range {text!r} must be two fractions LOW,HIGH, e.g. --budget-range 0.3,0.8")
    return check_budget_range(values)
