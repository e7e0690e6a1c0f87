"""Joint fine-tuning (DESIGN.md §3, last point) and its fair baseline, the static-plan fine-tune (§6).

A selector is trained on a *frozen* meta-network; afterwards the meta-network can learn the
plans the selector really deals out. **Joint** fine-tuning trains the meta-network under the
deployed (deterministic, calibrated) selector's per-image decisions:

    batch of training images → masked execution, stage by stage, the selector deciding each
    image's next stage from the state so far (autograd kept; equal to physical execution per
    image) → (1 − w) · label-smoothed CE + w · KD(dense teacher, temperature T) → AdamW.

With ``alternate`` = N, every N steps the selector takes one PPO update (train-selector's
:func:`~prance.training.selector.selector_update`) on the current weights, so each side adapts
to the other. After every epoch the selector's knob is re-calibrated on the holdout so its mean
MACs land on the budget again; ``best.pt`` keeps the best holdout top-1 at that calibrated
budget, and the finished run writes it as ``adaptive.pt`` (an :class:`~prance.adaptive.AdaptiveViT`
file). ``last.pt`` / ``best.pt`` are of kind ``"joint"``: a meta-network plus the selector, its
PPO state and λ — :meth:`AdaptiveViT.load` and ``train-selector --meta`` read them too.

The **static-plan** fine-tune is the same run — same start weights, epochs, batch, loss and
teacher — under ONE plan for every image (physical execution, exact for a shared plan). It
isolates what per-image decisions add. The plan is a YAML file or ``auto``: the most accurate
static subnet on the holdout among the ``static_candidates`` dearest ones whose MACs do not
exceed the adaptive model's mean MACs (selector included) measured on the same holdout, nor fall
more than ``static_slack`` × the dense MACs below them (the same compute, not a cheaper plan that
happened to score well before fine-tuning). Its
checkpoints are of kind ``"meta"`` (a meta-network; ``args["static_plan"]`` names the plan it
was fine-tuned for) and the run writes ``plan.yaml`` for ``prance evaluate --plan``.

The run folder, log, exact resume (also mid-epoch, also with ``alternate``) and DDP are the
shared loop's (:mod:`prance.training.run`). Splits (DESIGN.md §8): training reads the training
images of the adaptive model's pipeline only; calibration, the choice of ``best.pt`` and the
``auto`` plan read its holdout; the test split is never read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from prance.accounting import count_macs, macs_per_sample
from prance.adaptive import SELECTOR_KINDS, AdaptiveViT, selector_from_record, selector_record
from prance.data.provenance import check_same_classes, data_source, trained_on
from prance.data.splits import training_splits
from prance.engine import DynamicExecutor
from prance.engine.masked import MaskedExecutor
from prance.errors import PranceError
from prance.evaluation.evaluate import evaluate, plans_from_spec, write_json
from prance.evaluation.sweep import candidate_subnets, evaluate_subnets, pick_for_budget, write_plan_yaml
from prance.files import recorded_path
from prance.model.metavit import MetaViT
from prance.model.timm_interop import from_timm
from prance.plan import Plan
from prance.policy import StagePolicy
from prance.selector.budget import DualAscent
from prance.selector.selector import Selector
from prance.training.checkpoint import atomic_save, load_checkpoint, model_from_checkpoint
from prance.training.meta import distill_loss
from prance.training.run import (
    BEST,
    LAST,
    DistContext,
    JsonLog,
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
from prance.training.selector import ADAPTIVE, SelectorTrainConfig, calibrate_on, selector_update
from prance.training.subnets import require_trained_for

KIND = "joint"
STATIC_KIND = "meta"
PLAN_FILE, STATIC_CHOICE = "plan.yaml", "static_choice.json"


# ----------------------------------------------------------------------------- settings
@dataclass
class FinetuneConfig:
    """Settings of ``prance finetune`` (plain values, stored in its checkpoints)."""

    epochs: int = 1  # passes over the training images
    max_steps: int | None = None  # stop after this many optimiser steps in total (None: all epochs)
    batch_size: int = 128  # images per step and process
    lr: float = 1e-4  # peak AdamW learning rate (the meta-network is trained already: lower than train-meta's)
    min_lr: float = 1e-6  # learning rate at the end of the cosine schedule
    warmup_steps: int = 50  # linear warm-up steps
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on biases, norms, embeddings)
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)
    label_smoothing: float = 0.1  # of the cross-entropy with the labels
    augment: bool = True  # random crops and flips (a short run from a model trained without them does better off)
    distill_weight: float = 0.5  # loss = (1 - w) · CE + w · KD from the dense teacher
    temperature: float = 1.0  # KD temperature T (KL of softened distributions, scaled by T²)
    alternate: int = 0  # every this many steps one PPO update of the selector (0: the selector stays fixed)
    static_plan: str | None = None  # one plan for every image: a YAML file or "auto" (None: joint fine-tuning)
    static_candidates: int = 16  # auto: how many of the dearest fitting static subnets the holdout compares
    static_slack: float = 0.01  # auto: ... among those at most this fraction of the dense MACs below the target
    seed: int = 0  # data order, augmentation, PPO sampling
    limit: int | None = None  # train on a random subset of this many training images
    holdout_limit: int | None = None  # calibrate / choose on at most this many held-out images
    log_every: int = 20  # a log line every this many steps (and at epoch ends)
    checkpoint_every: int = 0  # also write last.pt every this many steps (0: at epoch ends only)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2 or self.log_every < 1 or self.static_candidates < 1:
            raise PranceError("epochs, log_every and static_candidates must be >= 1 and batch_size >= 2; fix the "
                              "value")
        if self.max_steps is not None and self.max_steps < 1:
            raise PranceError(f"max_steps={self.max_steps} must be at least 1")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise PranceError("lr must be > 0 and min_lr, warmup_steps, checkpoint_every >= 0; fix the value")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise PranceError(f"--distill-weight {self.distill_weight} must be in [0, 1] (0: labels only, 1: "
                              "teacher only)")
        if self.temperature <= 0:
            raise PranceError(f"--temperature {self.temperature} must be positive, e.g. 1 or 2")
        if not 0.0 <= self.static_slack <= 1.0:
            raise PranceError(f"--static-slack {self.static_slack} must be in [0, 1] (a fraction of the dense MACs; "
                              "1: any subnet that fits)")
        if self.alternate < 0:
            raise PranceError(f"--alternate {self.alternate} must be 0 (selector fixed) or a number of steps")
        if self.alternate and self.static_plan is not None:
            raise PranceError("--alternate updates the selector, which a --static-plan run has not; give one of them")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, min_lr=self.min_lr,
                            weight_decay=self.weight_decay, seed=self.seed, grad_clip=self.grad_clip,
                            warmup_steps=self.warmup_steps, max_steps=self.max_steps, log_every=self.log_every,
                            checkpoint_every=self.checkpoint_every)


#: Settings that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("epochs", "max_steps", "log_every", "checkpoint_every", "data_dir")


# ----------------------------------------------------------------------------- the step's pieces
class Student(nn.Module):
    """The meta-network being fine-tuned: under one static plan (physical), or with a policy
    deciding each image's plan stage by stage (masked path, autograd kept).

    Wrapping this in DistributedDataParallel makes the whole forward one DDP forward.
    """

    def __init__(self, model: MetaViT) -> None:
        super().__init__()
        self.model = model
        self.masked = MaskedExecutor(model)

    def forward(self, x: torch.Tensor, plan: Plan | None = None, policy: StagePolicy | None = None,
                budget: torch.Tensor | None = None) -> tuple[torch.Tensor, Plan]:
        """Logits ``[B, classes]`` and the plan each image ran."""
        if policy is None:
            plan = self.model.full_plan if plan is None else plan
            return self.model(x, plan), plan
        return self.masked.run(x, policy=policy, budget=budget)


def finetune_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, cfg: FinetuneConfig
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1 − w) · CE(labels, smoothed) + w · KD(teacher, T)`` and its two parts (for the log)."""
    ce = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    kd = distill_loss(logits, teacher_logits, cfg.temperature)
    w = cfg.distill_weight
    return (1 - w) * ce + w * kd, {"loss_ce": float(ce.detach()), "loss_kd": float(kd.detach())}


