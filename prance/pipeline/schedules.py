"""Named schedules of ``prance run``: the stage values ``--schedule NAME`` starts from.

``full`` is the recipe of the headline runs — the stage dataclasses' own defaults (dense 25
epochs at lr 1e-3 with 2 warm-up epochs, batch 64; meta-network 2 epochs down to keep 0.25;
12 static subnets; 300 selector updates; 1 epoch of joint and of static-plan fine-tuning;
decisions rounded up to K = 4 per stage; bench at batch 1 and 64). ``demo`` shows the whole
method on Fashion-MNIST in at most about half an hour on two idle CPU cores: every stage runs on
the full data sets, only shorter.

Timed at commit e6a7fb1 on two idle cores (`make demo` from a clean clone): 19 min 51 s in all,
set-up included — dense 7.4 min, meta 2.3, sweep of 12 subnets 3.7, selector 1.0, fine-tune 1.0,
static-plan fine-tune 0.5, round-up to K = 4 on 1000 held-out images 1.2, evaluation 1.0, bench
0.4, report 0.1. On a 2 GHz Zen-1 EPYC (about 4× slower: dense training ~55 img/s) the same
demo took about 72 min at commit 98cddd0 (dense 26 min, sweep 12). Planned beforehand from the headline runs
(fmnist-tiny on the 2-core development machine: dense training ~200 img/s, the meta-network's
sandwich ~35 img/s, a selector update of 128 images ~1.8 s, the adaptive model ~400 img/s at
inference) and from a demo run on a
slice of the data on the same machine under a load about 7 times slower, stage by stage:

    dense 2 epochs (108k images + validation, ~9.5 min) · meta-network 120 steps of 64 (~4 min) ·
    sweep of 6 (now 12) subnets on 1000 held-out and twice 10k test images (~2.5 min) · selector 80 updates
    + calibration (~3.5 min; calibrating takes up to 30 passes over the 1000 held-out images) ·
    joint fine-tuning 100 steps of 64 + calibration (~3 min) · static-plan fine-tuning (~1.5 min) ·
    evaluation on the 10k test images (~1.5 min) · bench (~0.5 min) · report: ~26 min.
"""

from __future__ import annotations

from typing import Any

DEMO: dict[str, dict[str, Any]] = {
    "dense": {"preset": "fmnist-micro", "epochs": 1, "lr": 4e-3, "warmup_epochs": 0.3, "augment": False,
              "val_limit": 2000},
    "meta": {"epochs": 1, "max_steps": 120, "batch_size": 64, "warmup_steps": 20, "val_limit": 1000},
    "sweep": {"count": 8, "holdout_limit": 1000},
    "selector": {"updates": 80, "holdout_limit": 1000, "checkpoint_every": 20},
    "finetune": {"max_steps": 100, "batch_size": 64, "warmup_steps": 10, "holdout_limit": 1000,
                 "checkpoint_every": 50},
    "static_finetune": {"static_candidates": 8},
    "round_up": {"holdout_limit": 500},
    "bench": {"runs": 16, "warmup": 4, "rounds": 4},
}

SCHEDULES: dict[str, dict[str, dict[str, Any]]] = {"full": {}, "demo": DEMO}

__all__ = ["DEMO", "SCHEDULES"]
