"""Train the dense (full-size) ViT: the teacher and starting point of the meta-network.

When no pretrained weights exist (DESIGN.md §7), the pipeline first trains the plain ViT
here; every later stage starts from its ``best.pt``. The loop reads top to bottom:

    set up (run folder, data, model, optimizer, resume) → for each epoch:
    seed → minibatch updates (cosine LR with linear warm-up per step, label smoothing,
    AdamW) → validation on the holdout → JSON-lines log → atomic checkpoints (``last.pt``, ``best.pt``).

Splits (DESIGN.md §8): the model trains on the training split minus a seeded holdout
(``holdout`` of it, picked by ``holdout_seed``, see :mod:`prance.data.splits`); the best
epoch is chosen on the holdout. The test split is never read here.

Determinism: the model is initialised from ``seed``, and every epoch reseeds torch, numpy,
Python and the sampler from ``(seed, epoch)``, so an epoch's shuffling and augmentation
depend on nothing that ran before it. The same settings on the same machine and thread
count give the same weights bit for bit (CPU).

Resume works at epoch granularity: ``last.pt`` is written after every epoch, and
``resume=True`` continues from it. Because each epoch is reseeded and the learning rate
is a pure function of the global step, a run interrupted and resumed ends with exactly
the weights of an uninterrupted run. The steps of an epoch that was interrupted are
redone. Only ``epochs`` may change on resume (to train longer; the cosine schedule then
stretches to the new length, so the result differs from a run planned that long).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from prance.config import ViTConfig
from prance.data.splits import DEFAULT_HOLDOUT_FRACTION, DEFAULT_HOLDOUT_SEED, Holdout, training_splits
from prance.errors import PranceError
from prance.evaluation.evaluate import evaluate
from prance.model.metavit import MetaViT
from prance.model.presets import preset_config
from prance.model.timm_interop import from_timm
from prance.training.checkpoint import load_checkpoint, model_from_checkpoint, rng_state, save_checkpoint, set_rng_state

KIND = "dense"
LAST, BEST, LOG = "last.pt", "best.pt", "log.jsonl"


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
    batch_size: int = 128  # images per step
    lr: float = 1e-3  # peak learning rate, reached at the end of warm-up
    min_lr: float = 1e-5  # learning rate at the end of the cosine
    warmup_epochs: float = 1.0  # linear warm-up from 0, counted in (fractional) epochs, applied per step
    weight_decay: float = 0.05  # AdamW decay on weight matrices; none on norms, biases, pos_embed, cls_token
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moments
    label_smoothing: float = 0.1  # cross-entropy target smoothing
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    # --- reproducibility and logging
    seed: int = 0  # model init, shuffling and augmentation
    log_every: int = 50  # write a "step" line to log.jsonl every this many steps

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
        ]
        for ok, message in checks:
            if not ok:
                raise PranceError(message + "; fix the value")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseTrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: Settings that may differ between a run and its resumption: the length of the run (which
#: stretches the schedule), logging, and where the same data set lives (e.g. on another machine).
RESUMABLE_CHANGES = ("epochs", "log_every", "data_dir")


def resume_config(out_dir: str | os.PathLike[str], **changes: Any) -> DenseTrainConfig:
    """The settings of the run in ``out_dir`` (from its ``last.pt``), with ``changes`` applied."""
    last = Path(out_dir) / LAST
    if not last.is_file():
        raise PranceError(f"nothing to resume in {out_dir} (no {LAST}); drop --resume to start a new run there")
    saved = DenseTrainConfig.from_dict(load_checkpoint(last, kind=KIND)["args"])
    return replace(saved, **changes)


def train_dense(
    cfg: DenseTrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train a dense ViT into ``out_dir`` (``last.pt``, ``best.pt``, ``log.jsonl``); returns a summary.

    ``resume`` continues the run in ``out_dir``; ``overwrite`` starts over in a folder that
    already holds a run (its files are replaced as the new run saves its own). ``stop_after``
    ends this call after that many epochs, as an interruption would (the run stays resumable).
    ``progress``: tqdm bars (None: only on a terminal). ``verbose``: one summary line per epoch.
    """
    out = Path(out_dir)
    say = tqdm.write if verbose else (lambda *_: None)

    # --- run folder: never lose a saved checkpoint by accident
    resume_ckpt = _prepare_run_dir(out, resume, overwrite)
    if resume_ckpt is not None:
        _check_same_settings(cfg, DenseTrainConfig.from_dict(resume_ckpt["args"]), out)

    # --- model shape and data
    if cfg.init is not None and (cfg.img_size is not None or cfg.model_overrides):
        raise PranceError("--img-size and model overrides cannot change a pretrained (--init) model's shape; "
                          "drop them")
    torch.manual_seed(cfg.seed)
    pretrained = from_timm(_init_path(cfg.init)) if cfg.init is not None and resume_ckpt is None else None
    if resume_ckpt is not None:
        config = ViTConfig.from_dict(resume_ckpt["config"])
    else:
        config = pretrained.config if pretrained is not None else _model_config(cfg)
    splits = training_splits(cfg.data, img_size=config.img_size, in_chans=config.in_chans,
                             holdout=Holdout(cfg.holdout, cfg.holdout_seed), train_augment=True, root=cfg.data_dir,
                             limit=cfg.limit, holdout_limit=cfg.val_limit, seed=cfg.seed)
    train_set, val_set = splits.train, splits.holdout
    split_record = splits.record(cfg.data)
    num_classes = train_set.info.num_classes
    sampler_generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=False,
                              num_workers=cfg.num_workers, generator=sampler_generator)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    steps_per_epoch = len(train_loader)

    # --- model, optimizer and (when resuming) their saved state
    torch.manual_seed(cfg.seed)
    if resume_ckpt is not None:
        model = model_from_checkpoint(resume_ckpt)
    elif pretrained is not None:
        model = _with_head(pretrained, num_classes)
    else:
        model = MetaViT(replace(config, num_classes=num_classes))
    if model.config.num_classes != num_classes:
        raise PranceError(f"the model has {model.config.num_classes} classes but the data has {num_classes}; "
                          "train a new run for this data set")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    epoch, step, best_top1, best_epoch = 0, 0, -1.0, 0
    if resume_ckpt is not None:
        state = resume_ckpt["train_state"]
        optimizer.load_state_dict(state["optimizer"])
        epoch, step = state["epoch"], state["step"]
        best_top1, best_epoch = state["best_top1"], state["best_epoch"]
        set_rng_state(state["rng"])
        if epoch > cfg.epochs:
            raise PranceError(f"the run in {out} already trained {epoch} epochs, more than --epochs {cfg.epochs}; "
                              "give at least that many")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    log = JsonLog(out / LOG)
    log.write(event="start", resumed_at_epoch=epoch if resume_ckpt else None, train_images=len(train_set),
              val_images=len(val_set), steps_per_epoch=steps_per_epoch, config=cfg.to_dict(),
              model=model.config.to_dict())
    if epoch == cfg.epochs:
        say(f"run in {out} is complete ({epoch} epochs, best holdout top-1 {best_top1:.2f}% at epoch {best_epoch})")
    start_epoch = epoch
    val: dict[str, Any] = dict(resume_ckpt["metrics"]) if resume_ckpt else {}

    while epoch < cfg.epochs and (stop_after is None or epoch - start_epoch < stop_after):
        # --- seed: this epoch's shuffling and augmentation depend only on (seed, epoch)
        _seed_epoch(cfg.seed, epoch, sampler_generator)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        window_images, window_start = 0, time.perf_counter()
        epoch_start = time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if progress is None else not progress)
        for images, labels in bar:
            # --- one minibatch update
            lr = cosine_lr(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise PranceError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}, step {step}; "
                                  "lower --lr or raise --warmup-epochs")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            step += 1

            # --- bookkeeping
            b = labels.shape[0]
            loss_sum += loss.item() * b
            correct += int((logits.argmax(dim=-1) == labels).sum())
            seen += b
            window_images += b
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0:
                now = time.perf_counter()
                log.write(event="step", epoch=epoch + 1, step=step, loss=loss.item(), lr=lr,
                          img_per_s=window_images / max(now - window_start, 1e-9))
                window_images, window_start = 0, now
        train_seconds = time.perf_counter() - epoch_start
        epoch += 1

        # --- validation and logging
        val = evaluate(model, val_loader, progress=progress, desc="validate")
        seconds = time.perf_counter() - epoch_start
        is_best = val["top1"] > best_top1
        if is_best:
            best_top1, best_epoch = val["top1"], epoch
        record = dict(epoch=epoch, train_loss=loss_sum / seen, train_acc=100.0 * correct / seen,
                      holdout_top1=val["top1"], best_top1=best_top1, lr=lr, seconds=seconds,
                      img_per_s=seen / train_seconds, step=step)
        log.write(event="epoch", **record)
        say(f"epoch {epoch}/{cfg.epochs}  loss {record['train_loss']:.4f}  train {record['train_acc']:.2f}%  "
            f"holdout {val['top1']:.2f}%  {seconds:.0f} s  {record['img_per_s']:.0f} img/s")

        # --- checkpoints: best first, so a crash in between only repeats this epoch on resume
        train_state = dict(optimizer=optimizer.state_dict(), epoch=epoch, step=step, best_top1=best_top1,
                           best_epoch=best_epoch, rng=rng_state(),
                           schedule=dict(kind="cosine", total_steps=total_steps, warmup_steps=warmup_steps))
        metrics = dict(holdout_top1=val["top1"], holdout_images=val["images"], train_loss=record["train_loss"],
                       train_acc=record["train_acc"], epoch=epoch, gmacs=val["gmacs"], params_m=val["params_m"])
        if is_best:
            save_checkpoint(out / BEST, model, KIND, train_state=train_state, metrics=metrics, args=cfg.to_dict(),
                            split=split_record)
        save_checkpoint(out / LAST, model, KIND, train_state=train_state, metrics=metrics, args=cfg.to_dict(),
                        split=split_record)

    done = epoch == cfg.epochs
    log.write(event="end" if done else "pause", epoch=epoch, best_top1=best_top1, best_epoch=best_epoch)
    return {
        "out": str(out),
        "epochs": epoch,
        "complete": done,
        "holdout_top1": val.get("holdout_top1", val.get("top1")),
        "best_top1": best_top1,
        "best_epoch": best_epoch,
        "last": str(out / LAST),
        "best": str(out / BEST),
    }


