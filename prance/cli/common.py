"""What several commands share: the --data/--device/--threads/--holdout flags, their checks, model loading."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from prance.errors import PranceError

if TYPE_CHECKING:
    import torch

    from prance.model.metavit import MetaViT

DATASETS = ("fashion-mnist", "folder")


def check_positive(value: float | None, flag: str) -> None:
    if value is not None and not value > 0:
        raise PranceError(f"{flag} must be positive, got {value}")


def check_data_flag(data: str | None) -> None:
    if data is not None and data not in DATASETS:
        raise PranceError(f"unknown dataset {data!r}; use one of {', '.join(DATASETS)}")


def check_holdout(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction < 1:
        raise PranceError(f"--holdout {fraction} must be in (0, 1), e.g. 0.1: training commands always hold out "
                          "images for their choices")


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--data / --data-dir of the commands that read a checkpoint: by default, the data it was trained on."""
    p.add_argument("--data", default=None,
                   help="fashion-mnist or folder (default: the data set the checkpoint was trained on)")
    p.add_argument("--data-dir", default=None,
                   help="Fashion-MNIST IDX folder, or an ImageNet-style root/{train,val} (default: the checkpoint's "
                        "own, for its own data set)")


def add_run_folder_arguments(p: argparse.ArgumentParser) -> None:
    """``--out``, ``--resume`` and ``--overwrite`` of every training command (one run folder each)."""
    p.add_argument("--out", required=True, help="run folder (created if missing)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder that already holds a run")


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")


def set_threads(threads: int | None) -> None:
    check_positive(threads, "--threads")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def load_model(path: str, device: torch.device) -> tuple[dict[str, Any], MetaViT]:
    """A checkpoint and its model (eval mode), on ``device``."""
    from prance.training.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path)
    return ckpt, model_from_checkpoint(ckpt).to(device).eval()
