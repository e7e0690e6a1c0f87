"""Meta-network training with weight sharing: the sandwich rule and in-place distillation.

Every step, on the same batch, the weight-sharing :class:`~prance.model.MetaViT` runs

* the largest subnet (:meth:`Plan.full`) — learns from the labels (cross-entropy with label
  smoothing) and, when a dense teacher is given, from the teacher's soft predictions;
* the smallest subnet (smallest widths, MLP ratios and heads, and the fewest tokens the
  search space allows) and ``num_random`` random subnets (by default one plan per image, keep
  ratios of the space's token mode included, in masked mode) — learn from the largest
  subnet's detached soft predictions (in-place distillation) or from the dense teacher.

What is sampled is defined in :mod:`prance.training.subnets`, from the search space alone
(its ``token_mode``, ``min_keep`` and ``keep_grid`` included), so the network is trained for
exactly the choices the selector can make. All subnet losses are summed and back-propagated
once, then one optimiser step is taken (DESIGN.md §1, "Training (weight sharing)").

The run itself — run folder, log, checkpoints, exact resume (also mid-epoch), DDP under
``torchrun`` with rank-0 writes — is the shared loop of :mod:`prance.training.run`; this module
adds the sandwich step (:class:`MetaTask`). The random subnets of a step come from a generator
seeded by (seed, step) alone, so every rank runs the same subnets, and the whole sandwich is one
DDP forward and one backward: gradients are all-reduced once per step.

Splits (DESIGN.md §8): the meta-network trains on the training split minus the holdout of its
pipeline — by default the one its ``--init`` checkpoint was trained with — and ``best.pt`` is
chosen on that holdout. The test split is never read here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from prance.config import SearchSpace, ViTConfig
from prance.data.splits import training_splits
from prance.errors import PranceError
from prance.evaluation.evaluate import evaluate
from prance.files import recorded_path
from prance.model.metavit import MetaViT
from prance.model.presets import create_model
from prance.model.timm_interop import from_timm
from prance.training.checkpoint import load_checkpoint, model_from_checkpoint
from prance.training.run import (
    BEST,
    LAST,
    LOG,
    DistContext,
    LoopSettings,
    RunFolder,
    check_same_settings,
    close_distributed,
    init_distributed,
    mix_seed,
    on_device,
    pipeline_holdout,
    train_loop,
)
from prance.training.subnets import (
    DEFAULT_TOKEN_MODE,
    RANDOM_SUBNETS,
    Subnet,
    largest_subnet,
    sample_subnets,
    smallest_subnet,
)

KIND = "meta"

DISTILL_SOURCES = ("largest", "teacher")


# ----------------------------------------------------------------------------- settings
@dataclass
class MetaTrainConfig:
    """Hyper-parameters of meta-network training (all plain values; stored in checkpoints)."""

    epochs: int = 2
    """Passes over the training data."""
    max_steps: int | None = None
    """Stop after this many optimiser steps in total (None: run all epochs)."""
    batch_size: int = 128
    """Images per step on each rank."""
    lr: float = 2.5e-4
    """Peak AdamW learning rate (fine-tuning from a dense model needs less than from scratch)."""
    min_lr: float = 1e-6
    """Learning rate at the end of the cosine schedule."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to ``lr`` over this many steps."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay (not applied to biases, norms, embeddings, cls token)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: off)."""
    label_smoothing: float = 0.1
    """Label smoothing of the largest subnet's cross-entropy."""
    augment: bool = True
    """Random crops and flips of the training images. A run of a hundred-odd steps from a dense model trained
    without them keeps more of its accuracy without them too."""
    num_random: int = 2
    """Random subnets per step, besides the largest and the smallest."""
    temperature: float = 1.0
    """Distillation temperature T (KL between softened distributions, scaled by T²)."""
    teacher_weight: float = 0.5
    """With a dense teacher: the largest subnet's loss is (1-w)·CE + w·KD(teacher)."""
    distill_from: str = "largest"
    """Soft targets of the smaller subnets: "largest" (in-place, detached) or "teacher"."""
    random_subnets: str = "per-image"
    """Random subnets: "per-image" (a plan per image, masked mode) or "batch-shared" (physical, faster)."""
    seed: int = 0
    """Seeds subnet sampling, data order, augmentation and (if no init weights) the model."""
    log_every: int = 20
    """Write a JSON-lines record every this many steps (and at every epoch end)."""
    checkpoint_every: int = 0
    """Also write ``last.pt`` every this many steps (0: at epoch ends only)."""

    def __post_init__(self) -> None:
        if self.distill_from not in DISTILL_SOURCES:
            raise PranceError(f"unknown distillation source {self.distill_from!r}; use largest or teacher")
        if self.num_random < 0:
            raise PranceError(f"num_random={self.num_random} must be 0 or more")
        if self.epochs < 1 or self.batch_size < 1 or self.log_every < 1:
            raise PranceError("epochs, batch size and log_every must be at least 1; fix the value")
        if self.max_steps is not None and self.max_steps < 1:
            raise PranceError(f"max_steps={self.max_steps} must be at least 1")
        if self.checkpoint_every < 0 or self.warmup_steps < 0:
            raise PranceError("checkpoint_every and warmup_steps must be 0 or more; fix the value")
        if self.temperature <= 0:
            raise PranceError(f"temperature {self.temperature} must be positive")
        if not 0.0 <= self.teacher_weight <= 1.0:
            raise PranceError(f"teacher_weight {self.teacher_weight} must be in [0, 1]")
        if self.random_subnets not in RANDOM_SUBNETS:
            raise PranceError(f"unknown random-subnet sampling {self.random_subnets!r}; use "
                              f"{' or '.join(RANDOM_SUBNETS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, min_lr=self.min_lr,
                            weight_decay=self.weight_decay, seed=self.seed, grad_clip=self.grad_clip,
                            warmup_steps=self.warmup_steps, max_steps=self.max_steps, log_every=self.log_every,
                            checkpoint_every=self.checkpoint_every)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetaTrainConfig":
        if "token_keep" in d:
            raise PranceError("this run was written by an older prance (--token-keep, replaced by the search "
                              "space's --token-mode and --min-keep); start a new run with another --out")
        return cls(**d)


