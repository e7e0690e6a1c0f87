"""``prance bench``: wall-clock speed of PRANCE and its baselines at matched MACs."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``bench``: timm-style timing (warm-up, timed runs) of every method at one MACs target."""
    from prance.evaluation.bench import add_arguments

    b = sub.add_parser("bench", parents=[debug], help="wall-clock speed of PRANCE and its baselines at matched MACs",
                       description="Time dense (timm and ours), EViT, ToMe, the static subnet and PRANCE's engine at "
                       "one MACs target; prints a table and writes bench.json and bench.png into --out.")
    add_arguments(b)
    b.set_defaults(func=command)


def command(args: argparse.Namespace) -> None:
    from prance.evaluation.bench import run

    run(args)