class _Finetune:
    """What both tasks share: the student, the frozen teacher and the loss of one step."""

    def __init__(self, model: MetaViT, teacher: MetaViT, holdout: Dataset, cfg: FinetuneConfig, ctx: DistContext,
                 progress: bool | None) -> None:
        if teacher.config.num_classes != model.config.num_classes:
            raise PranceError(f"the teacher predicts {teacher.config.num_classes} classes, the adaptive model "
                              f"{model.config.num_classes}; give the dense model of the same pipeline")
        self.model, self.teacher, self.holdout, self.cfg, self.ctx = model, teacher, holdout, cfg, ctx
        self.teacher.to(ctx.device).eval().requires_grad_(False)
        self.student = Student(model)
        self.progress = progress

    def network(self) -> nn.Module:
        return self.student

    def _loss(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, **forward: Any
              ) -> tuple[torch.Tensor, dict[str, float], Plan]:
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        logits, plan = net(images, **forward)
        loss, parts = finetune_loss(logits, labels, teacher_logits, self.cfg)
        top1 = 100.0 * float((logits.argmax(-1) == labels).float().mean())
        return loss, {**parts, "top1": top1}, plan


class StaticTask(_Finetune):
    """One step under the static plan; score: holdout top-1 under it."""

    def __init__(self, model: MetaViT, teacher: MetaViT, plan: Plan, holdout: Dataset, cfg: FinetuneConfig,
                 ctx: DistContext, progress: bool | None = None) -> None:
        super().__init__(model, teacher, holdout, cfg, ctx, progress)
        self.plan = plan.validate(model.config, model.space)

    def step(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, logs, _ = self._loss(net, images, labels, plan=self.plan)
        return loss, logs

    def validate(self) -> tuple[dict[str, float], float]:
        loader = DataLoader(self.holdout, batch_size=max(self.cfg.batch_size, 256), shuffle=False)
        r = evaluate(self.model, on_device(loader, self.ctx.device), self.plan, progress=self.progress,
                     desc="validate")
        return {"val_top1": r["top1"], "val_gmacs": r["gmacs"]}, r["top1"]


@dataclass
class SelectorTraining:
    """What ``alternate`` needs to go on training the selector: PPO settings, its optimiser and λ."""

    settings: SelectorTrainConfig
    optimizer: torch.optim.Optimizer
    dual: DualAscent
    updates: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings.to_dict(), "optimizer": self.optimizer.state_dict(),
                "dual": self.dual.state_dict(), "updates": self.updates}


