"""The stages of ``prance run``, in order, each one call of the command that does the work.

    dense → meta → sweep → selector → finetune → static_finetune → round_up → evaluate → bench
    → report

Each stage reads the files of earlier stages and writes its own folder of the run (the
layout of the run folder is the contract with ``prance report``): the training stages are
the training commands' run folders (``prance train-dense``, ``train-meta``, ``train-selector``,
``finetune``), continued with their own exact resume after an interruption; the others are
what ``prance sweep``, ``evaluate``, ``bench`` and ``report`` write. Nothing here trains,
evaluates or times anything itself.

The training stages run in every process under torchrun (DDP); the rest only in rank 0.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prance.errors import PranceError
from prance.pipeline.config import RunConfig, prance_model


@dataclass
class Context:
    """What a stage needs: the settings, the run folder, this process's rank and whether to start over."""

    cfg: RunConfig
    run: Path
    rank: int = 0
    fresh: bool = False  # start the stage over (no resume from its last.pt)
    say: Callable[[str], None] = print

    @property
    def main(self) -> bool:
        return self.rank == 0

    def path(self, *parts: str) -> Path:
        return self.run.joinpath(*parts)

    def resume(self, folder: str) -> bool:
        """Continue the training run in ``folder`` when it holds one (and the stage is not started over)."""
        return not self.fresh and (self.path(folder) / "last.pt").is_file()

    def run_folder(self, folder: str) -> dict[str, bool]:
        """A training command's ``resume`` / ``overwrite``: continue the run in ``folder``, else start it over."""
        resume = self.resume(folder)
        return {"resume": resume, "overwrite": not resume}


@dataclass(frozen=True)
class Stage:
    """One stage: its function, the files that prove it done (relative to the run) and its folder."""

    name: str
    run: Callable[[Context], None]
    outputs: tuple[str, ...] | Callable[[RunConfig], tuple[str, ...]]  # or what the settings make it write
    folder: str | None = None  # removed when the stage starts over (None: writes into the run folder)
    training: bool = False  # runs in every process under torchrun
    describe: str = ""

    def files(self, cfg: RunConfig) -> tuple[str, ...]:
        """The files (relative to the run) that prove the stage done under settings ``cfg``."""
        return self.outputs(cfg) if callable(self.outputs) else self.outputs


# ----------------------------------------------------------------------------- the training commands' settings
def training_configs(cfg: RunConfig) -> dict[str, Any]:
    """The training commands' own settings objects for ``cfg`` (built here, so their checks run up front)."""
    from prance.training.dense import DenseTrainConfig
    from prance.training.finetune import FinetuneConfig
    from prance.training.meta import MetaTrainConfig
    from prance.training.selector import SelectorTrainConfig

    d, m, s, f, sf = cfg.dense, cfg.meta, cfg.selector, cfg.finetune, cfg.static_finetune
    dense = DenseTrainConfig(preset=d.preset, img_size=d.img_size, init=_timm(cfg.init),
                             model_overrides=dict(d.model_overrides), data=cfg.data, data_dir=cfg.data_dir,
                             limit=d.limit, val_limit=d.val_limit, holdout=d.holdout, holdout_seed=d.holdout_seed,
                             epochs=d.epochs, batch_size=d.batch_size, lr=d.lr, warmup_epochs=d.warmup_epochs,
                             augment=d.augment, seed=cfg.seed, checkpoint_every=d.checkpoint_every)
    meta = MetaTrainConfig(epochs=m.epochs, max_steps=m.max_steps, batch_size=m.batch_size, lr=m.lr,
                           warmup_steps=m.warmup_steps, num_random=m.num_random, augment=m.augment, seed=cfg.seed,
                           checkpoint_every=m.checkpoint_every)
    selector = SelectorTrainConfig(budget=cfg.budget, updates=s.updates, batch_size=s.batch_size, encoder=s.encoder,
                                   hidden=s.hidden, mlp_per_stage=s.mlp_per_stage, keep_grid=s.keep_grid,
                                   keep_penalty=s.keep_penalty, reward=s.reward, ppo={"lr": s.lr}, seed=cfg.seed,
                                   limit=s.limit, holdout_limit=s.holdout_limit, checkpoint_every=s.checkpoint_every,
                                   data=cfg.data, data_dir=cfg.data_dir)
    joint = FinetuneConfig(epochs=f.epochs, max_steps=f.max_steps, batch_size=f.batch_size, lr=f.lr,
                           warmup_steps=f.warmup_steps, distill_weight=f.distill_weight, alternate=f.alternate,
                           augment=f.augment, seed=cfg.seed, limit=f.limit, holdout_limit=f.holdout_limit,
                           checkpoint_every=f.checkpoint_every)
    static = FinetuneConfig(epochs=sf.epochs, max_steps=sf.max_steps, batch_size=sf.batch_size, lr=sf.lr,
                            warmup_steps=sf.warmup_steps, distill_weight=sf.distill_weight, augment=sf.augment,
                            static_plan="auto", static_candidates=sf.static_candidates,
                            static_slack=sf.static_slack, seed=cfg.seed, limit=sf.limit,
                            holdout_limit=sf.holdout_limit, checkpoint_every=sf.checkpoint_every)
    return {"dense": dense, "meta": meta, "selector": selector, "finetune": joint, "static_finetune": static}


