"""``prance visualize``: PNG of the patches kept, merged and pruned per stage."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prance.cli.common import add_data_arguments, add_device_argument, check_data_flag, check_positive, load_model
from prance.errors import PranceError
from prance.files import check_writable_dir


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``visualize``: which patches survive each stage under a plan."""
    v = sub.add_parser("visualize", parents=[debug], help="PNG of the patches kept, merged and pruned per stage",
                       description="Run images through a checkpoint under a plan and draw, per stage, which "
                       "patches survive (pruned: dimmed) and which were merged into one token (shared tint).")
    v.add_argument("--checkpoint", required=True, help="a prance checkpoint (e.g. RUN/best.pt)")
    v.add_argument("--plan", default="max", help="max, min or a YAML plan file (as for evaluate)")
    v.add_argument("--keep", type=float, default=None, help="instead of --plan: full widths, prune to this keep ratio")
    v.add_argument("--merge-keep", type=float, default=None,
                   help="instead of --plan: full widths, merge down to this keep ratio (after --keep if given)")
    v.add_argument("--num-images", type=int, default=8, help="images to draw (default 8)")
    add_data_arguments(v)
    v.add_argument("--seed", type=int, default=0, help="which test images (default 0)")
    v.add_argument("--out", default="tokens.png", help="PNG file to write (default tokens.png)")
    add_device_argument(v)
    v.set_defaults(func=command)


def _check_keep_flag(value: float | None, flag: str, min_keep: float) -> None:
    """A keep ratio from the command line: in [min_keep, 1] (NaN and inf fail the comparison too)."""
    if value is not None and not min_keep <= value <= 1:
        raise PranceError(f"{flag} {value} must be in [{min_keep:g}, 1] (the search space's min_keep to all "
                          f"tokens); e.g. {flag} 0.7")


def command(args: argparse.Namespace) -> None:
    """Draw --num-images images under --plan (or --keep/--merge-keep) into --out."""
    check_positive(args.num_images, "--num-images")
    check_data_flag(args.data)
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
    ckpt, model = load_model(args.checkpoint, device)
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