# ----------------------------------------------------------------------------- subnets


class Sandwich(nn.Module):
    """Runs a list of subnets of one meta-network on the same batch in a single forward.

    Wrapping this (rather than the MetaViT) in DistributedDataParallel makes the whole
    sandwich one DDP forward followed by one backward, so gradients are reduced once per step.
    """

    def __init__(self, model: MetaViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, subnets: Sequence[Subnet]) -> list[torch.Tensor]:
        return [self.model(x, s.plan, mode=s.mode) for s in subnets]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², averaged over the batch.

    ``teacher`` is used as a fixed target (detached here).
    """
    t = temperature
    target = F.log_softmax(teacher.detach() / t, dim=-1)
    return F.kl_div(F.log_softmax(student / t, dim=-1), target, reduction="batchmean", log_target=True) * (t * t)


def sandwich_loss(
    logits: Sequence[torch.Tensor],
    subnets: Sequence[Subnet],
    labels: torch.Tensor,
    cfg: MetaTrainConfig,
    teacher_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of a sandwich (a plain sum over subnets) and each subnet's part.

    ``logits[0]`` must belong to the largest subnet.
    """
    if subnets[0].role != "largest":
        raise PranceError("the first subnet of a sandwich must be the largest")
    largest = logits[0]
    ce = F.cross_entropy(largest, labels, label_smoothing=cfg.label_smoothing)
    if teacher_logits is not None:
        w = cfg.teacher_weight
        loss_largest = (1 - w) * ce + w * distill_loss(largest, teacher_logits, cfg.temperature)
    else:
        loss_largest = ce
    if cfg.distill_from == "teacher":
        if teacher_logits is None:
            raise PranceError("distill_from='teacher' needs a dense teacher; pass --teacher PATH")
        target = teacher_logits
    else:
        target = largest.detach()
    parts = {"largest": loss_largest}
    for s, z in zip(subnets[1:], logits[1:], strict=True):
        parts[s.role] = distill_loss(z, target, cfg.temperature)
    total = torch.stack(list(parts.values())).sum()
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------- model sources
def load_init_model(source: str, space: SearchSpace | None = None, stage_depth: int = 3) -> MetaViT:
    """A MetaViT from a prance checkpoint (dense or meta) or a local timm/DeiT ``.pth`` (``[timm:]PATH``).

    ``space`` replaces the checkpoint's search space (it must fit the model).
    """
    return _load_init(source, space, stage_depth)[0]