class JointTask(_Finetune):
    """One step under the selector's per-image decisions (and, every ``alternate`` steps, one PPO
    update first); score: holdout top-1 after re-calibrating the selector onto the budget."""

    def __init__(self, model: MetaViT, teacher: MetaViT, selector: Selector, budget: float, holdout: Dataset,
                 cfg: FinetuneConfig, ctx: DistContext, *, selector_training: SelectorTraining | None = None,
                 calibration: Mapping[str, Any] | None = None, log: JsonLog | None = None,
                 progress: bool | None = None) -> None:
        super().__init__(model, teacher, holdout, cfg, ctx, progress)
        if cfg.alternate and selector_training is None:
            raise ValueError("alternate > 0 needs selector_training (PPO settings, optimiser, λ)")
        self.selector = selector.to(ctx.device).eval()
        self.budget = float(budget)
        self.selector_training = selector_training
        self.calibration = dict(calibration or {})
        self.log = log
        self.engine = DynamicExecutor(model)
        self.dense_macs = float(macs_per_sample(model.config, model.full_plan)[0])

    def step(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, step: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.ctx.distributed:  # rank 0 alone re-calibrates the knob at epoch ends
            dist.broadcast(self.selector.knob, src=0)
        budget = torch.full((images.shape[0],), self.budget, dtype=torch.float64)
        if self.cfg.alternate and step > 0 and step % self.cfg.alternate == 0:
            self._ppo(images, labels, budget, step)
        loss, parts, plan = self._loss(net, images, labels, policy=self.selector, budget=budget)
        macs = macs_per_sample(self.model.config, plan).double() + self.selector.macs_per_image()
        return loss, {**parts, "macs_ratio": float(macs.mean()) / self.dense_macs}

    def _ppo(self, images: torch.Tensor, labels: torch.Tensor, budget: torch.Tensor, step: int) -> None:
        """One PPO update on this batch, logged as a ``ppo`` line (train-selector's names); exploration
        as at the end of selector training (progress 1)."""
        st, ctx = self.selector_training, self.ctx
        assert st is not None
        act_gen = torch.Generator(device=ctx.device).manual_seed(mix_seed(self.cfg.seed, step, ctx.rank, 2))
        order_gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, step, ctx.rank, 3))
        record = selector_update(self.engine, self.selector, st.optimizer, st.dual, images, labels, budget,
                                 ppo=st.settings.ppo_config(), keep_penalty=st.settings.keep_penalty, progress=1.0,
                                 act_gen=act_gen, order_gen=order_gen, ctx=ctx, reward=st.settings.reward)
        st.updates += 1
        self.selector.eval()
        if self.log is not None:
            self.log.write(event="ppo", step=step, update=st.updates, **record)

    def validate(self) -> tuple[dict[str, float], float]:
        cal, top1 = calibrate_on(self.engine, self.selector, self.holdout, self.budget, self.dense_macs,
                                 self.ctx.device)
        self.calibration = {"knob": cal.knob, "holdout_macs_ratio": cal.macs_ratio, "holdout_top1": top1,
                            "holdout_images": len(self.holdout), "iterations": cal.iterations}
        return {"val_top1": top1, "val_macs_ratio": cal.macs_ratio, "val_knob": cal.knob}, top1

    def checkpoint_fields(self) -> dict[str, Any]:
        """The selector (with its knob), budget and calibration, and what ``alternate`` resumes from."""
        st = self.selector_training
        return {"selector": selector_record(self.selector), "budget": self.budget,
                "calibration": dict(self.calibration), "selector_training": None if st is None else st.state_dict()}


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Pipeline:
    """What the adaptive model's pipeline records: its dense teacher and the selector's training state."""

    teacher: str | None
    selector_settings: dict[str, Any] | None
    dual: dict[str, Any] | None


