"""Named schedules of ``prance run``: the stage values ``--schedule NAME`` starts from.

``full`` is the recipe of the headline runs — the stage dataclasses' own defaults (dense 40
epochs at lr 1e-3 with 2 warm-up epochs, batch 64; meta-network 2 epochs down to keep 0.25;
12 static subnets; 300 selector updates; 1 epoch of joint fine-tuning, with one selector update
every 10 steps, and of static-plan fine-tuning; decisions rounded up to K = 4 per stage; bench at
batch 1 and 64). ``demo`` shows the whole method on Fashion-MNIST in under half an hour on two
idle cores of a 2 GHz Zen-1 EPYC, set-up included: every stage runs on the full data sets, only
shorter, on ``fmnist-micro`` (a quarter of
fmnist-tiny's MACs), and no stage augments. Its dense model trains one epoch at lr 4e-3 — in so
short a run crops and flips only slow learning down (20 000 images: holdout 73.4 % without them,
51.4 % with; lr 2e-3 72.8 %, batch 32 at 1e-3 71.4 %; fmnist-tiny 70.3 % in 2.6 times the time).
The meta-network's 120 steps and each fine-tune's 100 start from that unaugmented model and keep
more of it without them too (holdout, 1000 images: largest / smallest subnet 80.0 / 77.6 % against
79.0 / 76.8 % with them; joint fine-tuning 79.9 % against 78.5 %, both at 0.50 of the MACs).

Timed from a clean clone (`make demo`, machine otherwise idle): 6.0 min at 30e052f on 2 cores of an
AVX-512 Xeon (set-up included). On a 2 GHz Zen-1 EPYC at commit beec2d3: 25.5 min — set-up
~4.3, dense 5.9, meta-network 4.0, sweep of 8 subnets 4.1, selector 1.6, fine-tune 1.4, static-plan
fine-tune 0.8, round-up on 500 held-out images 1.0, evaluation 1.5, bench 0.7, report 0.2. The same
schedule with augmented meta-training and fine-tuning (commit 533436b) took 29.0 min, most of the
difference being this machine's spread: the dense stage, the same in both, took 5.9 min against 7.0.
The fmnist-tiny demo before it (2 augmented dense epochs, 12 subnets) took 72 min on that CPU and
19 min 51 s on a ~4x faster one.
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
