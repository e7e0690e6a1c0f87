"""Named schedules of ``prance run``: the stage values ``--schedule NAME`` starts from.

``full`` is the recipe of the headline runs — the stage dataclasses' own defaults (dense 25
epochs at lr 1e-3 with 2 warm-up epochs, batch 64; meta-network 2 epochs down to keep 0.25;
12 static subnets; 300 selector updates; 1 epoch of joint and of static-plan fine-tuning;
decisions rounded up to K = 4 per stage; bench at batch 1 and 64). ``demo`` shows the whole
method on Fashion-MNIST in under half an hour on two idle cores of a 2 GHz Zen-1 EPYC, set-up
included: every stage runs on the full data sets, only shorter, on ``fmnist-micro`` (a quarter of
fmnist-tiny's MACs) whose dense model trains one epoch without augmentation at lr 4e-3 — in so short
a run crops and flips only slow learning down (20 000 images: holdout 73.4 % without them, 51.4 %
with; lr 2e-3 72.8 %, batch 32 at 1e-3 71.4 %; fmnist-tiny 70.3 % in 2.6 times the time).

Timed from a clean clone at commit 533436b (`make demo`, machine otherwise idle): 29.0 min — set-up
~3.4, dense 7.0, meta-network 4.5, sweep of 8 subnets 4.3, selector 2.2, fine-tune 1.9, static-plan
fine-tune 1.1, round-up on 500 held-out images 1.3, evaluation 1.8, bench 0.7, report 0.2. The
fmnist-tiny demo it replaces (2 augmented epochs, 12 subnets) took 72 min on that CPU and 19 min
51 s on a ~4x faster one.
"""

from __future__ import annotations

from typing import Any

DEMO: dict[str, dict[str, Any]] = {
    "dense": {"preset": "fmnist-micro", "epochs": 1, "lr": 4e-3, "warmup_epochs": 0.3, "augment": False,
              "val_limit": 2000},
    "meta": {"epochs": 1, "max_steps": 120, "batch_size": 64, "warmup_steps": 20, "augment": False, "val_limit": 1000},
    "sweep": {"count": 8, "holdout_limit": 1000},
    "selector": {"updates": 80, "holdout_limit": 1000, "checkpoint_every": 20},
    "finetune": {"max_steps": 100, "batch_size": 64, "warmup_steps": 10, "augment": False, "holdout_limit": 1000,
                 "checkpoint_every": 50},
    "static_finetune": {"static_candidates": 8},
    "round_up": {"holdout_limit": 500},
    "bench": {"runs": 16, "warmup": 4, "rounds": 4},
}

SCHEDULES: dict[str, dict[str, dict[str, Any]]] = {"full": {}, "demo": DEMO}

__all__ = ["DEMO", "SCHEDULES"]
