"""Train the selector with PPO and the Result-to-Go reward, under a MACs budget (DESIGN.md §3).

The meta-network is frozen; only the selector learns. One update reads top to bottom:

    batch of training images → the dense (full-size) prediction of each → one Result-to-Go
    rollout (the selector samples stage 1, 2, 3; each step's reward comes from finishing the
    network from that stage with the later stages at full size) → rewards with the current λ →
    PPO on the [3, B] rollout → dual ascent on λ with the decided runs' mean MACs → log.

After the last update the deterministic selector is calibrated on the holdout so that its
mean MACs (selector included) land on the budget, and the run writes ``adaptive.pt`` (an
:class:`~prance.adaptive.AdaptiveViT` file) and ``curves.png``.

The run folder, log, settings check, exact resume and DDP are those of every training
command (:mod:`prance.training.run`). Under ``torchrun`` every rank rolls out its own shard
of images; PPO gradients and the budget's mean cost are averaged across ranks, so all ranks
hold the same selector and the same λ. Randomness (action sampling, minibatch order) is
drawn from generators seeded by (seed, update, rank), and the data order by (seed, epoch),
so a resumed run continues exactly.

Splits (DESIGN.md §8): rollouts read training images only; calibration reads the holdout of
the meta-network's pipeline; the test split is never read here.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from prance.accounting import macs_per_sample, token_fractions
from prance.adaptive import AdaptiveViT, selector_from_record, selector_record
from prance.data.splits import training_splits
from prance.engine import DynamicExecutor
from prance.errors import PranceError
from prance.files import atomic_write
from prance.model.metavit import MetaViT
from prance.selector.budget import Calibration, DualAscent, calibrate, check_budget
from prance.selector.ppo import PPOConfig, Rollout, ppo_update
from prance.selector.reward import step_reward
from prance.selector.selector import Sampled, Selector, SelectorConfig
from prance.training.checkpoint import atomic_save, load_checkpoint, make_checkpoint, model_from_checkpoint
from prance.training.run import (
    LAST,
    LOG,
    DistContext,
    EpochSampler,
    RunFolder,
    check_same_settings,
    close_distributed,
    init_distributed,
    mix_seed,
    pipeline_holdout,
)
from prance.training.subnets import require_trained_for

KIND = "selector"
ADAPTIVE, CURVES = "adaptive.pt", "curves.png"


@dataclass
class SelectorTrainConfig:
    """Settings of ``prance train-selector`` (plain values, stored in its checkpoints)."""

    budget: float = 0.5  # mean MACs as a fraction of the dense model's, selector included
    updates: int = 300  # PPO updates (one rollout of batch_size images each)
    batch_size: int = 128  # trajectories (images) per rollout and process
    encoder: str = "keys"  # state encoder: "keys" (the paper's) or "cls"
    hidden: int = 128  # selector MLP width
    mlp_per_stage: bool = False  # one MLP ratio per stage instead of per block
    keep_penalty: float = 0.01  # small penalty on the fraction of tokens a stage keeps
    lam_lr: float = 0.5  # dual-ascent step size of λ
    lam_init: float = 0.5  # λ at the start
    ppo: dict[str, Any] = field(default_factory=dict)  # PPOConfig fields that differ from its defaults
    seed: int = 0
    holdout_limit: int | None = None  # calibrate on at most this many held-out images
    limit: int | None = None  # roll out on a random subset of this many training images
    checkpoint_every: int = 25  # write last.pt every this many updates
    data: str = "fashion-mnist"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        check_budget(self.budget)
        PPOConfig(**self.ppo)  # checks the PPO fields
        SelectorConfig(encoder=self.encoder, hidden=self.hidden)
        if self.updates < 1 or self.batch_size < 2 or self.checkpoint_every < 1:
            raise PranceError("updates and checkpoint_every must be >= 1 and batch_size >= 2; fix the value")
        if self.keep_penalty < 0 or self.lam_lr <= 0 or self.lam_init < 0:
            raise PranceError("keep_penalty and lam_init must be >= 0 and lam_lr > 0; fix the value")

    def ppo_config(self) -> PPOConfig:
        return PPOConfig(**self.ppo)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SelectorTrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: Settings that may change when a run is resumed.
RESUMABLE_CHANGES = ("updates", "checkpoint_every", "holdout_limit", "data_dir")


def train_selector(
    meta_path: str | os.PathLike[str],
    cfg: SelectorTrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = "cpu",
    stop_after: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Everything ``prance train-selector`` does; returns a summary (paths, holdout figures)."""
    ctx = init_distributed(device)
    try:
        return _train(Path(meta_path), cfg, RunFolder(out_dir, KIND, ctx), resume, overwrite, stop_after, verbose)
    finally:
        close_distributed(ctx)