def _load_init(source: str, space: SearchSpace | None = None, stage_depth: int = 3) -> tuple[MetaViT, str]:
    """:func:`load_init_model` and what the file held: "timm", or the prance checkpoint's kind."""
    path = source.removeprefix("timm:")
    if not Path(path).is_file():
        raise PranceError(f"{source}: file not found; give a prance checkpoint (e.g. RUN/best.pt) or a local "
                          "timm/DeiT .pth")
    if source.startswith("timm:") or not _is_prance_checkpoint(path):
        return from_timm(path, space=space, stage_depth=stage_depth), "timm"
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    if space is not None:
        space.check_fits(model.config)
        model.space = space
    return model, ckpt["kind"]


def _is_prance_checkpoint(path: str) -> bool:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — an unreadable file is reported by the loader that follows
        return True
    return isinstance(obj, dict) and obj.get("format") == "prance-checkpoint"


def space_with(model_config: ViTConfig, base: SearchSpace, **changes: Any) -> SearchSpace:
    """``base`` with the given fields replaced (None values are ignored), checked against the model."""
    changes = {k: v for k, v in changes.items() if v is not None}
    space = SearchSpace.from_dict({**base.to_dict(), **changes}) if changes else base
    space.check_fits(model_config)
    return space


# ----------------------------------------------------------------------------- training
#: Settings that may differ between a run and its resumption (``data_dir``: the same data elsewhere).
RESUMABLE_CHANGES = ("epochs", "max_steps", "log_every", "checkpoint_every", "data_dir")


