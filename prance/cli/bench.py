"""``prance bench``: wall-clock speed of PRANCE and its baselines at matched MACs (see :mod:`prance.bench`)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from prance.bench import (DEFAULT_BATCH_SIZES, METHODS, MethodOptions, benchmark, check_args, format_table,
                          load_images, load_model, load_plans, load_static_plan, write_outputs)
from prance.cli.common import set_threads
from prance.errors import PranceError
from prance.files import check_writable_dir


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``bench``: timm-style timing (warm-up, timed runs) of every method at one MACs target."""
    from prance.model.presets import DEFAULT_PRESET

    p = sub.add_parser("bench", parents=[debug], help="wall-clock speed of PRANCE and its baselines at matched MACs",
                       description="Time dense (timm and ours), EViT, ToMe, the static subnet and PRANCE's engine at "
                       "one MACs target; prints a table and writes bench.json and bench.png into --out. With an "
                       "adaptive checkpoint (RUN/adaptive.pt) PRANCE is the adaptive model deciding for itself "
                       "(selector plans) on test images of its data set, and the target is its mean MACs there.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None,
                     help="a prance checkpoint (e.g. RUN/best.pt), or an adaptive model (RUN/adaptive.pt)")
    src.add_argument("--timm", default=None, metavar="PATH", help="a local timm/DeiT .pth (plain ViT layout)")
    src.add_argument("--preset", default=None,
                     help=f"a preset with random weights (default {DEFAULT_PRESET}; e.g. deit-small, fmnist-tiny)")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads of a --timm model whose width is not a standard DeiT/ViT width")
    p.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                   help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--target-macs", type=float, default=None,
                   help="MACs target as a fraction of dense, in (0, 1] (default 0.5; an adaptive checkpoint's own mean "
                        "MACs)")
    p.add_argument("--budget", type=float, default=None,
                   help="adaptive checkpoint: the budget its selector decides under (default: the one it was "
                        "calibrated for; others only within a trained --budget-range)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per method and batch size (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per method (default 5)")
    p.add_argument("--rounds", type=int, default=4,
                   help="timed runs are split into this many interleaved rounds (default 4; 1 = one method after "
                        "the other, like timm)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; recorded)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu; recorded, and synchronised "
                   "around every timed call)")
    p.add_argument("--evit-keep", type=float, default=None, help="EViT keep rate (default: matched to the target)")
    p.add_argument("--tome-r", type=int, default=None, help="ToMe merges per block (default: matched to the target)")
    p.add_argument("--static-plan", default=None, metavar="YAML",
                   help="static subnet plan from the sweep (default: closest uniform subnet to the target)")
    p.add_argument("--plans", default=None, metavar="FILE",
                   help="per-image plans for prance: torch.save'd Plan or YAML list (default: random per-image "
                        "plans at the target MACs)")
    p.add_argument("--keep-grid", type=float, default=None,
                   help="snap random per-image keep ratios to this step (default: the search space's)")
    p.add_argument("--distinct-plans", type=int, default=None, metavar="K",
                   help="random plans: deal out only K distinct plans (how speed depends on the diversity of "
                        "per-image decisions; default: every image its own)")
    p.add_argument("--profile", action="store_true",
                   help="also write profile-<method>-b<batch>.txt: the operators each method spends its time in")
    p.add_argument("--pool", type=int, default=None,
                   help="images (and per-image plans) cycled through (default: max(64, largest batch))")
    p.add_argument("--data", default=None,
                   help="time on test images of fashion-mnist or folder, or on random ones (random); default: a "
                        "checkpoint's own data set when it records one, else random")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX folder, or an ImageNet-style root (default: the checkpoint's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images and plans (default 0)")
    p.add_argument("--out", default="bench-results", help="folder for bench.json and bench.png (default bench-results)")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> dict[str, Any]:
    """Check the options, benchmark, print the table, write JSON and PNG.

    The JSON records the equivalent ``prance bench`` command line, every option spelled out, so
    the run can be repeated exactly.
    """
    batch_sizes = _parse_ints(args.batch_sizes, "--batch-sizes")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    check_args(batch_sizes, methods, 0.5 if args.target_macs is None else args.target_macs, args.runs, args.warmup,
               args.rounds)
    set_threads(args.threads)
    if args.pool is not None and args.pool < max(batch_sizes):
        raise PranceError(f"--pool {args.pool} must be at least the largest batch size ({max(batch_sizes)})")
    if args.keep_grid is not None and not 0 < args.keep_grid <= 1:
        raise PranceError(f"--keep-grid must be in (0, 1], got {args.keep_grid}")
    if args.distinct_plans is not None and args.plans is not None:
        raise PranceError("--distinct-plans applies to random plans only; drop it or --plans")
    from prance.devices import resolve_device

    command_line = _command_line(args)
    device = resolve_device(args.device)
    out = check_writable_dir(args.out)
    subject = load_model(args.checkpoint, args.timm, args.preset, num_heads=args.num_heads)
    model = subject.model
    if subject.adaptive is None and args.budget is not None:
        raise PranceError("--budget is for an adaptive checkpoint (RUN/adaptive.pt); use --target-macs for this model")
    if subject.adaptive is not None:
        if args.data == "random":
            raise PranceError("an adaptive model decides from the images it sees; drop --data random (it is timed "
                              "on test images of its data set)")
        if args.budget is not None:
            subject.adaptive.set_budget(args.budget)
    pool = args.pool or max(64, *batch_sizes)
    images = load_images(subject, args.data, args.data_dir, pool, args.seed)
    if subject.adaptive is not None and images.tensor is None:
        raise PranceError(f"{args.checkpoint} records no data set; give --data and --data-dir of the images it "
                          "decides on")
    static_plans = None if args.static_plan is None else load_static_plan(args.static_plan, model)
    plans, plans_label = load_plans(args.plans, model) if args.plans is not None else (None, None)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    result = benchmark(subject.adaptive or model, batch_sizes=batch_sizes, methods=methods,
                       target_macs=args.target_macs, runs=args.runs, warmup=args.warmup, rounds=args.rounds,
                       images=images.tensor, images_label=images.label, image_indices=images.indices, pool=pool,
                       options=MethodOptions(args.evit_keep, args.tome_r, static_plans, args.static_plan, plans,
                                             plans_label, args.keep_grid, args.distinct_plans),
                       seed=args.seed, model_label=subject.label, command=command_line, log=log,
                       profile_dir=out if args.profile else None, device=device)
    print(format_table(result))
    json_path, png_path = write_outputs(result, out)
    print(f"wrote {json_path} and {png_path}")
    return result


def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PranceError(f"{flag} takes comma-separated whole numbers, got {text!r}; e.g. {flag} 1,8,64") from None


def _command_line(args: argparse.Namespace) -> str:
    words = ["prance", "bench"]
    for dest, value in vars(args).items():
        if dest in ("func", "command", "debug") or value is None or value is False:
            continue
        words += [f"--{dest.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return shlex.join(words)
