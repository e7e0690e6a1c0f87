"""``prance compare RUN [RUN ...]``: several run folders' headline rows in one table and one plot."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``compare``: the headline rows of several `prance run` folders side by side (nothing is re-run)."""
    c = sub.add_parser("compare", parents=[debug], help="several prance run folders in one table and plot",
                       description="Put the headline rows of several `prance run` folders (e.g. one token mode at "
                       "several budgets, or several modes) into OUT/comparison.md, comparison.json and "
                       "comparison.png: test top-1, MACs / dense, parameters, tokens after the last stage and "
                       "speed-up over the dense model of the same run's bench, read from each run's own files.")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders (the --out of `prance run`)")
    c.add_argument("--evaluation", action="append", default=[], metavar="FILE",
                   help="also a test-split evaluation of an adaptive model (prance evaluate --out FILE.json), e.g. a "
                   "budget-range selector at one budget; one row, with speed if a --bench timed it; repeatable")
    c.add_argument("--bench", action="append", default=[], metavar="FILE",
                   help="the bench.json of `prance bench --checkpoint ADAPTIVE.pt --budget B` for one --evaluation: "
                   "matched to it by the decisions' per-image MACs, its speed-ups go into that row; repeatable")
    c.add_argument("--out", required=True, help="folder for comparison.md, comparison.json and comparison.png")
    c.set_defaults(func=command)


def command(args: argparse.Namespace) -> None:
    from prance.evaluation.compare import write_comparison

    path = write_comparison(args.runs, args.out, args.evaluation, args.bench)
    print(path.read_text(), end="")
    print(f"wrote {path}, {path.parent / 'comparison.json'} and {path.parent / 'comparison.png'}")
