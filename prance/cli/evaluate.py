"""``prance evaluate``: accuracy, MACs, parameters and tokens of a checkpoint (static plans or its selector)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prance.cli.common import add_data_arguments, add_device_argument, check_data_flag, check_positive, set_threads
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

    from prance.evaluation.checkpoint import describe, evaluate_checkpoint, write_evaluation

    result = evaluate_checkpoint(args.checkpoint, plan=args.plan, baselines=args.baseline, budget=args.budget,
                                 split=args.split, data=args.data, data_dir=args.data_dir, limit=args.limit,
                                 seed=args.seed, batch_size=args.batch_size, device=args.device)
    for line in describe(result):
        print(line)
    if args.out is not None:
        written = write_evaluation(result, args.out)
        print(f"wrote {' and '.join(map(str, written))}" + (" (per-image decisions)" if len(written) > 1 else ""))
