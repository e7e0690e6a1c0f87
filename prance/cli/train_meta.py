"""``prance train-meta``: the weight-sharing meta-network (sandwich rule; torchrun for several processes)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from prance.cli.common import add_run_folder_arguments, check_holdout, check_positive, set_threads
from prance.config import TOKEN_MODES
from prance.errors import PranceError
from prance.files import check_writable_dir


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``train-meta``: sandwich-rule training of the meta-network from a dense model."""
    m = sub.add_parser("train-meta", parents=[debug], help="train the weight-sharing meta-network (sandwich rule)",
                       description="Train the meta-network from a dense model with the sandwich rule (largest, "
                       "smallest and K random subnets per step, in-place distillation); writes last.pt, best.pt "
                       "(kind meta) and log.jsonl into --out. Under `torchrun --nproc_per_node N` it uses "
                       "DistributedDataParallel.")
    m.add_argument("--init", default=None, metavar="[timm:]PATH",
                   help="dense starting point: a prance checkpoint (e.g. RUN/best.pt) or a local timm/DeiT .pth")
    m.add_argument("--preset", default=None, help="without --init: start from a random preset (smoke tests only)")
    m.add_argument("--teacher", default=None, metavar="PATH|init",
                   help="frozen dense teacher for distillation (a checkpoint or timm .pth; 'init' = the --init "
                   "weights)")
    m.add_argument("--distill-from", choices=("largest", "teacher"), default="largest",
                   help="soft targets of the smaller subnets: the largest subnet (in-place, default) or the teacher")
    m.add_argument("--num-random", type=int, default=2, help="random subnets per step besides largest and smallest "
                   "(default 2)")
    m.add_argument("--token-mode", choices=TOKEN_MODES, default=None,
                   help="token reduction the meta-network is trained for (and the selector will use): prune, merge "
                        "or prune_merge (default: the --init meta-network's; from a dense model: merge)")
    m.add_argument("--min-keep", type=float, default=None,
                   help="smallest keep ratio per stage, trained down to (default: the model's, 0.1; 1: no token "
                        "reduction)")
    m.add_argument("--keep-grid", type=float, default=None,
                   help="keep ratios only on multiples of this step, e.g. 0.1 (default: the model's; 0: continuous)")
    m.add_argument("--random-subnets", default="per-image", metavar="per-image|batch-shared",
                   help="random subnets: a plan per image, masked (default: as the selector decides), or one plan "
                        "per batch, physical (faster)")
    m.add_argument("--widths", default=None, help="search-space widths, e.g. 48,60,72,84,96 (default: the model's)")
    m.add_argument("--mlp-ratios", default=None, help="search-space MLP ratios, e.g. 2,3,4 (default: the model's)")
    m.add_argument("--elastic-heads", action="store_true", help="also sample the number of attention heads")
    m.add_argument("--epochs", type=int, default=2, help="passes over the training data (default 2)")
    m.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    m.add_argument("--batch-size", type=int, default=128, help="images per step and process (default 128)")
    m.add_argument("--lr", type=float, default=2.5e-4, help="peak AdamW learning rate (default 2.5e-4)")
    m.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps (default 100)")
    m.add_argument("--no-augment", dest="augment", action="store_false",
                   help="train without random crops and flips (keeps more of a briefly trained dense model's "
                        "accuracy in a short run)")
    m.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    m.add_argument("--teacher-weight", type=float, default=0.5,
                   help="with --teacher: weight of distillation in the largest subnet's loss (default 0.5)")
    m.add_argument("--data", default="fashion-mnist", help="fashion-mnist (default) or folder")
    m.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder, or an ImageNet-style root/{train,val}")
    m.add_argument("--limit", type=int, default=None, help="use a random subset of this many training images")
    m.add_argument("--holdout", type=float, default=None,
                   help="fraction of the training split held out for every choice (default: the one --init was "
                        "trained with, else 0.1)")
    m.add_argument("--holdout-seed", type=int, default=None,
                   help="which images are held out (default: the --init checkpoint's, else 0)")
    m.add_argument("--val-limit", type=int, default=None, help="validate on at most this many held-out images")
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_run_folder_arguments(m)
    m.add_argument("--checkpoint-every", type=int, default=0, help="also save last.pt every N steps (default: epochs)")
    m.add_argument("--log-every", type=int, default=20, help="log.jsonl line every N steps (default 20)")
    m.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (under torchrun: each rank's GPU)")
    m.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    m.set_defaults(func=command)


def _float_list(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise PranceError(f"{flag} {text!r}: give comma-separated numbers, e.g. 2,3,4") from None


def command(args: argparse.Namespace) -> None:
    from prance.training.meta import MetaRunConfig, MetaTrainConfig, run_train_meta

    for flag in ("epochs", "batch_size", "lr", "limit", "val_limit", "max_steps", "log_every"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    check_holdout(args.holdout)
    if args.init is not None and not Path(args.init.removeprefix("timm:")).is_file():
        raise PranceError(f"--init {args.init}: file not found; give a dense checkpoint or a local timm/DeiT .pth")
    space: dict[str, Any] = {}
    widths = _float_list(args.widths, "--widths")
    if widths is not None:
        space["widths"] = [int(w) for w in widths]
    if args.mlp_ratios is not None:
        space["mlp_ratios"] = _float_list(args.mlp_ratios, "--mlp-ratios")
    if args.elastic_heads:
        space["elastic_heads"] = True
    if args.token_mode is not None:
        space["token_mode"] = args.token_mode
    if args.min_keep is not None:
        if not 0 < args.min_keep <= 1:
            raise PranceError(f"--min-keep {args.min_keep} must be in (0, 1], e.g. 0.25 (1: no token reduction)")
        space["min_keep"] = args.min_keep
    if args.keep_grid is not None:
        if not 0 <= args.keep_grid <= 1:
            raise PranceError(f"--keep-grid {args.keep_grid} must be in [0, 1], e.g. 0.1 (0: continuous)")
        space["keep_grid"] = args.keep_grid
    set_threads(args.threads)
    out = check_writable_dir(args.out)
    run = MetaRunConfig(init=args.init, preset=args.preset, teacher=args.teacher, space=space, data=args.data,
                        data_dir=args.data_dir, limit=args.limit, holdout=args.holdout,
                        holdout_seed=args.holdout_seed, val_limit=args.val_limit)
    cfg = MetaTrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                          warmup_steps=args.warmup_steps, num_random=args.num_random, temperature=args.temperature,
                          teacher_weight=args.teacher_weight, distill_from=args.distill_from,
                          random_subnets=args.random_subnets, augment=args.augment, seed=args.seed,
                          log_every=args.log_every, checkpoint_every=args.checkpoint_every)
    summary = run_train_meta(run, cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        val = (f"; held-out top-1 largest {summary['val_top1_largest']:.2f}%, smallest "
               f"{summary['val_top1_smallest']:.2f}%" if "val_top1_largest" in summary else "")
        print(f"meta training in {summary['out']}: {summary['step']}/{summary['total_steps']} steps{val}; "
              f"checkpoints {summary['last']}, {summary['best']}")
