"""Cost of one Result-to-Go rollout relative to one plain forward of the same batch.

    taskset -c 1 .venv/bin/python scripts/bench_rollout.py --preset fmnist-tiny --batch 128
    taskset -c 1 .venv/bin/python scripts/bench_rollout.py --preset deit-small --batch 16 --runs 3

The policy deals out random per-image plans at half the dense MACs (a stand-in for a trained
selector, decisions as diverse as they can be). Two references for "one plain forward":
"decided" is the decided run alone (``engine.run(x, policy=policy)``), "dense" the full-size
forward (``engine.run(x)``). The rollout adds the completion of every step but the last at
full size: by exact MACs 1.9x the decided run and ~0.97x dense at half-MACs plans, so the
ratio to the decided run cannot reach 1.5x; the ratio to dense can. Calls alternate, one
thread, medians of ``--runs`` timed calls each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prance.engine import DynamicExecutor
from prance.bench import random_plans
from prance.model import create_model
from prance.plan import Plan
from prance.policy import StageState


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fmnist-tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target-macs", type=float, default=0.5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model(args.preset).eval()
    cfg = model.config
    x = torch.randn(args.batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    plans = random_plans(model, args.target_macs, args.batch, seed=0)

    def policy(state: StageState) -> Plan:
        return plans

    engine = DynamicExecutor(model)
    calls = {"decided": lambda: engine.run(x, policy=policy), "dense": lambda: engine.run(x),
             "rollout": lambda: engine.rollout(x, policy)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(args.warmup + args.runs):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    decided, dense, rollout = (statistics.median(times[k]) for k in ("decided", "dense", "rollout"))
    print(f"{args.preset} batch {args.batch}, {torch.get_num_threads()} thread(s), {cfg.num_stages - 1}-step rollout, "
          f"random per-image plans at {args.target_macs:g} x dense MACs: decided run {decided * 1e3:.1f} ms, "
          f"dense {dense * 1e3:.1f} ms, rollout {rollout * 1e3:.1f} ms; rollout / decided {rollout / decided:.2f}x, "
          f"rollout / dense {rollout / dense:.2f}x")


if __name__ == "__main__":
    main()
