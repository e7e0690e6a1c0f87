"""The settings of one ``prance run``: the run's own (data, token mode, budget, ...) and one dataclass per stage.

The dataclass defaults are the "full" recipe of the headline runs (Fashion-MNIST, ``fmnist-tiny``);
:mod:`prance.pipeline.resolve` builds a run's settings from them, a schedule, a YAML file and flags.

A stage's *settings* (:func:`stage_settings`) are what its results depend on: its own fields
and the run's fields it reads, as one flat mapping with dotted names (``dense.epochs``,
``budget``). ``RUN/stages.json`` records them, so a later run can tell which stage a changed
setting invalidates. Where things run (``device``, ``threads``), where the data lives
(``data_dir``) and how often checkpoints are written cannot change results and may differ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

DATASETS = ("fashion-mnist", "folder")
STAGES = ("dense", "meta", "sweep", "selector", "finetune", "static_finetune", "round_up", "evaluate", "bench",
          "report")

#: Settings that cannot change results: they may differ when a run is continued.
UNCOMPARED = ("device", "threads", "data_dir", "checkpoint_every")
# Settings added after runs were recorded without them, with the value those runs had in effect: a stage
# recorded before ``dense.augment`` existed trained with augmentation, and resumes as such.
ADDED_SETTINGS: dict[str, Any] = {"dense.augment": True, "meta.augment": True, "finetune.augment": True,
                                  "static_finetune.augment": True, "static_finetune.static_slack": 1.0,
                                  "selector.reward": "outcome"}


# ----------------------------------------------------------------------------- the stages
@dataclass
class DenseStage:
    """``prance train-dense`` (skipped for an ``init`` of the run's classes: then dense/best.pt is that model)."""

    preset: str = "fmnist-tiny"  # model shape without init (see prance.model.PRESETS)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # other ViTConfig fields (e.g. tests' toy shapes)
    img_size: int | None = None  # input size (None: the preset's; a folder's images up to FOLDER_MAX_SIZE)
    epochs: int = 40  # fmnist-tiny: 91.3 % test (holdout-chosen epoch 39); 25 epochs reached 89.7 %
    batch_size: int = 64  # per image as fast as 128 on 2 cores, twice the steps (see DenseTrainConfig)
    lr: float = 1e-3
    warmup_epochs: float = 2.0
    augment: bool = True  # random crops and flips of the training images (see DenseTrainConfig)
    holdout: float = 0.1  # fraction of the training split every stage holds out for its choices
    holdout_seed: int = 0
    limit: int | None = None  # train on a random subset of this many images
    val_limit: int | None = None  # choose the best epoch on at most this many held-out images
    checkpoint_every: int = 0  # also write last.pt every N steps (0: at epoch ends)


@dataclass
class MetaStage:
    """``prance train-meta --init dense/best.pt --teacher init --token-mode MODE``."""

    epochs: int = 2
    max_steps: int | None = None  # stop after this many steps (None: all epochs)
    batch_size: int = 128
    lr: float = 2.5e-4
    warmup_steps: int = 100
    num_random: int = 2  # random subnets per step besides the largest and smallest
    augment: bool = True  # random crops and flips of the training images (see MetaTrainConfig)
    min_keep: float = 0.25  # smallest keep ratio per stage the network is trained for
    keep_grid: float = 0.0  # keep ratios on multiples of this step (0: continuous)
    widths: list[int] | None = None  # search-space widths (None: the model's default)
    mlp_ratios: list[float] | None = None  # search-space MLP ratios (None: the model's default)
    limit: int | None = None
    val_limit: int | None = None
    checkpoint_every: int = 0


@dataclass
class SweepStage:
    """``prance sweep`` of meta/best.pt with ``--compare dense=dense/best.pt`` (static subnets, holdout and test)."""

    count: int = 12  # static subnets, spread over the MACs range
    holdout_limit: int | None = None
    test_limit: int | None = None
    batch_size: int = 256


@dataclass
class SelectorStage:
    """``prance train-selector --meta meta/best.pt --budget BUDGET`` (Result-to-Go PPO, then holdout calibration)."""

    updates: int = 300
    batch_size: int = 128
    encoder: str = "keys"  # state: "keys" (the paper's) or "cls"
    hidden: int = 128
    mlp_per_stage: bool = False
    keep_grid: float = 0.0  # the selector's keep ratios raised to multiples of this (0: the meta-network's grid)
    keep_penalty: float = 0.01
    reward: str = "gain"  # "gain" (each step's change of its Result-to-Go outcome) or "outcome" (the paper's)
    lr: float = 3e-4
    limit: int | None = None
    holdout_limit: int | None = None  # calibrate on at most this many held-out images
    checkpoint_every: int = 25


@dataclass
class FinetuneStage:
    """``prance finetune --adaptive selector/adaptive.pt --teacher dense/best.pt`` (joint fine-tuning)."""

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-4
    warmup_steps: int = 50
    distill_weight: float = 0.5
    # One PPO update of the selector every N steps (0: the selector stays fixed). 10: on the full schedule's
    # 40-epoch merge run at budget 0.5 (`make levers`), holdout top-1 90.57 % against 90.52 % with the selector
    # fixed, and with round-up to K = 4 after it 90.53 % against 90.08 %; about 13 % more fine-tuning time.
    alternate: int = 10
    augment: bool = True  # random crops and flips of the training images
    limit: int | None = None
    holdout_limit: int | None = None
    checkpoint_every: int = 0


@dataclass
class StaticFinetuneStage:
    """``prance finetune ... --static-plan auto``: the fair baseline. Unset (None) values are the joint
    fine-tune's, so both get the same schedule unless told otherwise."""

    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    distill_weight: float | None = None
    augment: bool | None = None
    limit: int | None = None
    holdout_limit: int | None = None
    static_candidates: int = 16  # how many of the dearest fitting static subnets the holdout compares
    static_slack: float = 0.01  # ... among those at most this fraction of the dense MACs below PRANCE's
    checkpoint_every: int | None = None


@dataclass
class RoundUpStage:
    """``prance round-up --checkpoint finetune/adaptive.pt --k K``: the speed lever that rounds every image's stage
    decisions up to one of K representatives (learned on the holdout, the budget calibrated again), so a batch
    holds at most K distinct decisions per stage, and never gives an image less compute than its selector asked
    for. 0: off, PRANCE is finetune/adaptive.pt itself."""

    # 4: the only speed lever that bought time on the 40-epoch merge run at budget 0.5 (`make levers`, one bench
    # sitting): 1.11-1.13x dense at batch 64 against 0.93-0.98x without it, in every variant but one MLP ratio per
    # stage (0.99x both); K = 8: 0.94x. After alternating fine-tuning it cost 0.04 pt of holdout top-1.
    k: int = 4
    holdout_limit: int | None = None  # learn and calibrate on at most this many held-out images
    batch_size: int = 256


@dataclass
class EvaluateStage:
    """``prance evaluate`` of PRANCE, the selector before fine-tuning, dense with EViT/ToMe at PRANCE's MACs and
    the static-plan fine-tune, on the test split."""

    batch_size: int = 256
    limit: int | None = None  # at most this many test images (None: the whole test split)


@dataclass
class BenchStage:
    """``prance bench --checkpoint finetune/adaptive.pt``: wall-clock speed of PRANCE and the baselines."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    runs: int = 20
    warmup: int = 5
    rounds: int = 4
    pool: int | None = None  # test images cycled through (None: max(64, largest batch))
    threads: int | None = 1  # torch threads while timing (one: ratios comparable across machines)


@dataclass
class ReportStage:
    """``prance report RUN``."""

    overlays: int = 6  # sample images with the selector's decisions drawn on them


# ----------------------------------------------------------------------------- the run
@dataclass
class RunConfig:
    """Every setting of a ``prance run`` (written to RUN/config.yaml)."""

    data: str = "fashion-mnist"  # "fashion-mnist" or "folder" (an ImageNet-layout root/{train,val} at data_dir)
    data_dir: str | None = None  # the folder's root, or where the Fashion-MNIST IDX files are (None: the default)
    init: str | None = None  # a local timm/DeiT file (timm:PATH) or a prance dense checkpoint to start from
    mode: str = "merge"  # token reduction: prune, merge or prune_merge
    budget: float = 0.5  # mean MACs per image as a fraction of the dense model's, selector included
    schedule: str = "full"  # named schedule the stage values started from (prance.pipeline.schedules)
    limit: int | None = None  # at most this many images of each split in every stage (quick runs)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    dense: DenseStage = field(default_factory=DenseStage)
    meta: MetaStage = field(default_factory=MetaStage)
    sweep: SweepStage = field(default_factory=SweepStage)
    selector: SelectorStage = field(default_factory=SelectorStage)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    static_finetune: StaticFinetuneStage = field(default_factory=StaticFinetuneStage)
    round_up: RoundUpStage = field(default_factory=RoundUpStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    bench: BenchStage = field(default_factory=BenchStage)
    report: ReportStage = field(default_factory=ReportStage)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The run's own fields (not stage mappings).
RUN_FIELDS = tuple(f.name for f in fields(RunConfig) if f.name not in STAGES)

#: The run's fields each stage's results depend on (besides its own).
_READS = {"dense": ("data", "init", "seed"), "meta": ("mode", "seed"), "sweep": ("budget",),
          "selector": ("budget", "seed"), "finetune": ("seed",), "static_finetune": ("seed",), "round_up": ("seed",),
          "evaluate": ("seed",), "bench": ("seed",), "report": ()}


#: The run files that can be PRANCE: the fine-tuned model, and the round-up stage's when that lever is on.
PRANCE_MODELS = ("finetune/adaptive.pt", "round_up/adaptive.pt")


def prance_model(round_up_k: int) -> str:
    """The run file that is PRANCE (evaluated, timed, drawn) when the round-up stage keeps ``round_up_k``."""
    return PRANCE_MODELS[bool(round_up_k)]


def stage_settings(cfg: RunConfig, stage: str) -> dict[str, Any]:
    """What ``stage``'s results depend on, flat with dotted names (``dense.epochs``, ``data``)."""
    own = {f"{stage}.{k}": v for k, v in asdict(getattr(cfg, stage)).items()}
    return {**{k: getattr(cfg, k) for k in _READS[stage]}, **own}


def compared(name: str) -> bool:
    """Whether a changed value of setting ``name`` (dotted) invalidates a finished stage."""
    return name.rsplit(".", 1)[-1] not in UNCOMPARED


def recorded_setting(settings: Mapping[str, Any], name: str) -> Any:
    """The value of ``name`` in a stage's recorded ``settings``, also for records older than the setting."""
    return settings.get(name, ADDED_SETTINGS.get(name))


def to_yaml(cfg: RunConfig) -> str:
    """``cfg`` as the text of RUN/config.yaml (stages in pipeline order)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = ["ADDED_SETTINGS", "DATASETS", "PRANCE_MODELS", "RUN_FIELDS", "RunConfig", "STAGES", "UNCOMPARED", "compared",
           "prance_model", "recorded_setting", "stage_settings", "to_yaml"]
