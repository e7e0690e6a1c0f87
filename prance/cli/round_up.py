"""``prance round-up``: round an adaptive model's decisions up to K representatives per stage, recalibrated."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prance.cli.common import add_device_argument, check_positive, set_threads
from prance.errors import PranceError
from prance.files import check_writable_dir


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``round-up``: fit K representative decisions per stage onto an existing adaptive.pt."""
    r = sub.add_parser("round-up", parents=[debug], help="round an adaptive model's decisions up to K per stage "
                       "(fewer distinct plans, faster batches)",
                       description="Learn, on the adaptive model's holdout, K representative decisions per stage "
                       "and round every image's decision up to the first (cheapest on the holdout) that covers it "
                       "(never less compute than the selector asked), with the calibration knob set again so the "
                       "mean MACs still land on the budget. Writes a new adaptive file; the input is left as it is.")
    r.add_argument("--checkpoint", required=True, help="an adaptive model (RUN/adaptive.pt of train-selector)")
    r.add_argument("--k", type=int, required=True,
                   help="representative decisions per stage, the full-size one included (1: every stage full size)")
    r.add_argument("--out", required=True, help="the adaptive file to write (e.g. RUN/adaptive-k8.pt)")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    r.add_argument("--holdout-limit", type=int, default=None, help="use at most this many held-out images")
    r.add_argument("--data-dir", default=None, help="where the model's data set lives (default: its own)")
    r.add_argument("--batch-size", type=int, default=256, help="images per batch on the holdout (default 256)")
    r.add_argument("--seed", type=int, default=0, help="which held-out images --holdout-limit keeps (default 0)")
    add_device_argument(r)
    r.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    r.set_defaults(func=command)


def command(args: argparse.Namespace) -> None:
    """Fit --k representatives onto --checkpoint and write --out."""
    for flag in ("k", "holdout_limit", "batch_size"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    out = Path(args.out)
    if out.resolve() == Path(args.checkpoint).resolve():
        raise PranceError("--out must name a new file, not --checkpoint (the model without rounding stays as it is)")
    if out.exists() and not args.overwrite:
        raise PranceError(f"{out} exists; choose another --out or add --overwrite")
    check_writable_dir(out.parent if str(out.parent) else ".", "--out folder")
    set_threads(args.threads)
    from prance.devices import resolve_device
    from prance.training.round_up import round_up_file

    record = round_up_file(args.checkpoint, args.k, out, holdout_limit=args.holdout_limit, data_dir=args.data_dir,
                           seed=args.seed, batch_size=args.batch_size, device=resolve_device(args.device))
    before = {**record["without_round_up"], **record["without_round_up"].get("same_images", {})}
    before = {k: before.get(k, float("nan")) for k in ("holdout_macs_ratio", "holdout_top1", "knob")}
    print(f"round-up K={args.k} on {record['holdout_images']} held-out images: MACs {record['holdout_macs_ratio']:.4f} "
          f"of dense, top-1 {record['holdout_top1']:.2f}%, knob {record['knob']:+.4f} (without: MACs "
          f"{before['holdout_macs_ratio']:.4f}, top-1 {before['holdout_top1']:.2f}%, knob {before['knob']:+.4f}); "
          f"wrote {out}")