# ----------------------------------------------------------------------------- pieces of the loop
def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up to ``base_lr``, then cosine down to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only (not norms, biases, pos_embed, cls_token)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name in ("pos_embed", "cls_token") or name.endswith(".bias")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _seed_epoch(seed: int, epoch: int, sampler_generator: torch.Generator) -> None:
    """Seed every random source from ``(seed, epoch)`` alone."""
    s = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    torch.manual_seed(s)
    sampler_generator.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


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


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Create ``out``; refuse to start over a saved run unless asked. Returns the checkpoint to resume."""
    if resume and overwrite:
        raise PranceError("--resume and --overwrite contradict each other; give one of them")
    if out.exists() and not out.is_dir():
        raise PranceError(f"output {out} is a file, not a folder; choose another --out")
    saved = [name for name in (LAST, BEST) if (out / name).exists()]
    if resume:
        if not (out / LAST).is_file():
            raise PranceError(f"nothing to resume in {out} (no {LAST}); drop --resume to start a new run there")
        return load_checkpoint(out / LAST, kind=KIND)
    if saved and not overwrite:
        raise PranceError(f"{out} already holds a run ({', '.join(saved)}); pass --resume to continue it, "
                          "--overwrite to start over, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return None


def _check_same_settings(cfg: DenseTrainConfig, saved: DenseTrainConfig, out: Path) -> None:
    changed = [f.name for f in fields(cfg)
               if f.name not in RESUMABLE_CHANGES and getattr(cfg, f.name) != getattr(saved, f.name)]
    if changed:
        name = changed[0]
        raise PranceError(f"resuming {out} with {name}={getattr(cfg, name)!r}, but the run used "
                          f"{getattr(saved, name)!r}; resume with the same settings or start a new --out")


class JsonLog:
    """Append-only JSON-lines log; every line is flushed, so a crash loses at most the line being written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


__all__ = ["KIND", "DenseTrainConfig", "JsonLog", "cosine_lr", "param_groups", "resume_config", "train_dense"]