def pipeline_of(ckpt: Mapping[str, Any], path: Path) -> Pipeline:
    """The dense teacher and selector-training state recorded for the adaptive model in ``ckpt``.

    A fine-tuned model records them itself; a selector run's checkpoint records its
    meta-network (whose run records its dense teacher or start); the ``adaptive.pt`` of
    ``train-selector`` records its run's settings but not the training state (λ): its run's
    ``last.pt`` lies next to it and is used when its selector weights are the file's.
    """
    args = dict(ckpt.get("args") or {})
    if "teacher" in args:  # written by prance finetune
        training = ckpt.get("selector_training") or {}
        return Pipeline(args["teacher"], training.get("settings"), training.get("dual"))
    run = ckpt
    if not ckpt.get("train_state"):
        sibling = path.parent / LAST
        found = _checkpoint_or_none(sibling) if sibling != path else None
        if found is not None and found.get("kind") == "selector" and _same_selector(found, ckpt):
            run = found
    if "meta" not in (run.get("args") or {}):
        return Pipeline(None, None, None)
    meta = _checkpoint_or_none(Path(run["args"]["meta"]))
    return Pipeline(None if meta is None else _dense_of(meta), dict(run["args"].get("train") or {}),
                    (run.get("train_state") or {}).get("dual"))


def _dense_of(meta: Mapping[str, Any]) -> str | None:
    """The dense model a meta-network run learned from: its teacher, else its start (prance dense checkpoints)."""
    run = dict((meta.get("args") or {}).get("run") or {})
    teacher = run.get("init") if run.get("teacher") == "init" else run.get("teacher")
    for source in (teacher, run.get("init")):
        found = None if source is None else _checkpoint_or_none(Path(source))
        if found is not None and found.get("kind") == "dense":
            return str(source)
    return None


def _checkpoint_or_none(path: Path) -> dict[str, Any] | None:
    try:
        return load_checkpoint(path) if path.is_file() else None
    except PranceError:
        return None


def _same_selector(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    sa, sb = (dict((c.get("selector") or {}).get("state") or {}) for c in (a, b))
    weights = [k for k in sa if k != "knob"]
    return bool(weights) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in weights)


def load_teacher(source: str) -> MetaViT:
    """The frozen dense teacher: a prance dense checkpoint or ``timm:PATH`` of local timm/DeiT weights."""
    if source.startswith("timm:"):
        path = source.removeprefix("timm:")
        if not Path(path).is_file():
            raise PranceError(f"--teacher {source}: file not found; give the dense model's checkpoint")
        return from_timm(path)
    return model_from_checkpoint(load_checkpoint(source, kind="dense"))


