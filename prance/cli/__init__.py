"""Command line: ``prance <command> [options]`` (also ``python -m prance``).

Commands (one module each in this package; shared flags and checks in ``common.py``):
    run             the whole pipeline, dense model to report, in one resumable run folder
    train-dense     train the full-size ViT (the teacher and starting point of the meta-network)
    evaluate        accuracy, MACs, parameters and tokens of a checkpoint under static plans (or its selector)
    train-meta      train the weight-sharing meta-network (sandwich rule; torchrun for several processes)
    sweep           accuracy vs MACs of static subnets, and the best one for a MACs budget
    train-selector  the per-image selector (Result-to-Go PPO on a frozen meta-network)
    finetune        joint fine-tuning under the selector's decisions, or the static-plan baseline
    round-up        an adaptive model's decisions rounded up to K per stage, recalibrated (a new file)
    bench           wall-clock speed of PRANCE and its baselines at matched MACs (timm-style benchmark)
    visualize       PNG of the patches kept, merged and pruned per stage
    report          report.md, results.json and figures of a `prance run` folder, from its own files
    compare         several run folders' headline rows in one table and plot

Every problem the user can fix is reported as one line, ``prance: error: <problem; fix>``,
with exit code 2 and no traceback (``--debug`` shows it). Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from prance.cli import (bench, compare, evaluate, finetune, report, round_up, run, sweep, train_dense, train_meta,
                        train_selector, visualize)
from prance.errors import PranceError
from prance.files import removed_if_left_empty

#: One module per command, in the order ``prance --help`` lists them.
COMMANDS = (run, train_dense, evaluate, train_meta, sweep, train_selector, finetune, round_up, bench, visualize, report,
            compare)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are PranceErrors, so they print as one line like every other error."""

    def error(self, message: str) -> NoReturn:
        raise PranceError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show full tracebacks for errors")
    parser = _Parser(prog="prance", description="PRANCE: per-image adaptive channel widths and token counts "
                     "for Vision Transformers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub, debug)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prance`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "func", None) is None:
            raise PranceError("give a command: run, train-dense, evaluate, train-meta, sweep, train-selector, "
                              "finetune, round-up, bench, visualize, report or compare (see `prance --help`)")
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
        again = ("run the same command again to continue (finished stages are kept)" if _command(argv) == "run" else
                 "continue a training run with --resume (finished epochs are kept)")
        return _fail(f"interrupted; {again}", 2)


def _command(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (its first argument that is not a flag)."""
    return next((a for a in argv if not a.startswith("-")), None)


#: Commands whose --out names a file (its folder is what they create); the others' --out is a folder.
_FILE_OUTPUTS = ("evaluate", "visualize", "round-up")


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
