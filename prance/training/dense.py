"""Train the dense (full-size) ViT: the teacher and starting point of the meta-network.

When no pretrained weights exist (DESIGN.md §7), the pipeline first trains the plain ViT
here; every later stage starts from its ``best.pt``. A step is cross-entropy with label
smoothing on the full-size network; the run itself (cosine LR with linear warm-up per step,
AdamW, checkpoints, exact resume also mid-epoch, DDP under torchrun) is the shared loop of
:mod:`prance.training.run`.

Splits (DESIGN.md §8): the model trains on the training split minus a seeded holdout
(``holdout`` of it, picked by ``holdout_seed``, see :mod:`prance.data.splits`); the best
epoch is chosen on the holdout. The test split is never read here.

The model is initialised from ``seed``; the same settings on the same machine and thread
count give the same weights bit for bit (CPU). Only ``epochs`` (and logging, checkpoint
frequency, workers, where the data lives) may change on resume; a longer run stretches the
cosine schedule, so it differs from a run planned that long.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from prance.config import ViTConfig
from prance.data.splits import DEFAULT_HOLDOUT_FRACTION, DEFAULT_HOLDOUT_SEED, Holdout, training_splits
from prance.errors import PranceError
from prance.evaluation.evaluate import evaluate
from prance.files import recorded_path
from prance.model.metavit import MetaViT
from prance.model.presets import preset_config
from prance.model.timm_interop import from_timm
from prance.training.checkpoint import load_checkpoint, model_from_checkpoint
from prance.training.run import (
    BEST,
    LAST,
    LOG,
    DistContext,
    JsonLog,
    LoopSettings,
    RunFolder,
    check_same_settings,
    close_distributed,
    cosine_lr,
    init_distributed,
    on_device,
    param_groups,
    train_loop,
)

KIND = "dense"


@dataclass
class DenseTrainConfig:
    """Hyper-parameters of dense training (defaults: fmnist-tiny on Fashion-MNIST, 2 CPU cores)."""

    # --- model
    preset: str = "fmnist-tiny"  # named shape, see prance.model.PRESETS
    img_size: int | None = None  # override the preset's input size (must be a multiple of the patch size)
    init: str | None = None  # local timm/DeiT .pth to start from; its shape then replaces the preset's
    model_overrides: dict[str, Any] = field(default_factory=dict)  # any other ViTConfig fields (tests use toy shapes)
    # --- data
    data: str = "fashion-mnist"  # "fashion-mnist" or "folder"
    data_dir: str | None = None  # Fashion-MNIST IDX folder, or the root of an ImageNet-style folder
    limit: int | None = None  # train on a random subset of this many images (quick runs)
    val_limit: int | None = None  # validate on a random subset of this many held-out images
    holdout: float = DEFAULT_HOLDOUT_FRACTION  # fraction of the training split held out for every choice
    holdout_seed: int = DEFAULT_HOLDOUT_SEED  # which images are held out (the same in every stage of a pipeline)
    num_workers: int = 0  # DataLoader processes; Fashion-MNIST transforms whole batches, 0 is fastest on 2 cores
    # --- optimisation
    epochs: int = 10  # passes over the training set
    # images per step (and process). On 2 CPU cores 64 trains as many images per second as 128 with twice the
    # steps: 62.9 vs 55.6 % holdout top-1 after 2 epochs of 12.8k images (32: 63.4 %, 13 % slower).
    batch_size: int = 64
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-5  # learning rate at the end of the cosine
    warmup_epochs: float = 1.0  # linear warm-up from 0, counted in (fractional) epochs, applied per step
    weight_decay: float = 0.05  # AdamW decay on weight matrices; none on norms, biases, pos_embed, cls_token
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moments
    label_smoothing: float = 0.1  # cross-entropy target smoothing
    # Random crop + flip of the training images (padded crop up to 64 px, RandomResizedCrop above). It is what
    # reaches 90 % on Fashion-MNIST in the long schedule; a run of about one epoch learns faster without it.
    augment: bool = True
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    # --- reproducibility and logging
    seed: int = 0  # model init, shuffling and augmentation
    log_every: int = 50  # write a "step" line to log.jsonl every this many steps
    checkpoint_every: int = 0  # also write last.pt every this many steps (0: at epoch ends only)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # lists come back from checkpoints
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be positive, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}"),
            (self.warmup_epochs >= 0, f"warm-up epochs must be >= 0, got {self.warmup_epochs}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be positive, got {self.grad_clip}"),
            (self.limit is None or self.limit >= 1, f"limit must be at least 1, got {self.limit}"),
            (self.val_limit is None or self.val_limit >= 1, f"val limit must be at least 1, got {self.val_limit}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.log_every >= 1, f"log_every must be at least 1, got {self.log_every}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PranceError(message + "; fix the value")
        Holdout(self.holdout, self.holdout_seed)  # checks the fraction

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseTrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, min_lr=self.min_lr,
                            weight_decay=self.weight_decay, seed=self.seed, betas=self.betas,
                            grad_clip=self.grad_clip, warmup_epochs=self.warmup_epochs, log_every=self.log_every,
                            checkpoint_every=self.checkpoint_every, num_workers=self.num_workers)


#: Settings that may differ between a run and its resumption: the length of the run (which
#: stretches the schedule), logging and checkpoint frequency, workers, and where the same data
#: set lives (e.g. on another machine).
RESUMABLE_CHANGES = ("epochs", "log_every", "checkpoint_every", "num_workers", "data_dir")


def resume_config(out_dir: str | os.PathLike[str], **changes: Any) -> DenseTrainConfig:
    """The settings of the run in ``out_dir`` (from its ``last.pt``), with ``changes`` applied."""
    last = Path(out_dir) / LAST
    if not last.is_file():
        raise PranceError(f"nothing to resume in {out_dir} (no {LAST}); drop --resume to start a new run there")
    saved = DenseTrainConfig.from_dict(load_checkpoint(last, kind=KIND)["args"])
    return replace(saved, **changes)


class DenseTask:
    """One step: cross-entropy (label smoothing) of the full-size network; score: holdout top-1."""

    def __init__(self, model: MetaViT, holdout: Dataset, cfg: DenseTrainConfig, ctx: DistContext) -> None:
        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.holdout = DataLoader(holdout, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)

    def network(self) -> nn.Module:
        return self.model

    def step(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = net(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        return loss, {"acc": 100.0 * float((logits.argmax(dim=-1) == labels).float().mean())}

    def validate(self) -> tuple[dict[str, float], float]:
        val = evaluate(self.model, on_device(self.holdout, self.ctx.device), desc="validate")
        metrics = {"holdout_top1": val["top1"], "holdout_images": val["images"], "gmacs": val["gmacs"],
                   "params_m": val["params_m"]}
        return metrics, val["top1"]


def train_dense(
    cfg: DenseTrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = "cpu",
    stop_after: int | None = None,
    progress: bool | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train a dense ViT into ``out_dir`` (``last.pt``, ``best.pt``, ``log.jsonl``, ``split.json``); returns a summary.

    ``resume`` continues the run in ``out_dir``; ``overwrite`` starts over in a folder that
    already holds a run (its checkpoints are replaced as the new run saves its own).
    ``stop_after`` pauses this call after that many steps, resumably. Under torchrun every
    process trains its shard (DDP). ``progress``: tqdm bars (None: only on a terminal).
    ``verbose``: one summary line per epoch.
    """
    cfg = replace(cfg, init=recorded_path(cfg.init))  # a checkpoint names its start absolutely
    ctx = init_distributed(device)
    try:
        folder = RunFolder(out_dir, KIND, ctx)
        saved = folder.prepare(resume, overwrite)
        if saved is not None:
            saved_cfg = DenseTrainConfig.from_dict(saved["args"])  # fields it lacks take their defaults
            check_same_settings(cfg.to_dict(), saved_cfg.to_dict(), RESUMABLE_CHANGES, folder.path)
        task, train_set, split = build_dense_task(cfg, saved, ctx)
        summary = train_loop(task, train_set, folder, cfg.loop_settings(), args=cfg.to_dict(), split=split,
                             resume_from=saved, describe={"model": task.model.config.to_dict()},
                             stop_after=stop_after, progress=progress, verbose=verbose)
    finally:
        close_distributed(ctx)
    return {**summary, "best_top1": summary["best_score"]}


