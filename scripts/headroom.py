"""How much could per-image decisions add on a meta-network? A measurement to take before blaming the selector.

    .venv/bin/python scripts/headroom.py --meta runs/reproduce/meta/best.pt --out runs/reproduce/headroom.json

A MACs-spread set of the sweep's candidate static subnets (``--plans`` of them) runs on a seeded subset of the
training images (``--train-images``) and on the whole holdout. For every image it records which subnets are right,
and the state the selector sees before its first decision (the cls features, and the paper's key means). Then, at
each budget and on the holdout:

* **best static**: the most accurate subnet within the budget, chosen on the holdout itself (so, if anything,
  flattered);
* **router**: one linear layer per state encoder learns P(subnet right | state) on the training images (binary
  cross-entropy, every subnet's label at once). Each held-out image runs the subnet that maximises
  P − μ · MACs; μ is set so that the mean MACs meet the budget, which reads no held-out label. It is a supervised
  stand-in for the selector, with far more signal per image (one label per subnet, where a PPO rollout samples
  one plan), that decides once, before stage 1;
* **oracle**: the cheapest right subnet of each image, which reads the labels: headroom no selector can reach.

If the router cannot beat the best static subnet, a selector that reads the same state is unlikely to; if it
can and the trained selector does not, the selector's training is what falls short. Only training and held-out
images are read, never the test split.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from prance.accounting import count_macs
from prance.data.splits import Holdout, holdout_set, training_splits
from prance.engine import DynamicExecutor
from prance.evaluation.evaluate import write_json
from prance.evaluation.sweep import candidate_subnets, spread_by_macs
from prance.selector.features import ENCODERS, FeatureNorm, raw_features
from prance.training.checkpoint import load_checkpoint, model_from_checkpoint


@torch.no_grad()
def record(engine: DynamicExecutor, plans: list, dataset, batch: int) -> dict[str, torch.Tensor]:
    """``right [P, N]`` (bool), ``macs [P, N]`` and each encoder's stage-1 state ``[N, F]`` of ``dataset``."""
    cfg = engine.model.config
    right, macs, states = [], [], {e: [] for e in ENCODERS}
    for x, y in DataLoader(dataset, batch_size=batch):
        state = engine.start(x)
        seen = engine.observe(state)
        for e in ENCODERS:
            states[e].append(raw_features(seen, e, cfg, 1.0))
        outcomes = [engine.finish(state, plan.expand(len(x))) for plan in plans]
        right.append(torch.stack([o.logits.argmax(-1) == y for o in outcomes]))
        macs.append(torch.stack([o.macs.double() for o in outcomes]))
    return {"right": torch.cat(right, 1), "macs": torch.cat(macs, 1), **{e: torch.cat(s) for e, s in states.items()}}


def fit_router(features: torch.Tensor, right: torch.Tensor, epochs: int, seed: int) -> torch.nn.Module:
    """A linear layer on ``features [N, F]``, standardised as the selector standardises its own, predicting
    every subnet's ``right [P, N]`` (BCE)."""
    torch.manual_seed(seed)
    norm = FeatureNorm(features.shape[1])
    norm.fit(features)
    net = torch.nn.Sequential(norm, torch.nn.Linear(features.shape[1], right.shape[0]))
    opt = torch.optim.Adam(net.parameters(), 3e-3, weight_decay=1e-4)
    target = right.T.float()
    for _ in range(epochs):
        for i in torch.randperm(len(features)).split(4096):
            opt.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(net(features[i]), target[i]).backward()
            opt.step()
    return net.eval()


