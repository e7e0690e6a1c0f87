"""``prance train-dense``: train the full-size ViT (teacher and starting point of the meta-network)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from prance.cli.common import add_run_folder_arguments, check_data_flag, check_holdout, check_positive, set_threads
from prance.errors import PranceError
from prance.files import check_writable_dir


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``train-dense``: every option defaults to None, so --resume can tell given from omitted."""
    from prance.model.presets import DEFAULT_PRESET

    t = sub.add_parser("train-dense", parents=[debug], help="train the dense (full-size) ViT",
                       description="Train the dense ViT; writes last.pt, best.pt and log.jsonl into --out.")
    t.add_argument("--preset", default=None, help=f"model shape (default {DEFAULT_PRESET}); see prance.model.PRESETS")
    t.add_argument("--data", default=None, help="fashion-mnist (default) or folder")
    t.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder, or an ImageNet-style root/{train,val}")
    t.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 10)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default 64)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    t.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up length (default 1)")
    t.add_argument("--no-augment", dest="augment", action="store_const", const=False, default=None,
                   help="train without random crops and flips (faster to learn in a run of about one epoch)")
    t.add_argument("--limit", type=int, default=None, help="train on a random subset of this many images")
    t.add_argument("--val-limit", type=int, default=None, help="validate on a random subset of this many held-out "
                   "images")
    t.add_argument("--holdout", type=float, default=None,
                   help="fraction of the training split held out for every choice, never trained on (default 0.1)")
    t.add_argument("--holdout-seed", type=int, default=None, help="which images are held out (default 0)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    add_run_folder_arguments(t)
    t.add_argument("--init", default=None, metavar="[timm:]PATH",
                   help="start from a local timm/DeiT .pth (its shape replaces the preset's)")
    t.add_argument("--img-size", type=int, default=None, help="override the preset's image size")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default 0)")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="also save last.pt every N steps (default: at epoch ends)")
    t.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (under torchrun: each rank's GPU)")
    t.set_defaults(func=command)


_TRAIN_FLAGS = {  # argparse dest -> DenseTrainConfig field
    "preset": "preset", "data": "data", "data_dir": "data_dir", "epochs": "epochs", "batch_size": "batch_size",
    "lr": "lr", "warmup_epochs": "warmup_epochs", "limit": "limit", "val_limit": "val_limit", "seed": "seed",
    "init": "init", "img_size": "img_size", "workers": "num_workers", "holdout": "holdout",
    "holdout_seed": "holdout_seed", "checkpoint_every": "checkpoint_every", "augment": "augment",
}


def command(args: argparse.Namespace) -> None:
    """Check the flags, then train (or resume) in --out."""
    from prance.model.presets import PRESETS
    from prance.training.dense import DenseTrainConfig, resume_config, train_dense

    given = {field: getattr(args, dest) for dest, field in _TRAIN_FLAGS.items() if getattr(args, dest) is not None}
    for flag, field in (("--epochs", "epochs"), ("--batch-size", "batch_size"), ("--lr", "lr"),
                        ("--limit", "limit"), ("--val-limit", "val_limit"), ("--img-size", "img_size")):
        check_positive(given.get(field), flag)
    if given.get("warmup_epochs", 0) < 0:
        raise PranceError(f"--warmup-epochs must be >= 0, got {given['warmup_epochs']}")
    if given.get("num_workers", 0) < 0:
        raise PranceError(f"--workers must be >= 0, got {given['num_workers']}")
    if given.get("checkpoint_every", 0) < 0:
        raise PranceError(f"--checkpoint-every must be >= 0, got {given['checkpoint_every']}")
    check_holdout(given.get("holdout"))
    if "preset" in given and given["preset"] not in PRESETS:
        raise PranceError(f"unknown preset {given['preset']!r}; choose one of {', '.join(PRESETS)}")
    check_data_flag(given.get("data"))
    if "init" in given and not Path(given["init"].removeprefix("timm:")).is_file():
        raise PranceError(f"--init {given['init']}: file not found; give a local timm/DeiT .pth")
    if "init" in given and "preset" in given:
        raise PranceError("--init sets the model's shape from the file; drop --preset")
    set_threads(args.threads)
    # A resumed run's settings come from its last.pt; flags given now must agree with them.
    cfg = resume_config(args.out, **given) if args.resume else DenseTrainConfig(**given)
    out = check_writable_dir(args.out)
    summary = train_dense(cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"dense training in {summary['out']}: {summary['epochs']} epochs, best holdout top-1 "
          f"{summary['best_top1']:.2f}% (epoch {summary['best_epoch']}); checkpoints {summary['best']}, "
          f"{summary['last']}")

