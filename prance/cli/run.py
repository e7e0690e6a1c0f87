"""``prance run``: the whole pipeline, dense model to report, in one run folder (see :mod:`prance.pipeline`)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prance.pipeline.config import RunConfig

#: Flag (argparse dest) -> setting (dotted name in RUN/config.yaml).
_SETTINGS = {"mode": "mode", "budget": "budget", "schedule": "schedule", "seed": "seed", "limit": "limit",
             "threads": "threads", "device": "device", "dense_epochs": "dense.epochs", "meta_epochs": "meta.epochs",
             "selector_updates": "selector.updates", "finetune_epochs": "finetune.epochs"}


def add_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    """``run``: every flag defaults (to the --config file's value, else the schedule's)."""
    from prance.config import TOKEN_MODES
    from prance.pipeline.config import STAGES
    from prance.pipeline.schedules import SCHEDULES

    p = sub.add_parser("run", parents=[debug], help="the whole pipeline: dense model to report, resumable",
                       description="Train the dense ViT (or start from --init), the meta-network, the selector "
                       "(Result-to-Go PPO at --budget), joint and static-plan fine-tuning; evaluate everything on "
                       "the test split against the baselines at matched MACs, benchmark, and write report.md into "
                       "--out. Running the same command again skips finished stages and continues an interrupted "
                       "one; a changed setting that invalidates a finished stage is an error naming it. Under "
                       "`torchrun --nproc_per_node N` the training stages use every process.")
    p.add_argument("--data", default=None, metavar="fashion-mnist|PATH",
                   help="fashion-mnist (default) or an ImageNet-layout folder PATH with train/<class>/ and "
                        "val/<class>/ (its classes; without --init its image size up to 32 px and channels)")
    p.add_argument("--data-dir", default=None,
                   help="where the Fashion-MNIST IDX files are (default: the installed package's)")
    p.add_argument("--init", default=None, metavar="timm:PATH|PATH",
                   help="start from a local timm/DeiT .pth (fine-tuned on the data when its classes differ) or a "
                        "prance dense checkpoint, instead of training the dense model")
    p.add_argument("--mode", choices=TOKEN_MODES, default=None, help="token reduction (default merge)")
    p.add_argument("--budget", type=float, default=None,
                   help="mean MACs per image as a fraction of the dense model's, selector included (default 0.5)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default=None,
                   help="full (the headline recipe, default) or demo (the whole method in about half an hour on "
                        "2 CPU cores)")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="settings file, laid out like RUN/config.yaml (flags given override it)")
    p.add_argument("--out", default="runs/run", help="run folder (default runs/run); the same --out continues it")
    p.add_argument("--restart-from", default=None, choices=STAGES, metavar="STAGE",
                   help=f"redo this stage and every later one ({', '.join(STAGES)}); earlier ones are kept")
    p.add_argument("--reuse", default=None, metavar="RUN",
                   help="copy from the run folder RUN its leading stages done there with these same settings instead "
                        "of running them again (e.g. its dense model and meta-network for another budget)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                   help="any setting of RUN/config.yaml, dotted for a stage's (selector.encoder=cls, "
                        "bench.batch_sizes=[1,8,64]); the value is read as YAML; repeatable, applied after --config")
    p.add_argument("--dense-epochs", type=int, default=None, help="dense training epochs")
    p.add_argument("--meta-epochs", type=int, default=None, help="meta-network training epochs")
    p.add_argument("--selector-updates", type=int, default=None, help="PPO updates of the selector")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="joint fine-tuning epochs (and the static-plan fine-tune's, unless the config sets them)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many images of each split in every stage (a quick run on a data slice)")
    p.add_argument("--seed", type=int, default=None, help="random seed of every stage (default 0)")
    p.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N (under torchrun: each rank's GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.set_defaults(func=command)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's settings: the --config file, with the flags given on top."""
    from prance.pipeline.resolve import data_settings, resolve_config

    flags = {setting: getattr(args, dest) for dest, setting in _SETTINGS.items()}
    flags.update(data_settings(args.data, args.data_dir), init=args.init)
    return resolve_config(args.config, flags, _set_flags(args.settings))


def _set_flags(given: list[str]) -> dict[str, Any]:
    """``--set NAME=VALUE`` flags as settings (values parsed as YAML: 3, 0.5, true, cls, [1, 64])."""
    import yaml

    from prance.errors import PranceError

    out: dict[str, Any] = {}
    for item in given:
        name, eq, text = item.partition("=")
        if not eq or not name.strip():
            raise PranceError(f"--set {item}: give NAME=VALUE, e.g. --set selector.encoder=cls")
        try:
            out[name.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise PranceError(f"--set {item}: {text!r} is not a YAML value; quote or fix it") from None
    return out


def command(args: argparse.Namespace) -> None:
    from prance.pipeline import run_pipeline

    run = run_pipeline(config_from_args(args), args.out, restart_from=args.restart_from, reuse=args.reuse)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run complete: {run / 'report.md'} (settings {run / 'config.yaml'}, stages {run / 'stages.json'})")
