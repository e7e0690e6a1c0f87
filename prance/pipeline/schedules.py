"""Named schedules of ``prance run``: the stage values ``--schedule NAME`` starts from.

``full`` is the recipe of the headline runs — the stage dataclasses' own defaults (dense 25
epochs at lr 1e-3 with 2 warm-up epochs, batch 128; meta-network 2 epochs down to keep 0.25;
12 static subnets; 300 selector updates; 1 epoch of joint and of static-plan fine-tuning;
bench at batch 1 and 64). ``demo`` shows the whole method on Fashion-MNIST in at most about
half an hour on two idle CPU cores: every stage runs on the full data sets, only shorter.

Not yet timed on an idle machine. Estimated from the throughput of the headline runs on the
2-core development machine (fmnist-tiny: dense training ~200 img/s, the meta-network's sandwich
~40 img/s, a selector update of 128 images ~1.8 s, the adaptive model ~350 img/s at inference,
so a calibration of ~14 passes over 1000 held-out images ~40 s, joint fine-tuning ~70 img/s):

    dense 2 epochs (108k images + validation, ~9.5 min) · meta-network 150 steps of 64 (~4 min) ·
    sweep of 8 subnets on 2000 held-out and twice 10k test images (~1.5 min) · selector 100
    updates + calibration (~3.5 min) · joint fine-tuning 120 steps of 64 + calibration (~2.5 min)
    · static-plan fine-tuning (~1 min) · evaluation on the 10k test images (~1.5 min) · bench
    (~1 min) · report (~0.5 min): ~25 min.
"""

from __future__ import annotations

from typing import Any

DEMO: dict[str, dict[str, Any]] = {
    "dense": {"epochs": 2, "warmup_epochs": 0.3, "val_limit": 2000},
    "meta": {"epochs": 1, "max_steps": 150, "batch_size": 64, "warmup_steps": 20, "val_limit": 1000},
    "sweep": {"count": 8, "holdout_limit": 2000},
    "selector": {"updates": 100, "holdout_limit": 1000, "checkpoint_every": 20},
    "finetune": {"max_steps": 120, "batch_size": 64, "warmup_steps": 10, "holdout_limit": 1000,
                 "checkpoint_every": 50},
    "static_finetune": {"static_candidates": 8},
    "bench": {"runs": 8, "warmup": 2, "rounds": 2},
}

SCHEDULES: dict[str, dict[str, dict[str, Any]]] = {"full": {}, "demo": DEMO}

__all__ = ["DEMO", "SCHEDULES"]
