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

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs with DistributedDataParallel
(gloo on CPU, nccl on GPU) and a DistributedSampler. The random subnets of a step come from a
generator seeded by (seed, step) alone, so every rank runs the same subnets; the whole
sandwich is one DDP forward and one backward, so gradients are all-reduced exactly once per
step and every rank ends with identical weights. Only rank 0 logs and writes checkpoints.

Randomness is derived from (seed, step, rank) at every step — subnet sampling, data
augmentation — and the data order from (seed, epoch), so a run resumed from any checkpoint
continues exactly as if it had never stopped.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from prance.config import SearchSpace, ViTConfig
from prance.data import build_dataset, holdout_split
from prance.errors import PranceError
from prance.evaluation.evaluate import evaluate
from prance.evaluation.sweep import HOLDOUT_SEED
from prance.model.metavit import MetaViT
from prance.model.presets import create_model
from prance.model.timm_interop import from_timm
from prance.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from prance.training.dense import JsonLog, param_groups, cosine_lr
from prance.training.subnets import (
    DEFAULT_TOKEN_MODE,
    RANDOM_SUBNETS,
    Subnet,
    largest_subnet,
    sample_subnets,
    smallest_subnet,
)

KIND = "meta"
LAST, BEST, LOG = "last.pt", "best.pt", "log.jsonl"

DISTILL_SOURCES = ("largest", "teacher")

#: Environment variable: when set, every rank writes its final state dict to
#: ``<out>/rank{r}_final.pt`` (used by the distributed test to compare ranks).
DUMP_RANKS_ENV = "PRANCE_DUMP_RANK_WEIGHTS"


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


# ----------------------------------------------------------------------------- optimiser
def build_optimizer(model: nn.Module, cfg: MetaTrainConfig) -> torch.optim.Optimizer:
    """AdamW with the dense loop's parameter groups (no decay on norms, biases, embeddings)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)


def lr_at(step: int, total_steps: int, cfg: MetaTrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at ``total_steps`` (the dense schedule)."""
    return cosine_lr(step, total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr)


# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world <= 1:
        return DistContext(device=torch.device(want))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


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


# ----------------------------------------------------------------------------- training loop
class _EpochSampler(DistributedSampler):
    """DistributedSampler (order fixed by (seed, epoch)) that can start an epoch part-way, to resume."""

    def __init__(self, dataset: Dataset, ctx: DistContext, seed: int) -> None:
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


#: Settings that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("epochs", "max_steps", "log_every", "checkpoint_every")


