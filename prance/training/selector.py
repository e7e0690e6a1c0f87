"""Train the selector with PPO and the Result-to-Go reward, under a MACs budget (DESIGN.md §3).

The meta-network is frozen; only the selector learns. One update reads top to bottom:

    batch of training images → the dense (full-size) prediction of each → one Result-to-Go
    rollout (the selector samples stage 1, 2, 3; each step's outcome comes from finishing the
    network from that stage with the later stages at full size) → rewards with the current λ
    (by default each step's change of the outcome, see :mod:`prance.selector.reward`) →
    PPO on the [3, B] rollout → dual ascent on λ with the decided runs' mean MACs → log.

After the last update the deterministic selector is calibrated on the holdout so that its
mean MACs (selector included) land on the budget, and the run writes ``adaptive.pt`` (an
:class:`~prance.adaptive.AdaptiveViT` file) and ``curves.png``.

One selector for many budgets (``budget_range``): every trajectory (image) draws its budget
uniformly from the range, shown to the policy in its state; λ is piecewise linear in the
budget with one multiplier per budget bin (``budget_bins`` knots evenly spaced over the range,
ends included, see :class:`~prance.selector.budget.DualAscent`). Uniform draws rather than the
knots alone, so the policy meets every budget it will be asked for. Calibration then sets the
knob at each knot and joins them into the knob curve of the calibration record; the holdout
mean at the midpoints between knots is measured and recorded too (how well the curve
interpolates).

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
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from prance.accounting import macs_per_sample, token_fractions
from prance.adaptive import AdaptiveViT, selector_from_record, selector_record
from prance.data.held import HeldBatches
from prance.data.splits import training_splits
from prance.engine import DynamicExecutor
from prance.errors import PranceError
from prance.files import atomic_write, recorded_path
from prance.model.metavit import MetaViT
from prance.selector.budget import (Calibration, DualAscent, budget_knots, calibrate, calibrate_range, check_budget,
                                    check_budget_range)
from prance.selector.ppo import PPOConfig, Rollout, ppo_update
from prance.selector.reward import REWARD_KINDS, step_reward, step_rewards
from prance.selector.selector import Sampled, Selector, SelectorConfig
from prance.training.checkpoint import atomic_save, load_checkpoint, make_checkpoint, model_from_checkpoint
from prance.training.round_up import calibrate_with_round_up
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
    keep_grid: float = 0.0  # the selector's keep ratios raised to multiples of this (0: the search space's grid)
    round_up: int = 0  # > 0: every stage decision rounded up to one of this many representatives (calibrated so)
    keep_penalty: float = 0.01  # small penalty on the fraction of tokens a stage keeps
    reward: str = "gain"  # "gain": each step's change of the Result-to-Go outcome; "outcome": the outcome itself
    # (the paper's); see prance.selector.reward. Gain: 90.37 % against 90.11 % on the holdout (fmnist-tiny, 3 seeds)
    lam_lr: float = 0.5  # dual-ascent step size of λ
    lam_init: float = 0.5  # λ at the start
    ppo: dict[str, Any] = field(default_factory=dict)  # PPOConfig fields that differ from its defaults
    seed: int = 0
    holdout_limit: int | None = None  # calibrate on at most this many held-out images
    limit: int | None = None  # roll out on a random subset of this many training images
    checkpoint_every: int = 25  # write last.pt every this many updates
    data: str = "fashion-mnist"
    data_dir: str | None = None
    budget_range: tuple[float, float] | None = None  # one selector for every budget in [low, high]; `budget`
    # is then where the written adaptive model starts
    budget_bins: int = 6  # with budget_range: λ knots and calibration points evenly spaced over it, ends included

    def __post_init__(self) -> None:
        check_budget(self.budget)
        if self.budget_range is not None:
            self.budget_range = check_budget_range(self.budget_range)
            budget_knots(self.budget_range, self.budget_bins)  # checks the bin count
            if not self.budget_range[0] <= self.budget <= self.budget_range[1]:
                raise PranceError(f"budget {self.budget} (where adaptive.pt starts) must lie in the budget range "
                                  f"{self.budget_range[0]},{self.budget_range[1]}")
        PPOConfig(**self.ppo)  # checks the PPO fields
        SelectorConfig(encoder=self.encoder, hidden=self.hidden)
        if self.updates < 1 or self.batch_size < 2 or self.checkpoint_every < 1:
            raise PranceError("updates and checkpoint_every must be >= 1 and batch_size >= 2; fix the value")
        if self.reward not in REWARD_KINDS:
            raise PranceError(f"reward {self.reward!r} is none of {', '.join(REWARD_KINDS)}; pick one")
        if self.keep_penalty < 0 or self.lam_lr <= 0 or self.lam_init < 0:
            raise PranceError("keep_penalty and lam_init must be >= 0 and lam_lr > 0; fix the value")
        if not 0 <= self.keep_grid <= 1 or self.round_up < 0:
            raise PranceError(f"keep_grid {self.keep_grid} must be in [0, 1] and round_up {self.round_up} >= 0 "
                              "(0: off); fix the value")
        if self.round_up and self.budget_range is not None:
            raise PranceError("round-up is calibrated at one budget; drop it for a --budget-range selector (or round "
                              "up a selector of one budget)")

    def ppo_config(self) -> PPOConfig:
        return PPOConfig(**self.ppo)

    def knots(self) -> list[float]:
        """The budgets λ is learned at and the knob calibrated at: the bins of the range, or the one budget."""
        return [self.budget] if self.budget_range is None else budget_knots(self.budget_range, self.budget_bins)

    def budgets(self, update: int, rank: int) -> torch.Tensor:
        """``[batch_size]`` float64 budgets of one rollout's trajectories (uniform draws over a range)."""
        if self.budget_range is None:
            return torch.full((self.batch_size,), self.budget, dtype=torch.float64)
        low, high = self.budget_range
        gen = torch.Generator().manual_seed(mix_seed(self.seed, update, rank, 2))
        return low + (high - low) * torch.rand(self.batch_size, generator=gen, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SelectorTrainConfig":
        """Settings as recorded; a record from before a setting existed reads as it then behaved."""
        names = {f.name for f in fields(cls)}
        return cls(**{**ADDED, **{k: v for k, v in d.items() if k in names}})


#: Settings added after runs were recorded, with the value that reproduces those runs.
ADDED: dict[str, Any] = {"reward": "outcome"}


#: Settings that may change when a run is resumed.
RESUMABLE_CHANGES = ("updates", "checkpoint_every", "holdout_limit", "data_dir", "round_up")


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
        check_same_settings(cfg.to_dict(), {**ADDED, **resume_from["args"]["train"]}, RESUMABLE_CHANGES, folder.path)

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
                                                                   mlp_per_stage=cfg.mlp_per_stage, budget=cfg.budget,
                                                                   budget_range=cfg.budget_range,
                                                                   keep_grid=cfg.keep_grid))
    selector.to(ctx.device)
    ppo = cfg.ppo_config()
    optimizer = torch.optim.Adam(selector.agent.parameters(), lr=ppo.lr, eps=1e-5)
    dual = DualAscent(cfg.knots(), lr=cfg.lam_lr, init=cfg.lam_init)
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
    args = {"meta": recorded_path(meta_path), "train": cfg.to_dict()}

    folder.create(fresh=resume_from is None, split=split)
    if ctx.is_main:
        folder.log.write(event="start", resumed_at_update=None if resume_from is None else update, kind=KIND,
                         world_size=ctx.world_size, device=str(ctx.device), train_images=len(splits.train),
                         holdout_images=len(splits.holdout), dense_macs=dense_macs, selector_macs=selector_macs,
                         config=args, split=split)
    if not bool(selector.norm.fitted):  # on the first batch of the run, whatever update it starts at
        selector.fit_features(_states(engine, selector, next(_batches(splits.train, cfg, ctx, 0))[0],
                                      cfg.budgets(0, 0)))
        if ctx.distributed:  # every rank standardises as rank 0 does (that is what is saved and deployed)
            for t in (selector.norm.mean, selector.norm.std):
                dist.broadcast(t, src=0)
    batches = _batches(splits.train, cfg, ctx, update)

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
                                 cfg.budgets(update, ctx.rank), ppo=ppo, keep_penalty=cfg.keep_penalty,
                                 reward=cfg.reward,
                                 progress=update / cfg.updates, act_gen=act_gen, order_gen=order_gen, ctx=ctx)
        update += 1
        if ctx.is_main:
            record["charts/seconds"] = time.perf_counter() - start
            folder.log.write(event="update", update=update, **record)
            if update % 10 == 0 or update == cfg.updates:
                say(f"update {update}/{cfg.updates}  return {record['charts/return']:.3f}  top-1 "
                    f"{record['charts/top1']:.1f}% (dense {record['charts/dense_top1']:.1f}%)  MACs "
                    f"{record['charts/macs_ratio']:.3f} (budget {record['charts/budget']:.3f})  λ "
                    f"{record['charts/lambda']:.3f}")
        if update % cfg.checkpoint_every == 0 or update == cfg.updates or update == stop_at:
            save(LAST)
            ctx.barrier()

    summary: dict[str, Any] = {"out": str(folder.path), "update": update, "updates": cfg.updates,
                               "complete": update == cfg.updates, "last": str(folder.path / LAST)}
    if update == cfg.updates and ctx.is_main:
        # --- calibration on the holdout: the deployed (deterministic) selector's mean MACs onto the budget(s)
        if cfg.budget_range is None:
            cal, holdout_top1 = calibrate_on(engine, selector, splits.holdout, cfg.budget, dense_macs, ctx.device)
            calibration = {"knob": cal.knob, "holdout_macs_ratio": cal.macs_ratio, "holdout_top1": holdout_top1,
                           "holdout_images": len(splits.holdout), "iterations": cal.iterations}
            said = [f"calibrated on {len(splits.holdout)} held-out images: knob {cal.knob:+.4f}, MACs "
                    f"{cal.macs_ratio:.4f} of dense (budget {cfg.budget}), top-1 {holdout_top1:.2f}%; wrote "
                    f"{folder.path / ADAPTIVE}"]
        else:  # the knob at every budget bin, a curve between them, checked at the midpoints
            calibration = calibrate_range_on(engine, selector, splits.holdout, cfg.knots(), cfg.budget, dense_macs,
                                             ctx.device)
            said = [f"calibrated on {len(splits.holdout)} held-out images at {len(cfg.knots())} budgets:"]
            said += [f"  budget {p['budget']:.4f}: MACs {p['holdout_macs_ratio']:.4f} of dense, top-1 "
                     f"{p['holdout_top1']:.2f}%, knob {p['knob']:+.4f}{'' if p['calibrated'] else ' (between)'}"
                     for p in calibration["points"]]
            said += [f"wrote {folder.path / ADAPTIVE} (budgets {cfg.budget_range[0]:g} to {cfg.budget_range[1]:g}, "
                     f"starts at {cfg.budget:g})"]
        adaptive = AdaptiveViT(model, selector.eval(), cfg.budget, calibration=calibration, split=split)
        if cfg.round_up:  # calibrated again with every stage decision rounded up to one of K (DESIGN.md §5)
            calibration = calibrate_with_round_up(adaptive, splits.holdout, cfg.round_up)
            said.append(f"  rounded up to {cfg.round_up} decisions per stage and calibrated again: knob "
                        f"{calibration['knob']:+.4f}, MACs {calibration['holdout_macs_ratio']:.4f} of dense, top-1 "
                        f"{calibration['holdout_top1']:.2f}%")
        metrics = {k: calibration[k] for k in ("holdout_top1", "holdout_macs_ratio")}
        adaptive.save(folder.path / ADAPTIVE, metrics=metrics, args=args)
        plot_curves(folder.path / LOG, folder.path / CURVES)
        folder.log.write(event="end", update=update, calibration=adaptive.calibration)
        for line in said:
            say(line)
        summary.update(adaptive=str(folder.path / ADAPTIVE), **metrics,
                       **{k: calibration[k] for k in ("knob", "points") if k in calibration})
    return summary


