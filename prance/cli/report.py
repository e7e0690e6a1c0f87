"""``prance report RUN``: report.md, results.json and figures/ of a `prance run` folder, from its own files."""

from __future__ import annotations

import argparse
from typing import Any

from prance.cli.common import add_device_argument, set_threads
from prance.errors import PranceError


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``report``: rebuild a run's report from the files its stages wrote (nothing is trained or re-evaluated)."""
    r = sub.add_parser("report", parents=[debug], help="report.md and results.json of a prance run folder",
                       description="Write RUN/report.md, RUN/results.json and RUN/figures/*.png from the files the "
                       "stages of `prance run` wrote: the headline table on the test split (dense, PRANCE, PRANCE "
                       "before fine-tuning, the static-plan fine-tune, the best static subnet, EViT, ToMe), the "
                       "verdict, speed from the bench, and the figures. Stages that have not run are marked "
                       "'not run yet'. Only the token overlays run the final model, on a few test images.")
    r.add_argument("run", metavar="RUN", help="the run folder (the --out of `prance run`)")
    r.add_argument("--overlays", type=int, default=6,
                   help="test images in the token-overlay figure (default 6; 0: no overlay, no model run)")
    add_device_argument(r)
    r.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    r.set_defaults(func=command)


def command(args: argparse.Namespace) -> None:
    """Write the report of RUN and say where it is."""
    if args.overlays < 0:
        raise PranceError(f"--overlays must be 0 or more, got {args.overlays}")
    set_threads(args.threads)
    from prance.devices import resolve_device
    from prance.evaluation.report import write_report

    path = write_report(args.run, device=str(resolve_device(args.device)), overlays=args.overlays)
    print(f"wrote {path}, {path.parent / 'results.json'} and {path.parent / 'figures'}/")
