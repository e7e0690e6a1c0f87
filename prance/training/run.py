"""One training loop for every model kind: run folder, log, checkpoints, exact resume, DDP.

Dense, meta-network (and later selector and fine-tuning) training differ only in what one
step computes and how the holdout scores a model. Each is a :class:`TrainTask`; everything
else lives here once and reads top to bottom in :func:`train_loop`:

    run folder (refuse / overwrite / resume, settings check) → sampler, DDP, optimizer →
    for each step: seed → batch → LR → task.step → backward, clip, AdamW → log →
    at epoch ends: validate on the holdout (rank 0) → atomic ``best.pt`` / ``last.pt``.

Determinism: before each batch is fetched, torch's global generator is seeded from
(seed, step, rank), so augmentation and anything random inside a step depend on nothing that
ran before; the data order of an epoch comes from (seed, epoch) and the learning rate is a
pure function of the step. ``last.pt`` stores the step (epoch and position in the epoch follow
from it), the optimizer and the best score, so a run resumed from any checkpoint — also one
written mid-epoch — ends with exactly the weights of a run that never stopped (same machine,
same thread count, ``num_workers=0``; worker processes augment with their own generators).

Distributed (``torchrun``, ``WORLD_SIZE`` > 1): the task's network runs under
DistributedDataParallel (gloo on CPU, nccl on GPU), each rank reads its own shard of every
epoch, gradients are all-reduced once per step, so every rank holds identical weights. Only
rank 0 validates, logs and writes files.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from prance.data.splits import Holdout
from prance.devices import resolve_device
from prance.errors import PranceError
from prance.files import atomic_write
from prance.model.metavit import MetaViT
from prance.training.checkpoint import atomic_save, load_checkpoint, make_checkpoint

LAST, BEST, LOG, SPLIT = "last.pt", "best.pt", "log.jsonl", "split.json"


# ----------------------------------------------------------------------------- optimisation pieces
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


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers, so (seed, step, stream) never collide in practice."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> 1)


class JsonLog:
    """Append-only JSON-lines log; every line is flushed, so a crash loses at most the line being written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- processes and devices