def _timm(init: str | None) -> str | None:
    """``init`` as train-dense's ``--init`` (a timm file), or None for a prance checkpoint or no init."""
    if init is None or init_kind(init) != "timm":
        return None
    return init if init.startswith("timm:") else "timm:" + init


def init_kind(init: str) -> str:
    """"timm" for a timm/DeiT state-dict file (or ``timm:PATH``), "prance" for a prance checkpoint."""
    from prance.training.run import prance_checkpoint_or_none

    if init.startswith("timm:"):
        return "timm"
    return "prance" if prance_checkpoint_or_none(init) is not None else "timm"


# ----------------------------------------------------------------------------- training stages
def dense(ctx: Context) -> None:
    """Train the dense ViT; or take the ``init`` model as it is when it already predicts the run's classes."""
    from prance.training.dense import train_dense

    cfg = ctx.cfg
    out = ctx.path("dense")
    if cfg.init is not None and init_kind(cfg.init) == "prance":
        if ctx.main:
            _adopt_dense(cfg, out)
        return
    if cfg.init is not None and _same_classes_as_timm(cfg):
        if ctx.main:
            _convert_timm(cfg, out)
        return
    train_dense(training_configs(cfg)["dense"], out, **ctx.run_folder("dense"), device=cfg.device)


def _adopt_dense(cfg: RunConfig, out: Path) -> None:
    """A prance dense checkpoint of the run's data becomes dense/best.pt (copied, atomically)."""
    from prance.data.provenance import trained_on
    from prance.training.checkpoint import atomic_save, load_checkpoint

    ckpt = load_checkpoint(cfg.init, kind="dense")
    trained = trained_on(ckpt)
    if trained.data != cfg.data or trained.holdout is None:
        raise PranceError(f"init {cfg.init} was trained on {trained.where()}, not {cfg.data} with a recorded "
                          "holdout; give a dense checkpoint of this data set, a timm file (timm:PATH) or no init")
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, out / "best.pt")


def _same_classes_as_timm(cfg: RunConfig) -> bool:
    from prance.data import build_dataset
    from prance.model.timm_interop import from_timm

    model = from_timm(cfg.init.removeprefix("timm:"))
    shape = {"img_size": model.config.img_size, "in_chans": model.config.in_chans}
    data = build_dataset(cfg.data, "train", **shape, train_augment=False, root=cfg.data_dir)
    return data.info.num_classes == model.config.num_classes


def _convert_timm(cfg: RunConfig, out: Path) -> None:
    """timm weights that already predict the run's classes become dense/best.pt, recording the run's holdout."""
    from prance.data.splits import Holdout, training_splits
    from prance.model.timm_interop import from_timm
    from prance.training.checkpoint import save_checkpoint

    model = from_timm(cfg.init.removeprefix("timm:"))
    d = cfg.dense
    splits = training_splits(cfg.data, img_size=model.config.img_size, in_chans=model.config.in_chans,
                             holdout=Holdout(d.holdout, d.holdout_seed), train_augment=False, root=cfg.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "best.pt", model, "dense", args={"init": cfg.init, "data": cfg.data,
                                                           "data_dir": cfg.data_dir},
                    split=splits.record(cfg.data))


def meta(ctx: Context) -> None:
    """The meta-network from dense/best.pt, distilled from it, for the run's token mode."""
    from prance.training.meta import MetaRunConfig, run_train_meta

    cfg, m = ctx.cfg, ctx.cfg.meta
    space: dict[str, Any] = {"token_mode": cfg.mode, "min_keep": m.min_keep, "keep_grid": m.keep_grid}
    if m.widths is not None:
        space["widths"] = list(m.widths)
    if m.mlp_ratios is not None:
        space["mlp_ratios"] = list(m.mlp_ratios)
    run = MetaRunConfig(init=str(ctx.path("dense", "best.pt")), teacher="init", space=space, data=cfg.data,
                        data_dir=cfg.data_dir, limit=m.limit, val_limit=m.val_limit)
    run_train_meta(run, training_configs(cfg)["meta"], ctx.path("meta"), **ctx.run_folder("meta"),
                   device=cfg.device)


