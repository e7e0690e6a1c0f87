"""Command line: ``prance <command> [options]`` (also ``python -m prance``).

Commands:
    train-dense   train the full-size ViT (the teacher and starting point of the meta-network)
    evaluate      accuracy, MACs, parameters and tokens of a checkpoint under static plans
    train-meta    train the weight-sharing meta-network (sandwich rule; torchrun for several processes)
    sweep         accuracy vs MACs of static subnets, and the best one for a MACs budget
    bench         wall-clock speed of PRANCE and its baselines at matched MACs (timm-style benchmark)

Every problem the user can fix is reported as one line, ``prance: error: <problem; fix>``,
with exit code 2 and no traceback (``--debug`` shows it). Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from prance.config import TOKEN_MODES
from prance.errors import PranceError
from prance.files import check_writable_dir, removed_if_left_empty

if TYPE_CHECKING:
    import torch

    from prance.model.metavit import MetaViT

DATASETS = ("fashion-mnist", "folder")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are PranceErrors, so they print as one line like every other error."""

    def error(self, message: str) -> NoReturn:
        raise PranceError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from prance.data.provenance import EVALUATION_SPLITS
    from prance.model.presets import DEFAULT_PRESET

    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks for errors")
    parser = _Parser(prog="prance", description="PRANCE: per-image adaptive channel widths and token counts "
                     "for Vision Transformers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # --- train-dense: every option defaults to None, so --resume can tell given from omitted
    t = sub.add_parser("train-dense", parents=[debug], help="train the dense (full-size) ViT",
                       description="Train the dense ViT; writes last.pt, best.pt and log.jsonl into --out.")
    t.add_argument("--preset", default=None, help=f"model shape (default {DEFAULT_PRESET}); see prance.model.PRESETS")
    t.add_argument("--data", default=None, help="fashion-mnist (default) or folder")
    t.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder, or an ImageNet-style root/{train,val}")
    t.add_argument("--epochs", type=int, default=None, help="passes over the training set (default 10)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step (default 128)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    t.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up length (default 1)")
    t.add_argument("--limit", type=int, default=None, help="train on a random subset of this many images")
    t.add_argument("--val-limit", type=int, default=None, help="validate on a random subset of this many held-out "
                   "images")
    t.add_argument("--holdout", type=float, default=None,
                   help="fraction of the training split held out for every choice, never trained on (default 0.1)")
    t.add_argument("--holdout-seed", type=int, default=None, help="which images are held out (default 0)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    t.add_argument("--out", required=True, help="run folder (created if missing)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    t.add_argument("--overwrite", action="store_true", help="start over in a folder that already holds a run")
    t.add_argument("--init", default=None, metavar="[timm:]PATH",
                   help="start from a local timm/DeiT .pth (its shape replaces the preset's)")
    t.add_argument("--img-size", type=int, default=None, help="override the preset's image size")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default 0)")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="also save last.pt every N steps (default: at epoch ends)")
    t.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (under torchrun: each rank's GPU)")
    t.set_defaults(func=_cmd_train_dense)

    # --- evaluate
    e = sub.add_parser("evaluate", parents=[debug], help="evaluate a checkpoint under static plans",
                       description="Top-1, GMACs, parameters and tokens of a checkpoint on the test split of the "
                       "data it was trained on (or on its held-out training images, --split holdout).")
    e.add_argument("--checkpoint", required=True, help="a prance checkpoint (e.g. RUN/best.pt)")
    _add_data_arguments(e)
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
    e.add_argument("--seed", type=int, default=0, help="seed of the data subset and of random:K (default 0)")
    e.add_argument("--out", default=None, help="write the JSON result here")
    e.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    _add_device_argument(e)
    e.set_defaults(func=_cmd_evaluate)
    _add_meta_commands(sub, debug)
    _add_selector_command(sub, debug)
    _add_bench_command(sub, debug)

    # --- visualize
    v = sub.add_parser("visualize", parents=[debug], help="PNG of the patches kept, merged and pruned per stage",
                       description="Run images through a checkpoint under a plan and draw, per stage, which "
                       "patches survive (pruned: dimmed) and which were merged into one token (shared tint).")
    v.add_argument("--checkpoint", required=True, help="a prance checkpoint (e.g. RUN/best.pt)")
    v.add_argument("--plan", default="max", help="max, min or a YAML plan file (as for evaluate)")
    v.add_argument("--keep", type=float, default=None, help="instead of --plan: full widths, prune to this keep ratio")
    v.add_argument("--merge-keep", type=float, default=None,
                   help="instead of --plan: full widths, merge down to this keep ratio (after --keep if given)")
    v.add_argument("--num-images", type=int, default=8, help="images to draw (default 8)")
    _add_data_arguments(v)
    v.add_argument("--seed", type=int, default=0, help="which test images (default 0)")
    v.add_argument("--out", default="tokens.png", help="PNG file to write (default tokens.png)")
    _add_device_argument(v)
    v.set_defaults(func=_cmd_visualize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prance`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "func", None) is None:
            raise PranceError("give a command: train-dense, evaluate, train-meta, sweep, bench or visualize "
                              "(see `prance --help`)")
        with removed_if_left_empty(_output_folders(args)):
            args.func(args)
        return 0
    except PranceError as e:
        if debug:
            raise
        return _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        return _fail("interrupted; continue a training run with --resume (finished epochs are kept)", 2)


#: Commands whose --out names a file (its folder is what they create); the others' --out is a folder.
_FILE_OUTPUTS = ("evaluate", "visualize")


def _output_folders(args: argparse.Namespace) -> list[str]:
    """The folders a command may create for --out: removed again if it fails and leaves them empty."""
    out = getattr(args, "out", None)
    if out is None:
        return []
    return [os.path.dirname(out) or "."] if args.command in _FILE_OUTPUTS else [out]


def _fail(message: str, code: int) -> int:
    """Print the one-line error the user sees and return the exit code."""
    lines = message.strip().splitlines()
    # A PranceError raised in a DataLoader worker comes back as "Caught PranceError in DataLoader worker
    # process N." plus the worker's traceback, whose last line holds the original message.
    original = [line for line in lines if line.startswith("prance.errors.PranceError: ")]
    if original:
        lines = [original[-1].removeprefix("prance.errors.PranceError: ")]
    print(f"prance: error: {lines[0] if lines else 'unknown error'}", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------- checks
def check_positive(value: float | None, flag: str) -> None:
    if value is not None and not value > 0:
        raise PranceError(f"{flag} must be positive, got {value}")


def _check_data_flag(data: str | None) -> None:
    if data is not None and data not in DATASETS:
        raise PranceError(f"unknown dataset {data!r}; use one of {', '.join(DATASETS)}")


def _add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--data / --data-dir of the commands that read a checkpoint: by default, the data it was trained on."""
    p.add_argument("--data", default=None,
                   help="fashion-mnist or folder (default: the data set the checkpoint was trained on)")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX folder, or an ImageNet-style root/{train,val} (default: the checkpoint's "
                        "own, for its own data set)")


def _add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")


def _load_model(path: str, device: torch.device) -> tuple[dict[str, Any], MetaViT]:
    """A checkpoint and its model (eval mode), on ``device``."""
    from prance.training.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path)
    return ckpt, model_from_checkpoint(ckpt).to(device).eval()


def _check_holdout(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction < 1:
        raise PranceError(f"--holdout {fraction} must be in (0, 1), e.g. 0.1: training commands always hold out "
                          "images for their choices")


def _set_threads(threads: int | None) -> None:
    check_positive(threads, "--threads")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- train-dense
_TRAIN_FLAGS = {  # argparse dest -> DenseTrainConfig field
    "preset": "preset", "data": "data", "data_dir": "data_dir", "epochs": "epochs", "batch_size": "batch_size",
    "lr": "lr", "warmup_epochs": "warmup_epochs", "limit": "limit", "val_limit": "val_limit", "seed": "seed",
    "init": "init", "img_size": "img_size", "workers": "num_workers", "holdout": "holdout",
    "holdout_seed": "holdout_seed", "checkpoint_every": "checkpoint_every",
}


def _cmd_train_dense(args: argparse.Namespace) -> None:
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
    _check_holdout(given.get("holdout"))
    if "preset" in given and given["preset"] not in PRESETS:
        raise PranceError(f"unknown preset {given['preset']!r}; choose one of {', '.join(PRESETS)}")
    _check_data_flag(given.get("data"))
    if "init" in given and not Path(given["init"].removeprefix("timm:")).is_file():
        raise PranceError(f"--init {given['init']}: file not found; give a local timm/DeiT .pth")
    if "init" in given and "preset" in given:
        raise PranceError("--init sets the model's shape from the file; drop --preset")
    _set_threads(args.threads)
    # A resumed run's settings come from its last.pt; flags given now must agree with them.
    cfg = resume_config(args.out, **given) if args.resume else DenseTrainConfig(**given)
    out = check_writable_dir(args.out)
    summary = train_dense(cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"dense training in {summary['out']}: {summary['epochs']} epochs, best holdout top-1 "
          f"{summary['best_top1']:.2f}% (epoch {summary['best_epoch']}); checkpoints {summary['best']}, "
          f"{summary['last']}")


# ----------------------------------------------------------------------------- evaluate
def _cmd_evaluate(args: argparse.Namespace) -> None:
    check_positive(args.batch_size, "--batch-size")
    check_positive(args.limit, "--limit")
    _check_data_flag(args.data)
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            raise PranceError(f"--out {out} is a folder; give a file name such as {out / 'eval.json'}")
        check_writable_dir(out.parent if str(out.parent) else ".", "--out folder")
    _set_threads(args.threads)

    from torch.utils.data import DataLoader

    from prance.data.provenance import checkpoint_dataset
    from prance.devices import resolve_device
    from prance.evaluation.evaluate import evaluate, plans_from_spec, write_json
    from prance.plan import Plan
    from prance.tokens.baselines import parse_reducer
    from prance.training.subnets import require_trained_for

    device = resolve_device(args.device)
    ckpt, model = _load_model(args.checkpoint, device)
    cfg = model.config
    from prance.adaptive import SELECTOR_KINDS

    if ckpt["kind"] in SELECTOR_KINDS:
        return _evaluate_adaptive(args, ckpt, device)
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
                    "split": args.split, "device": str(device), "budget": ckpt.get("budget"),
                    "calibration": ckpt.get("calibration"), "summary": summary, "images": records}, args.out)
        write_csv(records, csv_path)
        print(f"wrote {args.out} and {csv_path} (per-image decisions)")


# ----------------------------------------------------------------------------- visualize
def _check_keep_flag(value: float | None, flag: str, min_keep: float) -> None:
    """A keep ratio from the command line: in [min_keep, 1] (NaN and inf fail the comparison too)."""
    if value is not None and not min_keep <= value <= 1:
        raise PranceError(f"{flag} {value} must be in [{min_keep:g}, 1] (the search space's min_keep to all "
                          f"tokens); e.g. {flag} 0.7")


def _cmd_visualize(args: argparse.Namespace) -> None:
    check_positive(args.num_images, "--num-images")
    _check_data_flag(args.data)
    out = Path(args.out)
    check_writable_dir(out.parent if str(out.parent) else ".", "--out folder")
    from dataclasses import replace

    import torch

    from prance.data.provenance import checkpoint_dataset
    from prance.devices import resolve_device
    from prance.evaluation.evaluate import plans_from_spec
    from prance.evaluation.visualize import visualize
    from prance.plan import Plan

    device = resolve_device(args.device)
    ckpt, model = _load_model(args.checkpoint, device)
    cfg = model.config
    if args.keep is not None or args.merge_keep is not None:
        _check_keep_flag(args.keep, "--keep", model.space.min_keep)
        _check_keep_flag(args.merge_keep, "--merge-keep", model.space.min_keep)
        keep = 1.0 if args.keep is None else args.keep
        merge_keep = 1.0 if args.merge_keep is None else args.merge_keep
        mode = "prune_merge" if keep < 1 and merge_keep < 1 else "merge" if merge_keep < 1 else "prune"
        model.space = replace(model.space, token_mode=mode)
        plan = Plan.uniform(cfg, [cfg.embed_dim] * cfg.num_stages, cfg.mlp_ratio, keep=keep, merge_keep=merge_keep)
    else:
        plan = plans_from_spec(args.plan, cfg, model.space)[0][1]
    dataset = checkpoint_dataset(ckpt, args.checkpoint, data=args.data, data_dir=args.data_dir,
                                 limit=args.num_images, seed=args.seed)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    names = dataset.info.class_names
    titles = [str(names[int(y)])[:14] for y in labels]
    visualize(model, torch.stack(images).to(device), plan, out, dataset.info.mean, dataset.info.std, titles)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- train-meta and sweep
def _add_meta_commands(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``train-meta`` (weight-sharing training) and ``sweep`` (best static subnet for a MACs budget)."""
    m = sub.add_parser("train-meta", parents=[debug], help="train the weight-sharing meta-network (sandwich rule)",
                       description="Train the meta-network from a dense model with the sandwich rule (largest, "
                       "smallest and K random subnets per step, in-place distillation); writes last.pt, best.pt "
                       "(kind meta) and log.jsonl into --out. Under `torchrun --nproc_per_node N` it uses "
                       "DistributedDataParallel.")
    m.add_argument("--init", default=None, metavar="[timm:]PATH",
                   help="dense starting point: a prance checkpoint (e.g. RUN/best.pt) or a local timm/DeiT .pth")
    m.add_argument("--preset", default=None, help="without --init: start from a random preset (smoke tests only)")
    m.add_argument("--teacher", default=None, metavar="PATH|init",
                   help="frozen dense teacher for distillation (a checkpoint or timm .pth; 'init' = the --init weights)")
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
    m.add_argument("--out", required=True, help="run folder (created if missing)")
    m.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    m.add_argument("--overwrite", action="store_true", help="start over in a folder that already holds a run")
    m.add_argument("--checkpoint-every", type=int, default=0, help="also save last.pt every N steps (default: epochs)")
    m.add_argument("--log-every", type=int, default=20, help="log.jsonl line every N steps (default 20)")
    m.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (under torchrun: each rank's GPU)")
    m.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    m.set_defaults(func=_cmd_train_meta)

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
    _add_data_arguments(s)
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
    _add_device_argument(s)
    s.set_defaults(func=_cmd_sweep)


def _float_list(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise PranceError(f"{flag} {text!r}: give comma-separated numbers, e.g. 2,3,4") from None


def _cmd_train_meta(args: argparse.Namespace) -> None:
    from prance.training.meta import MetaRunConfig, MetaTrainConfig, run_train_meta

    for flag in ("epochs", "batch_size", "lr", "limit", "val_limit", "max_steps", "log_every"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    _check_holdout(args.holdout)
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
    _set_threads(args.threads)
    out = check_writable_dir(args.out)
    run = MetaRunConfig(init=args.init, preset=args.preset, teacher=args.teacher, space=space, data=args.data,
                        data_dir=args.data_dir, limit=args.limit, holdout=args.holdout,
                        holdout_seed=args.holdout_seed, val_limit=args.val_limit)
    cfg = MetaTrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                          warmup_steps=args.warmup_steps, num_random=args.num_random, temperature=args.temperature,
                          teacher_weight=args.teacher_weight, distill_from=args.distill_from,
                          random_subnets=args.random_subnets, seed=args.seed, log_every=args.log_every,
                          checkpoint_every=args.checkpoint_every)
    summary = run_train_meta(run, cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        val = (f"; held-out top-1 largest {summary['val_top1_largest']:.2f}%, smallest "
               f"{summary['val_top1_smallest']:.2f}%" if "val_top1_largest" in summary else "")
        print(f"meta training in {summary['out']}: {summary['step']}/{summary['total_steps']} steps{val}; "
              f"checkpoints {summary['last']}, {summary['best']}")


def _cmd_sweep(args: argparse.Namespace) -> None:
    check_positive(args.budget_gmacs, "--budget-gmacs")
    check_positive(args.count, "--count")
    for flag in ("holdout_limit", "test_limit", "batch_size"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    _check_data_flag(args.data)
    _set_threads(args.threads)
    out = check_writable_dir(args.out)

    from prance.accounting import count_macs
    from prance.data.provenance import check_same_classes, data_source, trained_on
    from prance.devices import resolve_device
    from prance.evaluation.sweep import format_table, run_sweep, sweep_data
    from prance.training.run import pipeline_holdout

    device = resolve_device(args.device)
    ckpt, model = _load_model(args.checkpoint, device)
    dense_gmacs = count_macs(model) / 1e9
    if args.budget_gmacs is not None and args.budget_gmacs > dense_gmacs:
        raise PranceError(f"--budget-gmacs {args.budget_gmacs} is above the full network's {dense_gmacs:.4f} "
                          "GMACs; give a budget in GMACs (1e9 MACs) at most that large")
    compare: dict[str, tuple[str, dict[str, Any], MetaViT]] = {}
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep or not label:
            raise PranceError(f"--compare {item!r}: use LABEL=PATH, e.g. dense=runs/dense/best.pt")
        compare[label] = (path, *_load_model(path, device))
    origin = trained_on(ckpt)
    data, data_dir = data_source(origin, args.data, args.data_dir)
    holdout = pipeline_holdout(data, {"--checkpoint": args.checkpoint}, args.holdout)  # the run's own
    sets = sweep_data(model.config, data=data, data_dir=data_dir, holdout=holdout, holdout_limit=args.holdout_limit,
                      test_limit=args.test_limit, with_test=not args.no_test)
    check_same_classes(origin, sets.holdout.info, args.checkpoint, data_dir)
    for path, other_ckpt, _ in compare.values():
        check_same_classes(trained_on(other_ckpt), sets.holdout.info, path, data_dir)
    result = run_sweep(model, sets, out, budget_gmacs=args.budget_gmacs, count=args.count, seed=args.seed,
                       batch_size=args.batch_size, compare={k: m for k, (_, _, m) in compare.items()}, progress=None,
                       meta={"checkpoint": str(args.checkpoint), "kind": ckpt["kind"], "holdout": holdout.fraction,
                             "holdout_seed": holdout.seed, "data": data, "device": str(device)})
    print(format_table(result["rows"]))
    best = result["best"]
    if best is not None:
        test = "" if best["test_top1"] is None else f", test top-1 {best['test_top1']:.2f}%"
        print(f"best static subnet within {best['budget_gmacs']} GMACs: {best['name']} ({best['gmacs']:.4f} GMACs, "
              f"held-out top-1 {best['holdout_top1']:.2f}%{test}); plan {best['plan_file']}")
    print(f"wrote {out / 'sweep.json'}, {out / 'sweep.csv'}, {out / 'sweep.png'}")


# ----------------------------------------------------------------------------- train-selector
def _add_selector_command(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``train-selector``: PPO with the Result-to-Go reward on a frozen meta-network, under a MACs budget."""
    from prance.selector.features import ENCODERS

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
    p.add_argument("--encoder", choices=ENCODERS, default="keys",
                   help="state: 'keys' (the paper's per-token key means, default) or 'cls' (cls features)")
    p.add_argument("--updates", type=int, default=300, help="PPO updates, one rollout each (default 300)")
    p.add_argument("--batch-size", type=int, default=128, help="images per rollout and process (default 128)")
    p.add_argument("--hidden", type=int, default=128, help="selector MLP width (default 128)")
    p.add_argument("--mlp-per-stage", action="store_true", help="one MLP ratio per stage instead of per block")
    p.add_argument("--keep-penalty", type=float, default=0.01, help="penalty on kept tokens (default 0.01)")
    p.add_argument("--lr", type=float, default=3e-4, help="PPO Adam learning rate (default 3e-4)")
    p.add_argument("--limit", type=int, default=None, help="roll out on a random subset of this many training images")
    p.add_argument("--holdout-limit", type=int, default=None, help="calibrate on at most this many held-out images")
    p.add_argument("--data-dir", default=None, help="where the meta-network's data set lives (default: its own)")
    p.add_argument("--checkpoint-every", type=int, default=25, help="write last.pt every N updates (default 25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", required=True, help="run folder (created if missing)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder that already holds a run")
    _add_device_argument(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=_cmd_train_selector)


def _cmd_train_selector(args: argparse.Namespace) -> None:
    from prance.accounting import count_macs
    from prance.data.provenance import trained_on
    from prance.training.checkpoint import load_checkpoint, model_from_checkpoint
    from prance.training.selector import SelectorTrainConfig, train_selector

    for flag in ("updates", "batch_size", "hidden", "lr", "limit", "holdout_limit", "checkpoint_every", "gmacs"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    ckpt = load_checkpoint(args.meta, kind=("meta", "joint"))
    budget = 0.5 if args.budget is None else args.budget
    if args.gmacs is not None:
        dense = count_macs(model_from_checkpoint(ckpt)) / 1e9
        budget = args.gmacs / dense
        if not 0 < budget <= 1:
            raise PranceError(f"--gmacs {args.gmacs} is above the dense model's {dense:.4f} GMACs; give at most that")
    trained = trained_on(ckpt)
    _set_threads(args.threads)
    out = check_writable_dir(args.out)
    cfg = SelectorTrainConfig(budget=budget, updates=args.updates, batch_size=args.batch_size, encoder=args.encoder,
                              hidden=args.hidden, mlp_per_stage=args.mlp_per_stage, keep_penalty=args.keep_penalty,
                              ppo={"lr": args.lr}, seed=args.seed, limit=args.limit, holdout_limit=args.holdout_limit,
                              checkpoint_every=args.checkpoint_every, data=trained.data or "fashion-mnist",
                              data_dir=args.data_dir or trained.data_dir)
    summary = train_selector(args.meta, cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0 and "adaptive" in summary:
        print(f"selector in {summary['out']}: {summary['update']} updates; on the holdout top-1 "
              f"{summary['holdout_top1']:.2f}% at {summary['holdout_macs_ratio']:.4f} of the dense MACs (budget "
              f"{budget:.4g}); adaptive model {summary['adaptive']}")
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"selector in {summary['out']}: paused at update {summary['update']}/{summary['updates']}; continue "
              "with --resume")


# ----------------------------------------------------------------------------- bench
def _add_bench_command(sub: Any, debug: argparse.ArgumentParser) -> None:
    from prance.evaluation.bench import add_arguments

    b = sub.add_parser("bench", parents=[debug], help="wall-clock speed of PRANCE and its baselines at matched MACs",
                       description="Time dense (timm and ours), EViT, ToMe, the static subnet and PRANCE's engine at "
                       "one MACs target; prints a table and writes bench.json and bench.png into --out.")
    add_arguments(b)
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> None:
    from prance.evaluation.bench import run

    run(args)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