def _train(meta_path: Path, cfg: SelectorTrainConfig, folder: RunFolder, resume: bool, overwrite: bool,
           stop_after: int | None, verbose: bool) -> dict[str, Any]:
    ctx = folder.ctx
    say = print if verbose and ctx.is_main else (lambda *_: None)
    resume_from = folder.prepare(resume, overwrite)
    if resume_from is not None:
        check_same_settings(cfg.to_dict(), resume_from["args"]["train"], RESUMABLE_CHANGES, folder.path)

    # --- the frozen meta-network and the data it was trained with
    meta_ckpt = load_checkpoint(meta_path, kind=("meta", "joint"))
    model = model_from_checkpoint(meta_ckpt).to(ctx.device).eval().requires_grad_(False)
    require_trained_for(meta_ckpt, meta_path, space=model.space)
    holdout = pipeline_holdout(cfg.data, {"--meta": str(meta_path)})
    splits = training_splits(cfg.data, img_size=model.config.img_size, in_chans=model.config.in_chans,
                             holdout=holdout, train_augment=False, root=cfg.data_dir, limit=cfg.limit,
                             holdout_limit=cfg.holdout_limit, seed=cfg.seed)
    if splits.train.info.num_classes != model.config.num_classes:
        raise PranceError(f"{meta_path} predicts {model.config.num_classes} classes but {cfg.data} has "
                          f"{splits.train.info.num_classes}; give the meta-network trained on this data")
    split = splits.record(cfg.data)

    # --- the selector, its optimiser and λ
    torch.manual_seed(cfg.seed)
    selector = Selector(model.config, model.space, SelectorConfig(encoder=cfg.encoder, hidden=cfg.hidden,
                                                                   mlp_per_stage=cfg.mlp_per_stage, budget=cfg.budget))
    selector.to(ctx.device)
    ppo = cfg.ppo_config()
    optimizer = torch.optim.Adam(selector.agent.parameters(), lr=ppo.lr, eps=1e-5)
    dual = DualAscent([cfg.budget], lr=cfg.lam_lr, init=cfg.lam_init)
    update = 0
    if resume_from is not None:
        state = resume_from["train_state"]
        if int(state.get("world_size", 1)) != ctx.world_size:
            raise PranceError(f"the run in {folder.path} used {state.get('world_size', 1)} processes; resume it with "
                              "as many (torchrun --nproc_per_node)")
        selector = selector_from_record(resume_from["selector"], model, folder.path / LAST).to(ctx.device)
        optimizer = torch.optim.Adam(selector.agent.parameters(), lr=ppo.lr, eps=1e-5)
        optimizer.load_state_dict(state["optimizer"])
        dual.load_state_dict(state["dual"])
        update = int(state["update"])
    engine = DynamicExecutor(model)
    dense_macs = float(macs_per_sample(model.config, model.full_plan)[0])
    selector_macs = selector.macs_per_image()
    args = {"meta": str(meta_path), "train": cfg.to_dict()}

    folder.create(fresh=resume_from is None, split=split)
    if ctx.is_main:
        folder.log.write(event="start", resumed_at_update=None if resume_from is None else update, kind=KIND,
                         world_size=ctx.world_size, device=str(ctx.device), train_images=len(splits.train),
                         holdout_images=len(splits.holdout), dense_macs=dense_macs, selector_macs=selector_macs,
                         config=args, split=split)
    if not bool(selector.norm.fitted):  # on the first batch of the run, whatever update it starts at
        selector.fit_features(_states(engine, selector, next(_batches(splits.train, cfg, ctx, 0))[0], cfg.budget))
        if ctx.distributed:  # every rank standardises as rank 0 does (that is what is saved and deployed)
            for t in (selector.norm.mean, selector.norm.std):
                dist.broadcast(t, src=0)
    batches = _batches(splits.train, cfg, ctx, update)
    budget = torch.full((cfg.batch_size,), cfg.budget, dtype=torch.float64)

    def save(name: str) -> None:
        if not ctx.is_main:
            return
        ckpt = make_checkpoint(model, KIND, train_state={"optimizer": optimizer.state_dict(), "update": update,
                                                         "dual": dual.state_dict(), "world_size": ctx.world_size},
                               args=args, split=split)
        ckpt["selector"], ckpt["budget"] = selector_record(selector), cfg.budget
        atomic_save(ckpt, folder.path / name)

    stop_at = None if stop_after is None else update + stop_after
    while update < cfg.updates and (stop_at is None or update < stop_at):
        start = time.perf_counter()
        act_gen = torch.Generator(device=ctx.device).manual_seed(mix_seed(cfg.seed, update, ctx.rank))
        order_gen = torch.Generator().manual_seed(mix_seed(cfg.seed, update, ctx.rank, 1))
        images, labels = next(batches)
        record = selector_update(engine, selector, optimizer, dual, images.to(ctx.device), labels.to(ctx.device),
                                 budget, ppo=ppo, keep_penalty=cfg.keep_penalty, progress=update / cfg.updates,
                                 act_gen=act_gen, order_gen=order_gen, ctx=ctx)
        update += 1
        if ctx.is_main:
            record["charts/seconds"] = time.perf_counter() - start
            folder.log.write(event="update", update=update, **record)
            if update % 10 == 0 or update == cfg.updates:
                say(f"update {update}/{cfg.updates}  return {record['charts/return']:.3f}  top-1 "
                    f"{record['charts/top1']:.1f}% (dense {record['charts/dense_top1']:.1f}%)  MACs "
                    f"{record['charts/macs_ratio']:.3f} (budget {cfg.budget})  λ {record['charts/lambda']:.3f}")
        if update % cfg.checkpoint_every == 0 or update == cfg.updates or update == stop_at:
            save(LAST)
            ctx.barrier()

    summary: dict[str, Any] = {"out": str(folder.path), "update": update, "updates": cfg.updates,
                               "complete": update == cfg.updates, "last": str(folder.path / LAST)}
    if update == cfg.updates and ctx.is_main:
        # --- calibration on the holdout: the deployed (deterministic) selector's mean MACs onto the budget
        cal, holdout_top1 = calibrate_on(engine, selector, splits.holdout, cfg.budget, dense_macs, ctx.device)
        adaptive = AdaptiveViT(model, selector.eval(), cfg.budget,
                               calibration={"knob": cal.knob, "holdout_macs_ratio": cal.macs_ratio,
                                            "holdout_top1": holdout_top1, "holdout_images": len(splits.holdout),
                                            "iterations": cal.iterations}, split=split)
        adaptive.save(folder.path / ADAPTIVE, metrics={"holdout_top1": holdout_top1,
                                                      "holdout_macs_ratio": cal.macs_ratio})
        plot_curves(folder.path / LOG, folder.path / CURVES)
        folder.log.write(event="end", update=update, calibration=adaptive.calibration)
        say(f"calibrated on {len(splits.holdout)} held-out images: knob {cal.knob:+.4f}, MACs {cal.macs_ratio:.4f} "
            f"of dense (budget {cfg.budget}), top-1 {holdout_top1:.2f}%; wrote {folder.path / ADAPTIVE}")
        summary.update(adaptive=str(folder.path / ADAPTIVE), holdout_top1=holdout_top1,
                       holdout_macs_ratio=cal.macs_ratio, knob=cal.knob)
    return summary


