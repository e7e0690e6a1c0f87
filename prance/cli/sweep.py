"""``prance sweep``: accuracy vs MACs of static subnets, and the best one for a MACs budget."""

from __future__ import annotations

import argparse
from typing import Any

from prance.cli.common import add_data_arguments, add_device_argument, check_data_flag, check_positive, set_threads
from prance.errors import PranceError
from prance.files import check_writable_dir


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``sweep``: >= 10 static subnets, the best within a budget chosen on held-out training images."""
    s = sub.add_parser("sweep", parents=[debug], help="accuracy vs MACs of static subnets; best one for a budget",
                       description="Evaluate >= 10 static subnets of a meta-network, write sweep.json/.csv/.png, and "
                       "choose the best one within --budget-gmacs on held-out TRAINING images (never the test "
                       "set); its plan is written to best_plan.yaml (usable with `evaluate --plan`).")
    s.add_argument("--checkpoint", required=True, help="a meta (or dense) checkpoint, e.g. RUN/last.pt")
    s.add_argument("--budget-gmacs", type=float, default=None, help="MACs budget per image, in GMACs")
    s.add_argument("--count", type=int, default=12, help="static subnets to evaluate (default 12)")
    s.add_argument("--compare", action="append", default=[], metavar="LABEL=PATH",
                   help="also evaluate the same subnets with another checkpoint's weights on the test split "
                        "(e.g. dense=runs/dense/best.pt); repeatable")
    add_data_arguments(s)
    s.add_argument("--holdout", type=float, default=None,
                   help="holdout fraction of the training data (default: the one the checkpoint was trained with, "
                        "else 0.1; another one is an error)")
    s.add_argument("--holdout-limit", type=int, default=None, help="use at most this many held-out images")
    s.add_argument("--test-limit", type=int, default=None, help="test on a random subset of this many images")
    s.add_argument("--no-test", action="store_true", help="skip the test split (choice only)")
    s.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random subnets (default 0)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_device_argument(s)
    s.set_defaults(func=command)


def command(args: argparse.Namespace) -> None:
    check_positive(args.budget_gmacs, "--budget-gmacs")
    check_positive(args.count, "--count")
    for flag in ("holdout_limit", "test_limit", "batch_size"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    check_data_flag(args.data)
    set_threads(args.threads)
    out = check_writable_dir(args.out)

    from prance.evaluation.sweep import format_table, sweep_checkpoint

    compare: dict[str, str] = {}
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep or not label:
            raise PranceError(f"--compare {item!r}: use LABEL=PATH, e.g. dense=runs/dense/best.pt")
        compare[label] = path
    result = sweep_checkpoint(args.checkpoint, out, compare=compare, data=args.data, data_dir=args.data_dir,
                              holdout=args.holdout, holdout_limit=args.holdout_limit, test_limit=args.test_limit,
                              with_test=not args.no_test, budget_gmacs=args.budget_gmacs, count=args.count,
                              seed=args.seed, batch_size=args.batch_size, device=args.device, progress=None)
    print(format_table(result["rows"]))
    best = result["best"]
    if best is not None:
        test = "" if best["test_top1"] is None else f", test top-1 {best['test_top1']:.2f}%"
        print(f"best static subnet within {best['budget_gmacs']} GMACs: {best['name']} ({best['gmacs']:.4f} GMACs, "
              f"held-out top-1 {best['holdout_top1']:.2f}%{test}); plan {best['plan_file']}")
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.csv'}, {out / 'sweep.png'}")