def selector(ctx: Context) -> None:
    """The selector of meta/best.pt at the run's budget (Result-to-Go PPO, calibrated on the holdout)."""
    from prance.training.selector import train_selector

    train_selector(ctx.path("meta", "best.pt"), training_configs(ctx.cfg)["selector"], ctx.path("selector"),
                   **ctx.run_folder("selector"), device=ctx.cfg.device)


def _finetune(ctx: Context, name: str) -> None:
    from prance.training.finetune import run_finetune

    run_finetune(ctx.path("selector", "adaptive.pt"), training_configs(ctx.cfg)[name], ctx.path(name),
                 teacher=str(ctx.path("dense", "best.pt")), data_dir=ctx.cfg.data_dir, **ctx.run_folder(name),
                 device=ctx.cfg.device)


def finetune(ctx: Context) -> None:
    """Joint fine-tuning of the meta-network under the selector's decisions: finetune/adaptive.pt, the result."""
    _finetune(ctx, "finetune")


def static_finetune(ctx: Context) -> None:
    """The same fine-tuning under the best static plan of the selector's mean MACs (the fair baseline)."""
    _finetune(ctx, "static_finetune")


def round_up(ctx: Context) -> None:
    """With ``round_up.k`` > 0, finetune/adaptive.pt rounded up to K representative decisions per stage and
    calibrated again (round_up/adaptive.pt, then PRANCE); round_up/round_up.json records what was done."""
    from prance.evaluation.evaluate import write_json

    cfg, r = ctx.cfg, ctx.cfg.round_up
    ctx.path("round_up").mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"k": r.k, "model": prance_model(r.k)}
    if r.k:
        from prance.training.round_up import round_up_file

        record["calibration"] = round_up_file(ctx.path("finetune", "adaptive.pt"), r.k,
                                              ctx.path(prance_model(r.k)), holdout_limit=r.holdout_limit,
                                              data_dir=cfg.data_dir, seed=cfg.seed, batch_size=r.batch_size,
                                              device=cfg.device)
        ctx.say(f"round-up K={r.k}: holdout MACs {record['calibration']['holdout_macs_ratio']:.4f} of dense, "
                f"top-1 {record['calibration']['holdout_top1']:.2f}%")
    write_json(record, ctx.path("round_up", "round_up.json"))


# ----------------------------------------------------------------------------- measuring stages
def sweep(ctx: Context) -> None:
    """Static subnets of meta/best.pt (and the dense weights) on the holdout and the test split."""
    from prance.accounting import count_macs
    from prance.config import ViTConfig
    from prance.evaluation.sweep import sweep_checkpoint
    from prance.training.checkpoint import load_checkpoint

    cfg, s = ctx.cfg, ctx.cfg.sweep
    meta_best = ctx.path("meta", "best.pt")
    dense_gmacs = count_macs(ViTConfig.from_dict(load_checkpoint(meta_best)["config"])) / 1e9
    sweep_checkpoint(str(meta_best), ctx.path("sweep"), compare={"dense": str(ctx.path("dense", "best.pt"))},
                     data_dir=cfg.data_dir, holdout_limit=s.holdout_limit, test_limit=s.test_limit,
                     budget_gmacs=cfg.budget * dense_gmacs, count=s.count, seed=cfg.seed, batch_size=s.batch_size,
                     device=cfg.device)


def evaluate(ctx: Context) -> None:
    """PRANCE (rounded up when round_up.k > 0), the selector before fine-tuning, dense with EViT / ToMe at PRANCE's
    holdout MACs, and the static-plan fine-tune, on the test split (eval/*.json)."""
    from prance.adaptive import SELECTOR_KINDS
    from prance.bench.methods import match_evit_keep, match_tome_r
    from prance.evaluation.checkpoint import describe, evaluate_checkpoint, write_evaluation
    from prance.training.checkpoint import load_checkpoint, model_from_checkpoint

    cfg, e = ctx.cfg, ctx.cfg.evaluate
    ctx.path("eval").mkdir(parents=True, exist_ok=True)
    common = dict(split="test", data_dir=cfg.data_dir, limit=e.limit, seed=cfg.seed, batch_size=e.batch_size,
                  device=cfg.device)

    def run(name: str, checkpoint: Path, **how: Any) -> dict[str, Any]:
        result = evaluate_checkpoint(str(checkpoint), **how, **common)
        for line in describe(result):
            ctx.say(f"{name:>16}: {line.strip()}")
        write_evaluation(result, ctx.path("eval", f"{name}.json"))
        return result

    prance_path = ctx.path(prance_model(cfg.round_up.k))
    run("prance", prance_path)
    run("selector", ctx.path("selector", "adaptive.pt"))
    # EViT's keep rate and ToMe's r are settings, so they are matched on the holdout: to PRANCE's calibrated
    # mean MACs there (selector included), not to its MACs on the test images.
    target = load_checkpoint(prance_path, kind=SELECTOR_KINDS)["calibration"]["holdout_macs_ratio"]
    dense_best = ctx.path("dense", "best.pt")
    dense_model = model_from_checkpoint(load_checkpoint(dense_best, kind="dense"))
    run("dense", dense_best, baselines=[f"evit:{match_evit_keep(dense_model, target)}",
                                         f"tome:{match_tome_r(dense_model, target)}"])
    run("static_finetune", ctx.path("static_finetune", "best.pt"),
        plan=str(ctx.path("static_finetune", "plan.yaml")))