@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    """Whether :func:`init_distributed` joined the process group for this context (and closing leaves it)."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(device: str | None = "cpu", timeout: timedelta | None = None) -> DistContext:
    """This process's place and device; joins the process group under torchrun (WORLD_SIZE > 1).

    ``device`` is checked by :func:`prance.devices.resolve_device` (cpu by default); under
    torchrun each rank takes the GPU of its ``LOCAL_RANK`` (nccl), or the CPU (gloo). A group
    the caller joined already is used as it is (``prance run`` holds one across its stages),
    and only the context that joined it leaves it. ``timeout``: of the group's collectives
    (None: torch's default).
    """
    want = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(device=want)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    joins = not dist.is_initialized()
    if joins:
        dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=joins)


def close_distributed(ctx: DistContext) -> None:
    """Leave the process group :func:`init_distributed` joined for ``ctx`` (a no-op for one process)."""
    if ctx.distributed and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def on_device(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches moved to ``device``."""
    for images, labels in batches:
        yield images.to(device), labels.to(device)


class EpochSampler(DistributedSampler):
    """This rank's shard of an epoch, in an order fixed by (seed, epoch); can start part-way (to resume)."""

    def __init__(self, dataset: Dataset, ctx: DistContext, seed: int) -> None:
        super().__init__(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


# ----------------------------------------------------------------------------- run folder
class RunFolder:
    """The folder of one training run: ``last.pt``, ``best.pt``, ``log.jsonl``, ``split.json``.

    Never loses a saved checkpoint by accident: a folder that holds a run is only continued
    (``resume``) or started over (``overwrite``) when asked. Only rank 0 writes.
    """

    def __init__(self, path: str | os.PathLike[str], kind: str, ctx: DistContext | None = None) -> None:
        self.path = Path(path)
        self.kind = kind
        self.ctx = ctx or DistContext()
        self.log = JsonLog(self.path / LOG)

    def prepare(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        """Check the folder can take this run (nothing is created yet); returns the checkpoint to resume."""
        self.check(resume, overwrite)
        return load_checkpoint(self.path / LAST, kind=self.kind) if resume else None

    def check(self, resume: bool, overwrite: bool) -> None:
        """:meth:`prepare` without reading the checkpoint: a quick check before a long set-up."""
        if resume and overwrite:
            raise PranceError("--resume and --overwrite contradict each other; give one of them")
        if self.path.exists() and not self.path.is_dir():
            raise PranceError(f"output {self.path} is a file, not a folder; choose another --out")
        if resume:
            if not (self.path / LAST).is_file():
                raise PranceError(f"nothing to resume in {self.path} (no {LAST}); drop --resume to start a new run "
                                  "there")
            return
        held = [name for name in (LAST, BEST) if (self.path / name).exists()]
        if held and not overwrite:
            raise PranceError(f"{self.path} already holds a run ({', '.join(held)}); pass --resume to continue it, "
                              "--overwrite to start over, or choose another --out")

    def create(self, fresh: bool, split: Mapping[str, Any]) -> None:
        """Make the folder and record the split (a fresh run also starts a new log)."""
        if self.ctx.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if fresh:
                (self.path / LOG).unlink(missing_ok=True)
            text = json.dumps(dict(split), indent=2) + "\n"
            atomic_write(self.path / SPLIT, lambda f: f.write(text.encode()))
        self.ctx.barrier()

    def save(self, name: str, model: MetaViT, extra: Mapping[str, Any] | None = None, **fields: Any) -> None:
        """Atomically write checkpoint ``name`` (rank 0 only; see :func:`make_checkpoint` for ``fields``;
        ``extra`` adds entries of the task's own, e.g. a selector)."""
        if self.ctx.is_main:
            atomic_save({**make_checkpoint(model, self.kind, **fields), **dict(extra or {})}, self.path / name)


def check_same_settings(current: Mapping[str, Any], saved: Mapping[str, Any], resumable: Sequence[str],
                        where: os.PathLike[str] | str) -> None:
    """Refuse to resume a run with settings other than those it was started with (except ``resumable``)."""
    for name, value in current.items():
        if name not in resumable and name in saved and value != saved[name]:
            raise PranceError(f"resuming {where} with {name}={value!r}, but the run used {saved[name]!r}; resume "
                              "with the same settings or start a new --out")


# ----------------------------------------------------------------------------- the pipeline's holdout
def pipeline_holdout(
    data: str, sources: Mapping[str, str | None], fraction: float | None = None, seed: int | None = None
) -> Holdout:
    """The holdout of a later stage: the one its ``sources`` (e.g. ``{"--init": path}``) were trained with.

    ``fraction`` / ``seed`` given by the user may only repeat it: another holdout would make
    choices on images those models learned from. A timm/DeiT file, or a checkpoint of another
    data set, holds out nothing of ``data``; a prance checkpoint of ``data`` that records no
    holdout (written before holdouts were recorded) gets the default one, with a warning.
    """
    known: dict[str, tuple[str, Holdout]] = {}
    unrecorded: list[str] = []
    for flag, path in sources.items():
        ckpt = None if path is None or path.startswith("timm:") else prance_checkpoint_or_none(path)
        if ckpt is None:
            continue
        split = ckpt.get("split")
        if isinstance(split, Mapping) and split.get("data") == data:
            known[flag] = (path, Holdout.from_dict(split["holdout"]))
        elif split is None:
            unrecorded.append(f"{flag} {path}")
    inherited = next(iter(known.values()))[1] if known else Holdout()
    holdout = Holdout(inherited.fraction if fraction is None else fraction, inherited.seed if seed is None else seed)
    for flag, (path, h) in known.items():
        if h != holdout:
            fix = ("drop --holdout/--holdout-seed to use its holdout" if fraction is not None or seed is not None
                   else "give checkpoints of one pipeline (the same holdout)")
            raise PranceError(f"{flag} {path} was trained with holdout {h.fraction:g} (seed {h.seed}), not "
                              f"{holdout.fraction:g} (seed {holdout.seed}); {fix}")
    if unrecorded and not known:
        warnings.warn(f"{', '.join(unrecorded)} records no holdout; using holdout {holdout.fraction:g} (seed "
                      f"{holdout.seed}): if that model was trained on some of those images, choices made on them "
                      "are optimistic", stacklevel=2)
    return holdout


def prance_checkpoint_or_none(path: str) -> Mapping[str, Any] | None:
    """The checkpoint at ``path`` if it is a readable prance checkpoint (else None: the model loader reports it)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — torch raises many kinds for foreign or damaged files
        return None
    return obj if isinstance(obj, Mapping) and obj.get("format") == "prance-checkpoint" else None


# ----------------------------------------------------------------------------- the task interface
class TrainTask(Protocol):
    """What a kind of training adds to the loop: one step's loss and a score on the holdout."""

    model: MetaViT
    """The weights the checkpoints hold (the loop moves it to the device)."""

    def network(self) -> nn.Module:
        """The module whose forward a step runs (wrapped in DDP when distributed)."""

    def step(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss to back-propagate and numbers to log (``loss`` is added by the loop)."""

    def validate(self) -> tuple[dict[str, float], float]:
        """Metrics on the holdout and the score ``best.pt`` maximises (rank 0 only)."""

    # A task may also define ``checkpoint_fields() -> Mapping[str, Any]``: entries of its own that
    # every checkpoint of the run carries next to the weights (joint fine-tuning: its selector).


@dataclass
class LoopSettings:
    """What the loop itself needs of a run's settings."""

    epochs: int
    batch_size: int
    lr: float
    min_lr: float
    weight_decay: float
    seed: int
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    """Max global gradient norm (None or 0: no clipping)."""
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    """Linear warm-up length: ``warmup_steps + round(warmup_epochs · steps_per_epoch)`` steps."""
    max_steps: int | None = None
    log_every: int = 50
    checkpoint_every: int = 0
    """Also write ``last.pt`` every this many steps (0: at epoch ends only)."""
    num_workers: int = 0


def train_loop(
    task: TrainTask,
    train_set: Dataset,
    folder: RunFolder,
    settings: LoopSettings,
    *,
    args: Mapping[str, Any],
    split: Mapping[str, Any],
    resume_from: Mapping[str, Any] | None = None,
    describe: Mapping[str, Any] | None = None,
    stop_after: int | None = None,
    progress: bool | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train ``task`` on ``train_set`` into ``folder``; returns a summary of the run.

    ``resume_from`` is the folder's ``last.pt`` (from :meth:`RunFolder.prepare`): its weights,
    optimizer, step and best score replace the task's. ``stop_after`` pauses after that many
    steps of this call, writing ``last.pt`` there (also mid-epoch) so ``--resume`` continues.
    ``args`` and ``split`` are stored in every checkpoint; ``describe`` adds fields to the log's
    start line.
    """
    ctx, s, model = folder.ctx, settings, task.model
    say = tqdm.write if verbose and ctx.is_main else (lambda *_: None)

    # --- data order, schedule and optimizer
    sampler = EpochSampler(train_set, ctx, s.seed)
    loader = DataLoader(train_set, batch_size=s.batch_size, sampler=sampler, num_workers=s.num_workers)
    steps_per_epoch = math.ceil(sampler.num_samples / s.batch_size)
    if steps_per_epoch < 1:
        raise PranceError(f"{len(train_set)} training images make no batch for {ctx.world_size} processes; "
                          "use more data or fewer processes")
    total_steps = s.epochs * steps_per_epoch if s.max_steps is None else min(s.epochs * steps_per_epoch, s.max_steps)
    warmup_steps = s.warmup_steps + round(s.warmup_epochs * steps_per_epoch)
    model.to(ctx.device)
    optimizer = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=tuple(s.betas))
    step, best_score, best_epoch, metrics, sums = 0, -math.inf, 0, {}, {}
    if resume_from is not None:
        if "split" not in resume_from:
            raise PranceError(f"{folder.path / LAST} was written by an older prance that did not record its holdout; "
                              "start a new run with another --out")
        state = resume_from["train_state"]
        if int(state.get("world_size", 1)) != ctx.world_size:
            raise PranceError(f"the run in {folder.path} used {state.get('world_size', 1)} processes; resume it with "
                              "as many (torchrun --nproc_per_node)")
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best_epoch = int(state["step"]), int(state.get("best_epoch", 0))
        best_score = float(state.get("best_score", state.get("best_top1", -math.inf)))  # dense runs of c65f9bc
        metrics, sums = dict(resume_from["metrics"]), dict(state.get("epoch_sums", {}))
        if step > total_steps:
            raise PranceError(f"the run in {folder.path} already trained {step} steps, more than the {total_steps} "
                              "these settings give; ask for at least as many epochs or steps")
    net: nn.Module = task.network()
    if ctx.distributed:
        # A parameter no forward of the step touched (e.g. a stage map between equal widths) gets no
        # gradient; find_unused_parameters lets DDP finish its reduction anyway.
        net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)

    folder.create(fresh=resume_from is None, split=split)
    if ctx.is_main:
        folder.log.write(event="start", resumed_at_step=None if resume_from is None else step, kind=folder.kind,
                         world_size=ctx.world_size, device=str(ctx.device), train_images=len(train_set),
                         holdout_images=split.get("holdout_images"), steps_per_epoch=steps_per_epoch,
                         total_steps=total_steps, config=dict(args), split=dict(split), **dict(describe or {}))

    def save(name: str) -> None:
        train_state = dict(optimizer=optimizer.state_dict(), step=step, epoch=step // steps_per_epoch,
                           in_epoch=step % steps_per_epoch, steps_per_epoch=steps_per_epoch,
                           world_size=ctx.world_size, best_score=best_score, best_epoch=best_epoch,
                           epoch_sums=sums, schedule=dict(kind="cosine", total_steps=total_steps,
                                                          warmup_steps=warmup_steps))
        extra = task.checkpoint_fields() if ctx.is_main and hasattr(task, "checkpoint_fields") else None
        folder.save(name, model, extra, train_state=train_state, metrics=metrics, args=dict(args), split=dict(split))

    stop_at = None if stop_after is None else step + stop_after
    window: dict[str, float] = {}
    window_start = time.perf_counter()
    while step < total_steps and (stop_at is None or step < stop_at):
        # --- an epoch, or what is left of it
        epoch, in_epoch = divmod(step, steps_per_epoch)
        epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.skip = in_epoch * s.batch_size
        batches = iter(loader)
        model.train()
        epoch_start = time.perf_counter()
        quiet = (None if progress is None else not progress) if ctx.is_main else True
        bar = tqdm(total=epoch_steps, initial=in_epoch, leave=False, disable=quiet,
                   desc=f"epoch {epoch + 1}/{math.ceil(total_steps / steps_per_epoch)}")
        while in_epoch < epoch_steps and (stop_at is None or step < stop_at):
            # --- one step; its randomness depends on (seed, step, rank) only
            torch.manual_seed(mix_seed(s.seed, step, 1 + ctx.rank))
            images, labels = next(batches)
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            lr = cosine_lr(step, total_steps, warmup_steps, s.lr, s.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logs = task.step(net, images, labels, step)
            if not torch.isfinite(loss):
                raise PranceError(f"training diverged (loss {float(loss)}) at step {step}; lower --lr or lengthen "
                                  "the warm-up")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()
            step, in_epoch = step + 1, in_epoch + 1

            # --- bookkeeping: image-weighted means over the log window and the epoch
            b = float(labels.shape[0])
            for key, value in {"loss": float(loss.detach()), **logs}.items():
                window[key] = window.get(key, 0.0) + value * b
                sums[key] = sums.get(key, 0.0) + value * b
            window["images"] = window.get("images", 0.0) + b
            sums["images"] = sums.get("images", 0.0) + b
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{lr:.2e}")
            if step % s.log_every == 0 or in_epoch == epoch_steps:
                n, seconds = window.pop("images"), time.perf_counter() - window_start
                if ctx.is_main:
                    folder.log.write(event="step", step=step, epoch=round(step / steps_per_epoch, 4), lr=lr,
                                     **{k: v / n for k, v in window.items()},
                                     img_per_s=n * ctx.world_size / max(seconds, 1e-9))
                window, window_start = {}, time.perf_counter()

            # --- epoch end: validate on the holdout, keep the best; checkpoints (best first)
            is_best = False
            if in_epoch == epoch_steps:
                train_seconds = time.perf_counter() - epoch_start
                if ctx.is_main:
                    n = sums.pop("images")
                    means = {f"train_{k}": v / n for k, v in sums.items()}
                    val, score = task.validate()
                    is_best = score > best_score
                    if is_best:
                        best_score, best_epoch = score, math.ceil(step / steps_per_epoch)
                    metrics = {**val, **means, "score": score, "epoch": round(step / steps_per_epoch, 4),
                               "step": step}
                    seconds = time.perf_counter() - epoch_start
                    folder.log.write(event="epoch", **metrics, best_score=best_score, best_epoch=best_epoch, lr=lr,
                                     seconds=seconds, img_per_s=n * ctx.world_size / max(train_seconds, 1e-9))
                    say(f"epoch {metrics['epoch']:g}  loss {means['train_loss']:.4f}  "
                        + "  ".join(f"{k} {v:.2f}%" for k, v in val.items() if "top1" in k) + f"  {seconds:.0f} s")
                sums = {}
            if is_best:
                save(BEST)
            if in_epoch == epoch_steps or step == stop_at or (s.checkpoint_every and step % s.checkpoint_every == 0):
                save(LAST)
                ctx.barrier()
        bar.close()

    done = step == total_steps
    if ctx.is_main:
        folder.log.write(event="end" if done else "pause", step=step, best_score=best_score, best_epoch=best_epoch)
    return {**metrics, "out": str(folder.path), "step": step, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "epochs": step // steps_per_epoch, "complete": done,
            "best_score": best_score, "best_epoch": best_epoch, "last": str(folder.path / LAST),
            "best": str(folder.path / BEST)}


__all__ = [
    "BEST",
    "LAST",
    "LOG",
    "SPLIT",
    "DistContext",
    "EpochSampler",
    "JsonLog",
    "LoopSettings",
    "RunFolder",
    "TrainTask",
    "check_same_settings",
    "close_distributed",
    "cosine_lr",
    "init_distributed",
    "mix_seed",
    "on_device",
    "param_groups",
    "pipeline_holdout",
    "prance_checkpoint_or_none",
    "train_loop",
]