class MetaTask:
    """One step: the sandwich of subnets on one batch; score: mean holdout top-1 of the largest and smallest."""

    def __init__(self, model: MetaViT, holdout: Dataset, cfg: MetaTrainConfig, ctx: DistContext,
                 teacher: MetaViT | None = None, progress: bool | None = None) -> None:
        if cfg.distill_from == "teacher" and teacher is None:
            raise PranceError("--distill-from teacher needs a dense teacher; pass --teacher PATH")
        if teacher is not None:
            if teacher.config.num_classes != model.config.num_classes:
                raise PranceError("the teacher predicts a different number of classes than the model; "
                                  "give a teacher trained on the same data")
            teacher.to(ctx.device).eval().requires_grad_(False)
        self.model, self.holdout, self.cfg, self.ctx = model, holdout, cfg, ctx
        self.teacher, self.progress = teacher, progress
        self.sandwich = Sandwich(model)

    def network(self) -> nn.Module:
        return self.sandwich

    def step(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, model = self.cfg, self.model
        generator = torch.Generator().manual_seed(mix_seed(cfg.seed, step, 0))  # the same subnets on every rank
        subnets = sample_subnets(model.config, model.space, cfg.num_random, generator, images.shape[0],
                                 cfg.random_subnets)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(images)
        logits = net(images, subnets)
        loss, parts = sandwich_loss(logits, subnets, labels, cfg, teacher_logits)
        top1 = 100.0 * float((logits[0].argmax(-1) == labels).float().mean())
        return loss, {**{f"loss_{k}": v for k, v in parts.items()}, "top1_largest": top1}

    def validate(self) -> tuple[dict[str, float], float]:
        metrics = validate_extremes(self.model, self.holdout, self.cfg.batch_size, self.ctx.device, self.progress)
        return metrics, (metrics["val_top1_largest"] + metrics["val_top1_smallest"]) / 2


def train_meta(
    model: MetaViT,
    train_set: Dataset,
    out_dir: str | os.PathLike[str],
    cfg: MetaTrainConfig,
    *,
    holdout_set: Dataset,
    split: dict[str, Any],
    teacher: MetaViT | None = None,
    resume: bool = False,
    overwrite: bool = False,
    args: dict[str, Any] | None = None,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` with the sandwich rule into ``out_dir``: ``last.pt`` / ``best.pt`` (kind "meta"), ``log.jsonl``.

    ``holdout_set`` scores the largest and smallest subnets after every epoch; ``best.pt`` keeps
    the best mean of the two. ``split`` (:meth:`TrainingSplits.record`) and ``args`` are stored in
    every checkpoint. ``resume`` continues from ``out_dir/last.pt`` (its weights, optimiser and
    step replace the given model's); ``stop_after`` pauses after that many steps, resumably.
    Returns a summary (final step, holdout metrics, paths).
    """
    ctx = ctx or DistContext()
    folder = RunFolder(out_dir, KIND, ctx)
    saved = folder.prepare(resume, overwrite)
    args = dict(args or {"train": cfg.to_dict()})
    if saved is not None:
        check_same_settings(_settings(args), _settings(saved["args"]), RESUMABLE_CHANGES, folder.path)
        if saved["config"] != model.config.to_dict() or saved["space"] != model.space.to_dict():
            raise PranceError(f"the run in {folder.path} trained another model shape or search space; resume with "
                              "the same --init and search-space options, or start a new --out")
    task = MetaTask(model, holdout_set, cfg, ctx, teacher, progress)
    describe = {"model": model.config.to_dict(), "space": model.space.to_dict(), "teacher": teacher is not None}
    return train_loop(task, train_set, folder, cfg.loop_settings(), args=args, split=split, resume_from=saved,
                      describe=describe, stop_after=stop_after, progress=progress)


def _settings(args: dict[str, Any]) -> dict[str, Any]:
    """A run's settings as one flat dict (``args`` holds ``run`` and ``train`` parts); training settings a run
    was recorded without (it predates them) read as their defaults, the value they had then."""
    return {**args.get("run", {}), **MetaTrainConfig().to_dict(), **args.get("train", {})}


def validate_extremes(
    model: MetaViT, val_set: Dataset, batch_size: int, device: torch.device, progress: bool | None = None
) -> dict[str, float]:
    """Top-1 and GMACs of the largest and the smallest subnet (as trained: fewest tokens) on ``val_set``."""
    loader = DataLoader(val_set, batch_size=max(batch_size, 256), shuffle=False)
    out = {}
    for name, plan in (("largest", largest_subnet(model.config)),
                       ("smallest", smallest_subnet(model.config, model.space))):
        r = evaluate(model, on_device(loader, device), plan, progress=progress, desc=f"validate {name}")
        out[f"val_top1_{name}"], out[f"val_gmacs_{name}"] = r["top1"], r["gmacs"]
    return out


# ----------------------------------------------------------------------------- whole run (CLI)
@dataclass
class MetaRunConfig:
    """Where the weights and data of a meta-training run come from (plain values, stored in checkpoints)."""

    init: str | None = None
    """Dense starting point: a prance checkpoint or ``[timm:]PATH`` of a local timm/DeiT .pth."""
    preset: str | None = None
    """Without ``init``: a randomly initialised preset (for smoke tests; normally start from a dense model)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """ViTConfig fields changed from the preset (only with ``preset``)."""
    teacher: str | None = None
    """Frozen dense teacher (prance checkpoint or timm .pth); "init" means the ``init`` weights."""
    space: dict[str, Any] = field(default_factory=dict)
    """Search-space fields changed from the starting model's (widths, mlp_ratios, elastic_heads, token_mode,
    min_keep, keep_grid, ...); without token_mode a dense start trains for merge (see ``prance.training.subnets``)."""
    data: str = "fashion-mnist"
    data_dir: str | None = None
    limit: int | None = None
    """Train on a random subset of this many images of the training part (the holdout is split off first)."""
    holdout: float | None = None
    """Fraction of the training split held out for every choice (None: the ``init`` checkpoint's, else 0.1)."""
    holdout_seed: int | None = None
    """Which images are held out (None: the ``init`` checkpoint's, else 0)."""
    val_limit: int | None = None
    """Validate on at most this many of the held-out images."""


def run_train_meta(
    run: MetaRunConfig,
    cfg: MetaTrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = "cpu",
    progress: bool | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Everything ``prance train-meta`` does: process group, model, teacher, splits, then :func:`train_meta`."""
    ctx = init_distributed(device)
    try:
        RunFolder(out_dir, KIND, ctx).check(resume, overwrite)  # before a long set-up
        run = replace(run, init=recorded_path(run.init),
                      teacher=run.teacher if run.teacher in (None, "init") else recorded_path(run.teacher))
        model = build_meta_model(run, cfg.seed)
        teacher_source = run.init if run.teacher == "init" else run.teacher
        if run.teacher == "init" and run.init is None:
            raise PranceError("--teacher init needs --init PATH")
        teacher = None if teacher_source is None else load_init_model(teacher_source)
        sources = {"--init": run.init, "--teacher": None if run.teacher == "init" else teacher_source}
        holdout = pipeline_holdout(run.data, sources, run.holdout, run.holdout_seed)
        run = replace(run, holdout=holdout.fraction, holdout_seed=holdout.seed)
        cfg_model = model.config
        splits = training_splits(run.data, img_size=cfg_model.img_size, in_chans=cfg_model.in_chans, holdout=holdout,
                                 train_augment=cfg.augment, root=run.data_dir, limit=run.limit,
                                 holdout_limit=run.val_limit, seed=cfg.seed)
        if splits.train.info.num_classes != cfg_model.num_classes:
            raise PranceError(f"the model has {cfg_model.num_classes} classes but {run.data} has "
                              f"{splits.train.info.num_classes}; start from a dense model trained on this data")
        args = {"run": asdict(run), "train": cfg.to_dict()}
        return train_meta(model, splits.train, out_dir, cfg, holdout_set=splits.holdout,
                          split=splits.record(run.data), teacher=teacher, resume=resume, overwrite=overwrite,
                          args=args, ctx=ctx, progress=progress, stop_after=stop_after)
    finally:
        close_distributed(ctx)


def build_meta_model(run: MetaRunConfig, seed: int) -> MetaViT:
    """The starting MetaViT of a run: dense weights from ``init`` (or a seeded random preset)."""
    kind = "preset"
    if run.init is not None:
        if run.model_overrides:
            raise PranceError("model overrides cannot change the shape of an --init model; drop them")
        model, kind = _load_init(run.init)
    elif run.preset is not None:
        torch.manual_seed(seed)
        model = create_model(run.preset, **run.model_overrides)
    else:
        raise PranceError("give --init PATH (a dense checkpoint or timm .pth) or --preset NAME")
    # A meta-network keeps the token mode it was trained for; a dense start has none of its own.
    token_mode = model.space.token_mode if kind not in ("dense", "timm", "preset") else DEFAULT_TOKEN_MODE
    model.space = space_with(model.config, model.space, **{"token_mode": token_mode, **run.space})
    return model


__all__ = [
    "BEST",
    "DISTILL_SOURCES",
    "DistContext",
    "MetaTask",
    "KIND",
    "LAST",
    "LOG",
    "MetaRunConfig",
    "MetaTrainConfig",
    "Sandwich",
    "Subnet",
    "build_meta_model",
    "distill_loss",
    "init_distributed",
    "load_init_model",
    "run_train_meta",
    "sample_subnets",
    "sandwich_loss",
    "space_with",
    "train_meta",
    "validate_extremes",
]