def load_adaptive(path: str | os.PathLike[str]) -> tuple[AdaptiveViT, dict[str, Any]]:
    """The adaptive model to fine-tune (any checkpoint holding a selector) and its checkpoint."""
    ckpt = load_checkpoint(path, kind=SELECTOR_KINDS)
    adaptive = AdaptiveViT.from_checkpoint(ckpt, path)
    require_trained_for(ckpt, path, space=adaptive.model.space)
    if adaptive.representatives is not None:
        raise PranceError(f"{path} rounds its decisions up to representatives; fine-tune the adaptive model they "
                          "were learned for, then run `prance round-up` on the result")
    if adaptive.selector.cfg.budget_range is not None:
        raise PranceError(f"{path} holds a selector for a budget range; fine-tune a selector trained for one "
                          "budget (train-selector --budget B)")
    return adaptive, ckpt


def selector_training_for(selector: Selector, budget: float, pipeline: Pipeline, saved: Mapping[str, Any] | None
                          ) -> SelectorTraining:
    """PPO settings, optimiser and λ for ``alternate``: a resumed run's, else the pipeline's (its
    selector run's settings and final λ), else train-selector's defaults."""
    state = dict((saved or {}).get("selector_training") or {})
    recorded = {**(pipeline.selector_settings or {}), **(state.get("settings") or {})}
    # A record reads as its run behaved (SelectorTrainConfig.from_dict); no record means today's defaults.
    settings = SelectorTrainConfig.from_dict({**recorded, "budget": budget}) if recorded else \
        SelectorTrainConfig(budget=budget)
    optimizer = torch.optim.Adam(selector.agent.parameters(), lr=settings.ppo_config().lr, eps=1e-5)
    dual_state = state.get("dual") or pipeline.dual
    budgets = [float(b) for b in dual_state["budgets"]] if dual_state else [settings.budget]
    dual = DualAscent(budgets, lr=settings.lam_lr, init=settings.lam_init)
    if dual_state:
        dual.load_state_dict(dual_state)
    if state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    return SelectorTraining(settings, optimizer, dual, int(state.get("updates", 0)))


# ----------------------------------------------------------------------------- the static plan
def adaptive_mean_macs(adaptive: AdaptiveViT, holdout: Dataset, device: torch.device, batch_size: int = 256) -> float:
    """Mean MACs per image (selector included) of the deployed adaptive model on ``holdout``."""
    macs = []
    with torch.inference_mode():
        for x, _ in DataLoader(holdout, batch_size=batch_size, shuffle=False):
            adaptive(x.to(device))
            macs.append(adaptive.last.macs.double())
    return float(torch.cat(macs).mean())


def choose_static_plan(model: MetaViT, holdout: Dataset, max_macs: float, count: int, seed: int = 0,
                       batch_size: int = 256, progress: bool | None = None, slack: float = 1.0
                       ) -> tuple[str, Plan, list[dict[str, Any]]]:
    """The most accurate static subnet on ``holdout`` with at most ``max_macs`` MACs.

    The candidates are the sweep's (:func:`~prance.evaluation.sweep.candidate_subnets`); of those
    that fit and need at least ``max_macs - slack`` × the dense MACs, the ``count`` dearest are
    evaluated (a subnet far below the budget leaves compute unused, and a baseline at fewer MACs
    is not one at the same MACs). When none is that close, the dearest that fits is the only one.
    Returns its name, plan and every evaluated row.
    """
    config = model.config
    floor = max_macs - slack * count_macs(config, Plan.full(config))
    candidates = [(name, plan, count_macs(config, plan)) for name, plan in
                  candidate_subnets(config, model.space, seed=seed)]
    fitting = [c for c in candidates if c[2] <= max_macs]
    if not fitting:
        smallest = min(macs for _, _, macs in candidates)
        raise PranceError(f"no static subnet fits the adaptive model's {max_macs / 1e9:.4g} GMACs (the smallest "
                          f"needs {smallest / 1e9:.4g}); give a plan file with --static-plan FILE.yaml")
    fitting.sort(key=lambda c: (-c[2], c[0]))
    chosen = [(name, plan) for name, plan, _ in ([c for c in fitting if c[2] >= floor] or fitting[:1])[:count]]
    results = evaluate_subnets(model, holdout, chosen, batch_size=batch_size, progress=progress, desc="static plan")
    rows = [{"name": name, "gmacs": results[name]["gmacs"], "holdout_top1": results[name]["top1"],
             "plan": plan.to_dict()} for name, plan in chosen]
    best = pick_for_budget(rows, max_macs / 1e9)
    return best["name"], dict(chosen)[best["name"]], rows