def route(score: torch.Tensor, macs: torch.Tensor, budget: float) -> torch.Tensor:
    """Per image the subnet maximising ``score − μ · macs`` (``[P, N]``), μ bisected so the mean MACs meet
    ``budget``; returns the chosen subnet of each image ``[N]``."""
    cols = torch.arange(score.shape[1])
    lo, hi = 0.0, 1.0
    while macs[(score - hi * macs).argmax(0), cols].mean() > budget and hi < 1e6:
        hi *= 2
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if macs[(score - mid * macs).argmax(0), cols].mean() > budget else (lo, mid)
    return (score - hi * macs).argmax(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meta", required=True, help="meta-network checkpoint (train-meta's best.pt)")
    p.add_argument("--budgets", default="0.35,0.5,0.7", help="mean MACs as fractions of dense (default 0.35,0.5,0.7)")
    p.add_argument("--plans", type=int, default=48, help="static subnets, spread over the MACs range (default 48)")
    p.add_argument("--train-images", type=int, default=24000, help="training images the router learns from")
    p.add_argument("--epochs", type=int, default=400, help="router training epochs (default 400)")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None, help="where the data set lives (its default if not given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the readings as JSON here too")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    ckpt = load_checkpoint(args.meta)
    model = model_from_checkpoint(ckpt)
    cfg, split = model.config, ckpt["split"]
    holdout = Holdout.from_dict(split["holdout"])
    shape = {"img_size": cfg.img_size, "in_chans": cfg.in_chans, "root": args.data_dir}
    train = training_splits(split["data"], holdout=holdout, train_augment=False, limit=args.train_images,
                            seed=args.seed, **shape).train
    held = holdout_set(split["data"], holdout=holdout, **shape)

    candidates = candidate_subnets(cfg, model.space, seed=args.seed)
    macs_of = {name: count_macs(cfg, plan) for name, plan in candidates}
    names = spread_by_macs([name for name, _ in candidates], macs_of, args.plans)
    names.sort(key=lambda n: macs_of[n])
    by_name = dict(candidates)
    plans = [by_name[n] for n in names]
    engine = DynamicExecutor(model)
    print(f"{len(plans)} static subnets on {len(train)} training and {len(held)} held-out images", flush=True)
    on_train, on_held = record(engine, plans, train, args.batch), record(engine, plans, held, args.batch)

    dense = float(count_macs(cfg))
    right, macs = on_held["right"], on_held["macs"] / dense
    accuracy, mean_macs = 100 * right.float().mean(1), macs.mean(1)
    cols = torch.arange(right.shape[1])
    cheapest = torch.where(right, macs, torch.full_like(macs, float("inf"))).min(0).values
    solvable = torch.isfinite(cheapest)
    oracle = {"top1": 100 * float(solvable.float().mean()),
              "macs_ratio": float(torch.where(solvable, cheapest, macs.min(0).values).mean())}
    routers = {e: fit_router(on_train[e], on_train["right"], args.epochs, args.seed) for e in ENCODERS}
    with torch.no_grad():
        predicted = {e: net(on_held[e]).sigmoid().T.double() for e, net in routers.items()}

    readings = []
    for budget in (float(b) for b in args.budgets.split(",")):
        fits = (mean_macs <= budget + 1e-9).nonzero().flatten()
        row: dict = {"budget": budget}
        if len(fits):
            best = fits[accuracy[fits].argmax()]
            row["best_static"] = {"name": names[best], "top1": float(accuracy[best]),
                                  "macs_ratio": float(mean_macs[best])}
        for e, score in predicted.items():
            chosen = route(score, macs, budget)
            row[f"router_{e}"] = {"top1": 100 * float(right[chosen, cols].float().mean()),
                                  "macs_ratio": float(macs[chosen, cols].mean()),
                                  "subnets_used": len(set(chosen.tolist()))}
        readings.append(row)
    result = {"meta": args.meta, "plans": names, "train_images": len(train), "holdout_images": len(held),
              "max_subnet_top1": float(accuracy[names.index("max")]) if "max" in names else None,
              "oracle": oracle, "budgets": readings, "minutes": (time.time() - start) / 60}

    print(f"oracle (reads the labels): {oracle['top1']:.2f} % at {oracle['macs_ratio']:.3f} of dense MACs")
    for row in readings:
        parts = [f"budget {row['budget']:g}:"]
        if "best_static" in row:
            b = row["best_static"]
            parts.append(f"best static {b['top1']:.2f} % ({b['name']}, {b['macs_ratio']:.3f})")
        parts += [f"router[{e}] {row[f'router_{e}']['top1']:.2f} %" for e in ENCODERS]
        print("  ".join(parts))
    if args.out:
        write_json(result, args.out)


if __name__ == "__main__":
    main()