def bench(ctx: Context) -> None:
    """Wall-clock speed of PRANCE (deciding for itself) and the baselines at its MACs."""
    import shlex
    import sys

    import torch

    from prance.bench import (METHODS, MethodOptions, benchmark, format_table, load_images, load_model,
                              load_static_plan, write_outputs)

    cfg, b = ctx.cfg, ctx.cfg.bench
    checkpoint, out = ctx.path(prance_model(cfg.round_up.k)), ctx.path("bench")
    static_plan = ctx.path("static_finetune", "plan.yaml")  # the static subnet is the static-plan fine-tune's plan
    pool = b.pool or max(64, *b.batch_sizes)
    command = shlex.join(["prance", "bench", "--checkpoint", str(checkpoint), "--batch-sizes",
                          ",".join(map(str, b.batch_sizes)), "--runs", str(b.runs), "--warmup", str(b.warmup),
                          "--rounds", str(b.rounds), "--pool", str(pool), "--static-plan", str(static_plan),
                          "--seed", str(cfg.seed), "--device", cfg.device, "--out", str(out)]
                         + ([] if b.threads is None else ["--threads", str(b.threads)]))
    threads = torch.get_num_threads()
    if b.threads is not None:
        torch.set_num_threads(b.threads)
    try:
        subject = load_model(str(checkpoint))
        images = load_images(subject, None, cfg.data_dir, pool, cfg.seed)
        options = MethodOptions(static_plans=load_static_plan(static_plan, subject.model),
                                static_source=str(static_plan))
        result = benchmark(subject.adaptive, batch_sizes=b.batch_sizes, methods=METHODS, runs=b.runs,
                           warmup=b.warmup, rounds=b.rounds, images=images.tensor, images_label=images.label,
                           image_indices=images.indices, pool=pool, options=options, seed=cfg.seed,
                           model_label=subject.label,
                           command=command, log=lambda s: print(s, file=sys.stderr, flush=True), device=cfg.device)
    finally:
        torch.set_num_threads(threads)
    ctx.say(format_table(result))
    write_outputs(result, out)


def report(ctx: Context) -> None:
    """report.md, results.json and figures/ from the run's own files (what ``prance report RUN`` writes)."""
    from prance.evaluation.report import write_report

    write_report(ctx.run, device=ctx.cfg.device, overlays=ctx.cfg.report.overlays)


def remove_outputs(ctx: Context, stage: Stage) -> None:
    """Remove what an earlier attempt of ``stage`` left (rank 0): starting over means an empty folder."""
    if stage.folder is not None:
        shutil.rmtree(ctx.path(stage.folder), ignore_errors=True)


STAGE_LIST: tuple[Stage, ...] = (
    Stage("dense", dense, ("dense/best.pt",), "dense", True, "the dense ViT"),
    Stage("meta", meta, ("meta/best.pt",), "meta", True, "the meta-network (sandwich rule, distilled from dense)"),
    Stage("sweep", sweep, ("sweep/sweep.json",), "sweep", False, "static subnets, holdout and test"),
    Stage("selector", selector, ("selector/adaptive.pt",), "selector", True, "the selector (Result-to-Go PPO)"),
    Stage("finetune", finetune, ("finetune/adaptive.pt",), "finetune", True, "joint fine-tuning"),
    Stage("static_finetune", static_finetune, ("static_finetune/best.pt", "static_finetune/plan.yaml"),
          "static_finetune", True, "static-plan fine-tuning (the fair baseline)"),
    Stage("round_up", round_up, lambda cfg: ("round_up/round_up.json", prance_model(cfg.round_up.k)), "round_up",
          False, "the round-up speed lever (K representative decisions per stage; 0: off)"),
    Stage("evaluate", evaluate, tuple(f"eval/{n}.json" for n in ("prance", "selector", "dense", "static_finetune")),
          "eval", False, "the test split"),
    Stage("bench", bench, ("bench/bench.json",), "bench", False, "wall-clock speed at matched MACs"),
    Stage("report", report, ("report.md", "results.json"), None, False, "report.md and results.json"),
)

__all__ = ["Context", "STAGE_LIST", "Stage", "init_kind", "remove_outputs", "training_configs"]