# ----------------------------------------------------------------------------- pieces
def selector_update(engine: DynamicExecutor, selector: Selector, optimizer: torch.optim.Optimizer, dual: DualAscent,
                    images: torch.Tensor, labels: torch.Tensor, budget: torch.Tensor, *, ppo: PPOConfig,
                    keep_penalty: float, progress: float, act_gen: torch.Generator, order_gen: torch.Generator,
                    ctx: DistContext) -> dict[str, float]:
    """One PPO update of ``selector`` on a batch of training images; returns the logged numbers.

    The selector samples every stage in a Result-to-Go rollout on the engine's (current)
    meta-network, each step is rewarded at λ of its image's ``budget`` ``[B]``, PPO runs on
    the ``[3, B]`` buffer (dropped afterwards), then λ takes one dual step with the decided
    runs' mean MACs. Train-selector and joint fine-tuning (``--alternate``) both call it.
    """
    model = engine.model
    dense_macs = float(macs_per_sample(model.config, model.full_plan)[0])
    selector_macs = selector.macs_per_image()
    dense_correct = engine(images).argmax(-1) == labels
    sampled: list[Sampled] = []
    rollout = engine.rollout(images, lambda s: _record(sampled, selector.sample(s, act_gen)), budget=budget)
    lam = dual.lam_of(budget).to(images.device, torch.float32)
    parts = [step_reward(step.outcome.logits, labels, dense_correct, step.outcome.macs + selector_macs,
                         dense_macs, stage_kept(model.config, step.outcome.plan, step.stage))
             for step in rollout.steps]
    rewards = torch.stack([p.total(lam, keep_penalty) for p in parts])
    buffer = Rollout(*(torch.stack([getattr(s, k) for s in sampled]) for k in
                       ("features", "action", "log_prob", "value")), rewards=rewards)
    stats = ppo_update(selector.agent, optimizer, buffer, ppo, progress=progress, generator=order_gen,
                       after_backward=(lambda: _average_grads(selector, ctx)) if ctx.distributed else None)
    final_ratio = (rollout.final.macs.double() + selector_macs) / dense_macs
    dual.update(budget, _global_mean(final_ratio.to(images.device), ctx).cpu().expand(len(budget)))

    # --- what is logged (CleanRL's grouped names)
    final_plan = rollout.final.plan
    return {
        "charts/return": float(rewards.sum(0).mean()),
        "charts/accuracy_term": float(parts[-1].accuracy.mean()),
        "charts/top1": 100.0 * float((rollout.final.logits.argmax(-1) == labels).float().mean()),
        "charts/dense_top1": 100.0 * float(dense_correct.float().mean()),
        "charts/macs_ratio": float(final_ratio.mean()),
        "charts/budget": float(budget.mean()),
        "charts/lambda": float(dual.lam_of(budget).mean()),
        **{f"charts/keep_stage{s}": float((final_plan.keep[:, s] * final_plan.merge_keep[:, s]).mean())
           for s in range(1, model.config.num_stages)},
        **{f"charts/tokens_stage{s}": float(v) for s, v in
           enumerate(token_fractions(model.config, final_plan).mean(0).tolist())},
        **stats,
    }