# ----------------------------------------------------------------------------- the run
def run_finetune(
    adaptive_path: str | os.PathLike[str],
    cfg: FinetuneConfig,
    out_dir: str | os.PathLike[str],
    *,
    teacher: str | None = None,
    data_dir: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = "cpu",
    progress: bool | None = None,
    stop_after: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Everything ``prance finetune`` does; returns a summary (paths, holdout figures)."""
    ctx = init_distributed(device)
    try:
        return _finetune(Path(adaptive_path), cfg, out_dir, teacher, data_dir, resume, overwrite, ctx, progress,
                         stop_after, verbose)
    finally:
        close_distributed(ctx)


def _finetune(adaptive_path: Path, cfg: FinetuneConfig, out_dir: str | os.PathLike[str], teacher_source: str | None,
              data_dir: str | None, resume: bool, overwrite: bool, ctx: DistContext, progress: bool | None,
              stop_after: int | None, verbose: bool) -> dict[str, Any]:
    static = cfg.static_plan is not None
    folder = RunFolder(out_dir, STATIC_KIND if static else KIND, ctx)
    say = print if verbose and ctx.is_main else (lambda *_: None)
    saved = folder.prepare(resume, overwrite)

    # --- the adaptive model, its pipeline's teacher and data
    adaptive, ckpt = load_adaptive(adaptive_path)
    pipeline = pipeline_of(ckpt, adaptive_path)
    teacher_source = teacher_source or pipeline.teacher
    if teacher_source is None:
        raise PranceError(f"{adaptive_path} records no dense teacher; give one with --teacher DENSE/best.pt")
    teacher = load_teacher(teacher_source)
    trained = trained_on(ckpt)
    data, root = data_source(trained, None, data_dir)
    holdout = pipeline_holdout(data, {"--adaptive": str(adaptive_path), "--teacher": teacher_source})
    model = adaptive.model
    splits = training_splits(data, img_size=model.config.img_size, in_chans=model.config.in_chans, holdout=holdout,
                             train_augment=cfg.augment, root=root, limit=cfg.limit, holdout_limit=cfg.holdout_limit,
                             seed=cfg.seed)
    check_same_classes(trained, splits.train.info, str(adaptive_path), root)
    teacher_ckpt = None if teacher_source.startswith("timm:") else load_checkpoint(teacher_source)
    if teacher_ckpt is not None:
        check_same_classes(trained_on(teacher_ckpt), splits.train.info, teacher_source, root)
    split = splits.record(data)
    args: dict[str, Any] = {"adaptive": recorded_path(adaptive_path), "teacher": recorded_path(teacher_source), "data": data,
                            "data_dir": root, "budget": adaptive.budget, "train": cfg.to_dict()}
    if saved is not None:
        check_same_settings(_flat(args), _flat(saved["args"]), RESUMABLE_CHANGES, folder.path)

    # --- the task: one static plan, or the selector's decisions
    adaptive.to(ctx.device)
    describe: dict[str, Any] = {"teacher": teacher_source, "budget": adaptive.budget}
    if static:
        rows = None
        if saved is not None:  # the plan the run was started with (auto is not chosen again)
            record = saved["args"]["static_plan"]
            name, plan, adaptive_macs = record["name"], Plan.from_dict(model.config, record["plan"]), \
                float(record["adaptive_macs"])
        else:
            name, plan, rows, adaptive_macs = _static_plan(cfg, adaptive, splits.holdout, ctx.device, progress)
        require_trained_for(ckpt, adaptive_path, plans=[plan])
        macs = count_macs(model.config, plan)
        args["static_plan"] = {"name": name, "plan": plan.to_dict(), "macs": macs, "adaptive_macs": adaptive_macs}
        describe.update(static_plan=args["static_plan"])
        say(f"static plan {name}: {macs / 1e9:.4f} GMACs (the adaptive model: {adaptive_macs / 1e9:.4f} on the "
            "holdout)")
        task: StaticTask | JointTask = StaticTask(model, teacher, plan, splits.holdout, cfg, ctx, progress)
        folder.create(fresh=saved is None, split=split)
        if ctx.is_main:
            write_plan_yaml(folder.path / PLAN_FILE, name, plan.to_dict())
            if rows is not None:
                write_json({"adaptive_macs": adaptive_macs, "chosen": name, "rows": rows},
                           folder.path / STATIC_CHOICE)
    else:
        selector, calibration = adaptive.selector, adaptive.calibration
        if saved is not None:
            # on the device before selector_training_for loads its optimiser state (Adam's moments follow it)
            selector = selector_from_record(saved.get("selector"), model, folder.path / LAST).to(ctx.device)
            calibration = saved.get("calibration")
        training = selector_training_for(selector, adaptive.budget, pipeline, saved) if cfg.alternate else None
        task = JointTask(model, teacher, selector, adaptive.budget, splits.holdout, cfg, ctx,
                         selector_training=training, calibration=calibration,
                         log=folder.log if ctx.is_main else None, progress=progress)

    summary = train_loop(task, splits.train, folder, cfg.loop_settings(), args=args, split=split, resume_from=saved,
                         describe=describe, stop_after=stop_after, progress=progress, verbose=verbose)
    if static:
        summary["plan"] = str(folder.path / PLAN_FILE)
    elif summary["complete"] and ctx.is_main:
        # --- the best epoch (chosen on the holdout, its knob calibrated there) as one adaptive file
        best = load_checkpoint(folder.path / BEST, kind=KIND)
        final = AdaptiveViT.from_checkpoint(best, folder.path / BEST)
        out = final.checkpoint(metrics=best["metrics"])
        out.update(args=args, selector_training=best.get("selector_training"))
        atomic_save(out, folder.path / ADAPTIVE)
        cal = final.calibration
        say(f"best epoch {summary['best_epoch']}: holdout top-1 {cal['holdout_top1']:.2f}% at "
            f"{cal['holdout_macs_ratio']:.4f} of dense MACs (budget {final.budget}); wrote {folder.path / ADAPTIVE}")
        summary.update(adaptive=str(folder.path / ADAPTIVE), holdout_top1=cal["holdout_top1"],
                       holdout_macs_ratio=cal["holdout_macs_ratio"])
    return summary


def _static_plan(cfg: FinetuneConfig, adaptive: AdaptiveViT, holdout: Dataset, device: torch.device,
                 progress: bool | None) -> tuple[str, Plan, list[dict[str, Any]] | None, float]:
    """The static plan of a new run (a file's, or ``auto``), the rows ``auto`` compared, and the
    adaptive model's mean MACs on the holdout."""
    model = adaptive.model
    adaptive_macs = adaptive_mean_macs(adaptive, holdout, device)
    if cfg.static_plan == "auto":
        return (*choose_static_plan(model, holdout, adaptive_macs, cfg.static_candidates, seed=cfg.seed,
                                    progress=progress, slack=cfg.static_slack), adaptive_macs)
    spec = str(cfg.static_plan)
    if not spec.endswith((".yaml", ".yml")) or not Path(spec).is_file():
        raise PranceError(f"--static-plan {spec}: give an existing plan file (.yaml, e.g. a sweep's best_plan.yaml) "
                          "or auto")
    plans = plans_from_spec(spec, model.config, model.space)
    if len(plans) != 1:
        raise PranceError(f"--static-plan {spec} holds {len(plans)} plans; give a file with one")
    return (*plans[0], None, adaptive_macs)


#: Settings whose value in runs recorded before they existed differs from today's default.
_BEFORE_THEY_EXISTED = {"static_slack": 1.0}


def _flat(args: Mapping[str, Any]) -> dict[str, Any]:
    """A run's settings as one flat dict (its ``train`` part and the sources); training settings a run was
    recorded without (it predates them) read as the value they had then (mostly today's default)."""
    return {**{k: v for k, v in args.items() if k not in ("train", "static_plan")}, **FinetuneConfig().to_dict(),
            **_BEFORE_THEY_EXISTED, **dict(args.get("train") or {})}


__all__ = [
    "KIND",
    "PLAN_FILE",
    "STATIC_CHOICE",
    "STATIC_KIND",
    "FinetuneConfig",
    "JointTask",
    "Pipeline",
    "SelectorTraining",
    "StaticTask",
    "Student",
    "adaptive_mean_macs",
    "choose_static_plan",
    "finetune_loss",
    "load_adaptive",
    "load_teacher",
    "pipeline_of",
    "run_finetune",
    "selector_training_for",
]