def train_meta(
    model: MetaViT,
    train_set: Dataset,
    out_dir: str | os.PathLike[str],
    cfg: MetaTrainConfig,
    *,
    teacher: MetaViT | None = None,
    val_set: Dataset | None = None,
    resume: bool = False,
    args: dict[str, Any] | None = None,
    ctx: DistContext | None = None,
    progress: bool | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``model`` with the sandwich rule into ``out_dir``: ``last.pt`` / ``best.pt`` (kind "meta"), ``log.jsonl``.

    ``resume`` continues from ``out_dir/last.pt`` (its weights, optimiser and step replace the
    given model's). ``val_set``: after every epoch the largest and smallest subnets are
    evaluated on it and ``best.pt`` keeps the epoch with the best mean of the two.
    ``stop_after`` ends this call after that many steps, as an interruption would.
    Returns a summary (final step, validation metrics, paths).
    """
    ctx = ctx or DistContext()
    out = Path(out_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.distill_from == "teacher" and teacher is None:
        raise PranceError("--distill-from teacher needs a dense teacher; pass --teacher PATH")
    model.to(ctx.device).train()
    if teacher is not None:
        if teacher.config.num_classes != model.config.num_classes:
            raise PranceError("the teacher predicts a different number of classes than the model; "
                              "give a teacher trained on the same data")
        teacher.to(ctx.device).eval().requires_grad_(False)

    sampler = _EpochSampler(train_set, ctx, cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=0)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    if steps_per_epoch < 1:
        raise PranceError(f"{len(train_set)} training images make no batch of {cfg.batch_size} per process; "
                          "lower --batch-size or use more data")
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    optimizer = build_optimizer(model, cfg)
    step, best_score, metrics = 0, -math.inf, {}
    last_path, best_path = out / LAST, out / BEST
    if resume:
        if not last_path.is_file():
            raise PranceError(f"nothing to resume in {out} (no {LAST}); drop --resume to start a new run there")
        ckpt = load_checkpoint(last_path, kind=KIND)
        state = ckpt["train_state"]
        _check_same_settings(cfg, MetaTrainConfig.from_dict(state["train_config"]), out)
        if ckpt["config"] != model.config.to_dict() or ckpt["space"] != model.space.to_dict():
            raise PranceError(f"the run in {out} trained another model shape or search space; resume with the "
                              "same --init and search-space options, or start a new --out")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best_score, metrics = int(state["step"]), float(state["best_score"]), dict(ckpt["metrics"])

    net: nn.Module = Sandwich(model)
    if ctx.distributed:
        # A parameter no subnet of the step touched (e.g. a stage map between equal widths)
        # gets no gradient; find_unused_parameters lets DDP finish its reduction anyway.
        net = nn.parallel.DistributedDataParallel(net, device_ids=None, find_unused_parameters=True)

    log = JsonLog(out / LOG) if ctx.is_main else None
    if log is not None:
        log.write(event="resume" if resume else "start", step=step, config=cfg.to_dict(),
                  world_size=ctx.world_size, train_images=len(train_set),
                  val_images=None if val_set is None else len(val_set), steps_per_epoch=steps_per_epoch,
                  total_steps=total_steps, model=model.config.to_dict(), space=model.space.to_dict(),
                  teacher=teacher is not None)
    quiet = (None if progress is None else not progress) if ctx.is_main else True
    bar = tqdm(total=total_steps, initial=step, desc="train-meta", disable=quiet)
    window: dict[str, float] = {}
    window_start, stop_at = time.perf_counter(), None if stop_after is None else step + stop_after
    while step < total_steps and (stop_at is None or step < stop_at):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.skip = in_epoch * cfg.batch_size
        batches = iter(loader)
        while in_epoch < steps_per_epoch and step < total_steps and (stop_at is None or step < stop_at):
            # --- this step's randomness depends on (seed, step) only: same subnets on every rank
            torch.manual_seed(_mix(cfg.seed, step, 1 + ctx.rank))  # this rank's augmentation
            images, labels = next(batches)
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            generator = torch.Generator().manual_seed(_mix(cfg.seed, step, 0))
            subnets = sample_subnets(model.config, model.space, cfg.num_random, generator, images.shape[0],
                                     cfg.random_subnets)

            # --- one sandwich: all subnets forward, summed loss, one backward, one optimiser step
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(images)
            logits = net(images, subnets)
            loss, parts = sandwich_loss(logits, subnets, labels, cfg, teacher_logits)
            if not torch.isfinite(loss):
                raise PranceError(f"meta training diverged (loss {float(loss)}) at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1
            in_epoch += 1

            # --- bookkeeping (rank 0 writes)
            top1 = 100.0 * float((logits[0].argmax(-1) == labels).float().mean())
            for k, v in {"loss": float(loss.detach()), **{f"loss_{k}": v for k, v in parts.items()},
                         "train_top1_largest": top1, "images": float(images.shape[0])}.items():
                window[k] = window.get(k, 0.0) + v
            window["n"] = window.get("n", 0.0) + 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
            epoch_end = in_epoch == steps_per_epoch or step == total_steps
            if step % cfg.log_every == 0 or epoch_end:
                n, seconds = window.pop("n"), time.perf_counter() - window_start
                images_done = window.pop("images")
                if log is not None:
                    log.write(event="step", step=step, epoch=round(step / steps_per_epoch, 4), lr=lr,
                              **{k: v / n for k, v in window.items()},
                              img_per_s=images_done * ctx.world_size / max(seconds, 1e-9))
                window, window_start = {}, time.perf_counter()
            if epoch_end or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                is_best = False
                if epoch_end and val_set is not None and ctx.is_main:
                    metrics = {**validate_extremes(model, val_set, cfg.batch_size, ctx.device, progress),
                               "epoch": round(step / steps_per_epoch, 4), "step": step}
                    score = (metrics["val_top1_largest"] + metrics["val_top1_smallest"]) / 2
                    is_best = score > best_score
                    best_score = max(best_score, score)
                    log.write(event="val", **metrics)
                    tqdm.write(f"step {step}: val top-1 largest {metrics['val_top1_largest']:.2f}%, "
                               f"smallest {metrics['val_top1_smallest']:.2f}%")
                if ctx.is_main:
                    train_state = {"optimizer": optimizer.state_dict(), "step": step,
                                   "epoch": step / steps_per_epoch, "best_score": best_score,
                                   "train_config": cfg.to_dict()}
                    if is_best:
                        save_checkpoint(best_path, model, KIND, train_state=train_state, metrics=metrics, args=args)
                    save_checkpoint(last_path, model, KIND, train_state=train_state, metrics=metrics, args=args)
                if ctx.distributed:
                    dist.barrier()
    bar.close()
    if ctx.is_main and val_set is None and step == total_steps:
        shutil.copyfile(last_path, best_path)  # nothing to choose by: the final weights are the best guess
    if os.environ.get(DUMP_RANKS_ENV):
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"rank{ctx.rank}_final.pt")
    done = step == total_steps
    if log is not None:
        log.write(**{**metrics, "event": "end" if done else "pause", "step": step})
    return {"out": str(out), "step": step, "total_steps": total_steps, "complete": done, **metrics,
            "last": str(last_path), "best": str(best_path)}


def _check_same_settings(cfg: MetaTrainConfig, saved: MetaTrainConfig, out: Path) -> None:
    for name, value in cfg.to_dict().items():
        if name not in RESUMABLE_CHANGES and value != saved.to_dict()[name]:
            raise PranceError(f"resuming {out} with {name}={value!r}, but the run used {saved.to_dict()[name]!r}; "
                              "resume with the same settings or start a new --out")


def validate_extremes(
    model: MetaViT, val_set: Dataset, batch_size: int, device: torch.device, progress: bool | None = None
) -> dict[str, float]:
    """Top-1 and GMACs of the largest and the smallest subnet (as trained: fewest tokens) on ``val_set``."""
    loader = DataLoader(val_set, batch_size=max(batch_size, 256), shuffle=False)
    out = {}
    for name, plan in (("largest", largest_subnet(model.config)),
                       ("smallest", smallest_subnet(model.config, model.space))):
        r = evaluate(model, _on_device(loader, device), plan, progress=progress, desc=f"validate {name}")
        out[f"val_top1_{name}"], out[f"val_gmacs_{name}"] = r["top1"], r["gmacs"]
    return out


def _on_device(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for x, y in loader:
        yield x.to(device), y.to(device)


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
    """Use a random subset of this many training images (before the holdout is split off)."""
    holdout: float = 0.1
    """Fraction of the training images kept out of training (subnets/selectors are chosen on it); 0: none."""
    val_limit: int | None = None
    """Validate on at most this many of the held-out images."""


def run_train_meta(
    run: MetaRunConfig,
    cfg: MetaTrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Everything ``prance train-meta`` does: process group, model, teacher, data, then :func:`train_meta`."""
    ctx = init_distributed(device)
    try:
        out = Path(out_dir)
        if resume and overwrite:
            raise PranceError("--resume and --overwrite contradict each other; give one of them")
        if ctx.is_main and not resume and not overwrite and any((out / n).exists() for n in (LAST, BEST)):
            raise PranceError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
                              "over, or choose another --out")
        if ctx.distributed:
            dist.barrier()
        if overwrite and ctx.is_main and (out / LOG).exists():
            (out / LOG).unlink()
        model = build_meta_model(run, cfg.seed)
        teacher = None
        if run.teacher is not None:
            source = run.init if run.teacher == "init" else run.teacher
            if source is None:
                raise PranceError("--teacher init needs --init PATH")
            teacher = load_init_model(source)
        cfg_model = model.config
        train_full = build_dataset(run.data, "train", img_size=cfg_model.img_size, in_chans=cfg_model.in_chans,
                                   train_augment=True, root=run.data_dir, limit=run.limit, seed=HOLDOUT_SEED)
        if train_full.info.num_classes != cfg_model.num_classes:
            raise PranceError(f"the model has {cfg_model.num_classes} classes but {run.data} has "
                              f"{train_full.info.num_classes}; start from a dense model trained on this data")
        val_set = None
        if run.holdout > 0:
            train_set, _ = holdout_split(train_full, run.holdout, HOLDOUT_SEED)
            val_full = build_dataset(run.data, "train", img_size=cfg_model.img_size, in_chans=cfg_model.in_chans,
                                     train_augment=False, root=run.data_dir, limit=run.limit, seed=HOLDOUT_SEED)
            _, val_set = holdout_split(val_full, run.holdout, HOLDOUT_SEED)
            if run.val_limit is not None and run.val_limit < len(val_set):
                val_set = val_set.select(slice(0, run.val_limit))
        else:
            train_set = train_full
        args = {"run": asdict(run), "train": cfg.to_dict(), "holdout_seed": HOLDOUT_SEED}
        return train_meta(model, train_set, out, cfg, teacher=teacher, val_set=val_set, resume=resume, args=args,
                          ctx=ctx, progress=progress, stop_after=stop_after)
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


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


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers, so (seed, step, stream) never collide in practice."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


__all__ = [
    "BEST",
    "DISTILL_SOURCES",
    "DistContext",
    "HOLDOUT_SEED",
    "KIND",
    "LAST",
    "LOG",
    "MetaRunConfig",
    "MetaTrainConfig",
    "Sandwich",
    "Subnet",
    "build_meta_model",
    "build_optimizer",
    "distill_loss",
    "init_distributed",
    "load_init_model",
    "lr_at",
    "run_train_meta",
    "sample_subnets",
    "sandwich_loss",
    "space_with",
    "train_meta",
    "validate_extremes",
]