def stage_kept(config: Any, plan: Any, stage: int) -> torch.Tensor:
    """``[B]`` fraction of the patch tokens entering ``stage`` that it keeps (what its own decision chose)."""
    fractions = token_fractions(config, plan)
    return fractions[:, stage] / fractions[:, stage - 1]


def _record(sampled: list[Sampled], s: Sampled):
    sampled.append(s)
    return s.plan


def _batches(train_set: Dataset, cfg: SelectorTrainConfig, ctx: DistContext, update: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless full batches of this rank's shard; epoch order from (seed, epoch), starting at ``update``."""
    sampler = EpochSampler(train_set, ctx, cfg.seed)
    per_epoch = sampler.num_samples // cfg.batch_size
    if per_epoch < 1:
        raise PranceError(f"{len(train_set)} training images make no batch of {cfg.batch_size} per process; "
                          "lower --batch-size or use more data")
    epoch, in_epoch = divmod(update, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.skip = in_epoch * cfg.batch_size
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True)
        yield from loader
        epoch, in_epoch = epoch + 1, 0


def _states(engine: DynamicExecutor, selector: Selector, images: torch.Tensor, budget: float) -> list:
    """The states the (untrained) selector meets on ``images``: what feature standardisation is fitted to."""
    states: list = []
    gen = torch.Generator(device=selector.knob.device).manual_seed(0)

    def policy(state):
        states.append(state)
        return selector.sample(state, gen).plan

    engine.rollout(images.to(selector.knob.device), policy, budget=budget)
    return states


def _average_grads(selector: Selector, ctx: DistContext) -> None:
    for p in selector.agent.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= ctx.world_size


def _global_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over every rank's ``values`` (equal counts per rank)."""
    mean = values.mean().reshape(1)
    if ctx.distributed:
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        mean /= ctx.world_size
    return mean


@torch.no_grad()
def deployed_ratio(engine: DynamicExecutor, selector: Selector, images: list[torch.Tensor], budget: float,
                   dense_macs: float) -> tuple[float, torch.Tensor]:
    """Mean MACs ratio (selector included) of the deterministic selector on ``images`` batches, and its logits."""
    macs, logits = [], []
    for x in images:
        out, plan = engine.run(x, policy=selector, budget=budget)
        macs.append(macs_per_sample(engine.model.config, plan).double() + selector.macs_per_image())
        logits.append(out)
    return float(torch.cat(macs).mean()) / dense_macs, torch.cat(logits)


def calibrate_on(engine: DynamicExecutor, selector: Selector, holdout: Dataset, budget: float, dense_macs: float,
                 device: torch.device, batch_size: int = 256) -> tuple[Calibration, float]:
    """Set the selector's knob so its mean MACs on ``holdout`` meet ``budget``; returns it and the top-1 there."""
    loader = DataLoader(holdout, batch_size=batch_size, shuffle=False)
    images, labels = [], []
    for x, y in loader:
        images.append(x.to(device))
        labels.append(y.to(device))

    def ratio_at(knob: float) -> float:
        selector.knob.fill_(knob)
        return deployed_ratio(engine, selector, images, budget, dense_macs)[0]

    cal = calibrate(ratio_at, budget, tolerance=0.005 * budget)
    selector.knob.fill_(cal.knob)
    ratio, logits = deployed_ratio(engine, selector, images, budget, dense_macs)
    top1 = 100.0 * float((logits.argmax(-1) == torch.cat(labels)).float().mean())
    return Calibration(cal.knob, ratio, cal.iterations), top1


def plot_curves(log_path: Path, out: Path) -> Path:
    """A PNG of the training curves in ``log_path`` (return, accuracy, MACs vs budget, λ, PPO diagnostics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    rows = [r for r in rows if r.get("event") == "update"]
    panels = [("return", ["charts/return"]), ("top-1 (%)", ["charts/top1", "charts/dense_top1"]),
              ("MACs / dense", ["charts/macs_ratio", "charts/budget"]), ("λ", ["charts/lambda"]),
              ("kept tokens", sorted(k for k in (rows[0] if rows else {}) if k.startswith("charts/tokens_stage"))),
              ("approx KL", ["losses/approx_kl"]), ("clip fraction", ["losses/clipfrac"]),
              ("explained variance", ["losses/explained_variance"])]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    x = [r["update"] for r in rows]
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            ax.plot(x, [r.get(k, math.nan) for r in rows], label=k.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("update")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("prance train-selector: Result-to-Go PPO")
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return out


__all__ = ["ADAPTIVE", "CURVES", "KIND", "SelectorTrainConfig", "calibrate_on", "deployed_ratio", "plot_curves",
           "selector_update", "train_selector"]