def build_dense_task(
    cfg: DenseTrainConfig, saved: dict[str, Any] | None, ctx: DistContext
) -> tuple[DenseTask, Dataset, dict[str, Any]]:
    """The model (fresh, from ``cfg.init``, or the shape of the run being resumed), its data and split record."""
    if cfg.init is not None and (cfg.img_size is not None or cfg.model_overrides):
        raise PranceError("--img-size and model overrides cannot change a pretrained (--init) model's shape; "
                          "drop them")
    torch.manual_seed(cfg.seed)
    pretrained = from_timm(_init_path(cfg.init)) if cfg.init is not None and saved is None else None
    if saved is not None:
        config = ViTConfig.from_dict(saved["config"])
    else:
        config = pretrained.config if pretrained is not None else _model_config(cfg)
    splits = training_splits(cfg.data, img_size=config.img_size, in_chans=config.in_chans,
                             holdout=Holdout(cfg.holdout, cfg.holdout_seed), train_augment=cfg.augment,
                             root=cfg.data_dir, limit=cfg.limit, holdout_limit=cfg.val_limit, seed=cfg.seed)
    num_classes = splits.train.info.num_classes
    torch.manual_seed(cfg.seed)
    if saved is not None:
        model = model_from_checkpoint(saved)
    elif pretrained is not None:
        model = _with_head(pretrained, num_classes)
    else:
        model = MetaViT(replace(config, num_classes=num_classes))
    if model.config.num_classes != num_classes:
        raise PranceError(f"the model has {model.config.num_classes} classes but the data has {num_classes}; "
                          "train a new run for this data set")
    return DenseTask(model, splits.holdout, cfg, ctx), splits.train, splits.record(cfg.data)


def _model_config(cfg: DenseTrainConfig) -> ViTConfig:
    """The preset's shape with the run's overrides (``num_classes`` is fixed later by the data)."""
    overrides = dict(cfg.model_overrides)
    if cfg.img_size is not None:
        overrides["img_size"] = cfg.img_size
    return preset_config(cfg.preset, **overrides)


def _with_head(model: MetaViT, num_classes: int) -> MetaViT:
    """``model`` with a new, randomly initialised classifier for ``num_classes`` (if it differs).

    Fine-tuning on another data set keeps the backbone and starts a new head, as timm does.
    """
    if model.config.num_classes == num_classes:
        return model
    fresh = MetaViT(replace(model.config, num_classes=num_classes), model.space)
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    fresh.load_state_dict({**fresh.state_dict(), **weights})
    return fresh


def _init_path(init: str) -> str:
    """``timm:PATH`` or ``PATH``: a local timm/DeiT state-dict file."""
    return init.removeprefix("timm:")


__all__ = ["BEST", "KIND", "LAST", "LOG", "DenseTask", "DenseTrainConfig", "JsonLog", "build_dense_task", "cosine_lr",
           "param_groups", "resume_config", "train_dense"]