# ----------------------------------------------------------------------------- pieces
def selector_update(engine: DynamicExecutor, selector: Selector, optimizer: torch.optim.Optimizer, dual: DualAscent,
                    images: torch.Tensor, labels: torch.Tensor, budget: torch.Tensor, *, ppo: PPOConfig,
                    keep_penalty: float, progress: float, act_gen: torch.Generator, order_gen: torch.Generator,
                    ctx: DistContext, reward: str) -> dict[str, float]:
    """One PPO update of ``selector`` on a batch of training images; returns the logged numbers.

    The selector samples every stage in a Result-to-Go rollout on the engine's (current)
    meta-network, each step is rewarded at λ of its image's ``budget`` ``[B]``, PPO runs on
    the ``[3, B]`` buffer (dropped afterwards; ``reward`` is the kind of
    :func:`~prance.selector.reward.step_rewards`), then λ takes one dual step per budget bin with
    the decided runs' MACs (summed over processes). Train-selector and joint fine-tuning
    (``--alternate``) both call it.
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
    rewards = step_rewards(parts, lam, keep_penalty, reward, (dense_macs + selector_macs) / dense_macs)
    buffer = Rollout(*(torch.stack([getattr(s, k) for s in sampled]) for k in
                       ("features", "action", "log_prob", "value")), rewards=rewards)
    stats = ppo_update(selector.agent, optimizer, buffer, ppo, progress=progress, generator=order_gen,
                       after_backward=(lambda: _average_grads(selector, ctx)) if ctx.distributed else None)
    final_ratio = (rollout.final.macs.double() + selector_macs) / dense_macs
    moments = _global_sum(dual.moments(budget, final_ratio).to(images.device), ctx).cpu()
    dual.step(moments)

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
        **(_bin_record(dual, moments) if len(dual.budgets) > 1 else {}),
    }


def _bin_record(dual: DualAscent, moments: torch.Tensor) -> dict[str, float]:
    """Per budget bin: this rollout's (hat-weighted) mean MACs ratio and budget, and the bin's λ after the step."""
    out: dict[str, float] = {}
    for k, knot in enumerate(dual.budgets.tolist()):
        weight, cost, budget = moments[:, k].tolist()
        out[f"bins/lambda@{knot:.4g}"] = float(dual.lam[k])
        if weight > 0:
            out[f"bins/macs_ratio@{knot:.4g}"], out[f"bins/budget@{knot:.4g}"] = cost / weight, budget / weight
    return out


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


def _states(engine: DynamicExecutor, selector: Selector, images: torch.Tensor, budget: torch.Tensor) -> list:
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


def _global_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's ``values`` added up (they are sums over each rank's images)."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@torch.no_grad()
def deployed_ratio(engine: DynamicExecutor, selector: Selector, images: Sequence[torch.Tensor], budget: float,
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
    images = HeldBatches(holdout, device, batch_size)

    def ratio_at(knob: float) -> float:
        selector.knob.fill_(knob)
        return deployed_ratio(engine, selector, images, budget, dense_macs)[0]

    cal = calibrate(ratio_at, budget, tolerance=0.005 * budget)
    selector.knob.fill_(cal.knob)
    ratio, logits = deployed_ratio(engine, selector, images, budget, dense_macs)
    return Calibration(cal.knob, ratio, cal.iterations), images.accuracy(logits)


def calibrate_range_on(engine: DynamicExecutor, selector: Selector, holdout: Dataset, knots: list[float],
                       budget: float, dense_macs: float, device: torch.device, batch_size: int = 256
                       ) -> dict[str, Any]:
    """Calibrate the knob at every knot on ``holdout`` and set the selector's knob curve through them.

    Returns the calibration record: the curve, and per point (the knots, the midpoints between
    them and ``budget``) the knob, holdout mean MACs ratio and top-1 of the deployed selector;
    ``holdout_macs_ratio`` / ``holdout_top1`` at the top level are those at ``budget``."""
    images = HeldBatches(holdout, device, batch_size)
    selector.knob_curve = None
    selector.knob.zero_()

    def ratio_at(b: float, knob: float) -> float:
        selector.knob.fill_(knob)
        return deployed_ratio(engine, selector, images, b, dense_macs)[0]

    curve, cals = calibrate_range(ratio_at, knots)
    selector.knob.zero_()
    selector.knob_curve = curve
    between = [0.5 * (a + b) for a, b in zip(knots, knots[1:])]
    budgets = sorted([*knots, *between, *([] if any(math.isclose(budget, b) for b in knots + between) else [budget])])
    points = []
    for b in budgets:
        ratio, logits = deployed_ratio(engine, selector, images, b, dense_macs)
        points.append({"budget": b, "knob": float(curve(torch.tensor([b], dtype=torch.float64))[0]),
                       "holdout_macs_ratio": ratio, "calibrated": b in knots,
                       "holdout_top1": images.accuracy(logits)})
    at = min(points, key=lambda p: abs(p["budget"] - budget))
    return {"knob_curve": curve.to_dict(), "points": points, "holdout_macs_ratio": at["holdout_macs_ratio"],
            "holdout_top1": at["holdout_top1"], "holdout_images": len(images.labels),
            "iterations": sum(c.iterations for c in cals)}


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
    knots = sorted({k.split("@")[1] for k in (rows[-1] if rows else {}) if k.startswith("bins/")}, key=float)
    if knots:  # a budget range: each bin's cost against its budget, and its λ
        panels[2:4] = [("MACs / dense per budget bin (dashed: budget)",
                        [f"bins/macs_ratio@{b}" for b in knots] + [f"bins/budget@{b}" for b in knots]),
                       ("λ per budget bin", [f"bins/lambda@{b}" for b in knots])]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    x = [r["update"] for r in rows]
    for ax, (title, keys) in zip(axes.flat, panels):
        for i, k in enumerate(keys):
            dashed = k.startswith("bins/budget@")
            ax.plot(x, [r.get(k, math.nan) for r in rows], "--" if dashed else "-",
                    color=f"C{i % len(knots)}" if k.startswith("bins/") else None,
                    label=None if dashed else k.split("/")[-1])
        ax.set_title(title)
        ax.set_xlabel("update")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("prance train-selector: Result-to-Go PPO")
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return out


__all__ = ["ADAPTIVE", "CURVES", "KIND", "SelectorTrainConfig", "calibrate_on", "calibrate_range_on", "deployed_ratio",
           "plot_curves", "selector_update", "train_selector"]
