"""Static-subnet sweep: MACs spread, choice on held-out training images only, outputs usable downstream."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from prance import PranceError, count_macs, create_model
from prance.data.splits import Holdout
from prance.evaluation import sweep as sweep_mod
from prance.evaluation.evaluate import plans_from_spec
from prance.evaluation.sweep import pick_for_budget, run_sweep, spread_subnets, sweep_data
from prance.training import meta as meta_mod
from prance.training.meta import MetaRunConfig, MetaTrainConfig, run_train_meta

MICRO = dict(embed_dim=32, depth=4, stage_depth=1, num_heads=2)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_spread_covers_the_macs_range_with_distinct_subnets():
    model = create_model("fmnist-tiny")
    subnets = spread_subnets(model.config, model.space, count=12)
    macs = [count_macs(model, p) for _, p in subnets]
    assert len(subnets) == 12 and len({p.key(0) for _, p in subnets}) == 12
    assert subnets[0][0] == "min" and subnets[-1][0] == "max" and macs == sorted(macs)
    gaps = [b - a for a, b in zip(macs, macs[1:])]
    assert max(gaps) < 0.25 * (macs[-1] - macs[0])  # no big hole in the curve
    with pytest.raises(PranceError, match="at least 2"):
        spread_subnets(model.config, model.space, count=1)


def test_pick_for_budget_takes_the_most_accurate_subnet_that_fits():
    rows = [{"name": "a", "gmacs": 1.0, "holdout_top1": 70.0}, {"name": "b", "gmacs": 2.0, "holdout_top1": 80.0},
            {"name": "c", "gmacs": 3.0, "holdout_top1": 90.0}, {"name": "d", "gmacs": 1.5, "holdout_top1": 80.0}]
    assert pick_for_budget(rows, 2.5)["name"] == "d"  # tie on accuracy: fewer MACs
    assert pick_for_budget(rows, 3.0)["name"] == "c"
    with pytest.raises(PranceError, match="smallest needs 1"):
        pick_for_budget(rows, 0.5)


def test_sweep_chooses_on_the_images_meta_training_held_out_never_on_the_test_split(
    tmp_path: Path, fmnist_dir: str, monkeypatch: pytest.MonkeyPatch
):
    # Which images did meta-training use? Capture its training set.
    captured = {}
    real_train_meta = meta_mod.train_meta

    def spy(model, train_set, out_dir, cfg, **kw):
        captured["train"] = train_set
        return real_train_meta(model, train_set, out_dir, cfg, **kw)

    monkeypatch.setattr(meta_mod, "train_meta", spy)
    run = MetaRunConfig(preset="fmnist-micro", model_overrides=MICRO, data_dir=fmnist_dir, limit=400, holdout=0.25)
    run_train_meta(run, MetaTrainConfig(epochs=1, batch_size=100, max_steps=1, warmup_steps=1), tmp_path / "m",
                   progress=False)
    model = create_model("fmnist-micro", **MICRO)
    data = sweep_data(model.config, data_dir=fmnist_dir, holdout=Holdout(0.25), holdout_limit=100, test_limit=50)
    held, trained = set(data.holdout._index.tolist()), set(captured["train"]._index.tolist())
    assert len(held) == 100 and len(trained) == 400 and not held & trained

    # Fake accuracies: on held-out images subnet A (the cheapest over the budget's half) wins,
    # on the test split the largest subnet within budget does. The choice must follow the holdout.
    subnets = spread_subnets(model.config, model.space, 10)
    budget = count_macs(model, subnets[-2][1]) / 1e9
    favourite_holdout, favourite_test = subnets[2][0], subnets[-2][0]
    seen_splits = []

    def fake_evaluate(m, loader, plan, **kw):
        split = loader.dataset.info.split
        seen_splits.append((split, len(loader.dataset), plan.key(0)))
        name = next(n for n, p in subnets if p.key(0) == plan.key(0))
        top1 = 99.0 if name == (favourite_holdout if split == "train" else favourite_test) else 10.0
        macs = count_macs(m, plan)
        return {"top1": top1, "macs": macs, "gmacs": macs / 1e9, "params_m": 0.1}

    monkeypatch.setattr(sweep_mod, "evaluate", fake_evaluate)
    result = run_sweep(model, data, tmp_path / "s", budget_gmacs=budget, count=10)
    best = result["best"]
    assert best["name"] == favourite_holdout and best["gmacs"] <= budget
    assert best["holdout_top1"] == 99.0 and best["test_top1"] == 10.0  # the test split disagreed and was ignored
    assert {s for s, n, _ in seen_splits} == {"train", "test"}
    assert all(n == 100 for s, n, _ in seen_splits if s == "train")


def test_sweep_writes_curve_files_and_a_plan_evaluate_can_load(tmp_path: Path, fmnist_dir: str):
    torch.manual_seed(0)
    model = create_model("fmnist-micro", **MICRO)
    dense = create_model("fmnist-micro", **MICRO)
    data = sweep_data(model.config, data_dir=fmnist_dir, holdout_limit=40, test_limit=40)
    result = run_sweep(model, data, tmp_path, budget_gmacs=0.002, count=10, compare={"dense": dense})
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert len(rows) == 10 and all(r["gmacs"] > 0 and 0 <= r["test_top1"] <= 100 for r in rows)
    assert all("test_top1_dense" in r for r in rows)
    with open(tmp_path / "sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 10
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    [(name, plan)] = plans_from_spec(str(tmp_path / "best_plan.yaml"), model.config, model.space)
    assert name == result["best"]["name"] and plan.to_dict() == result["best"]["plan"]
    assert count_macs(model, plan) / 1e9 <= 0.002


def test_cli_pipeline_train_meta_then_sweep_then_evaluate_the_chosen_plan(
    tmp_path: Path, fmnist_dir: str, capsys: pytest.CaptureFixture[str]
):
    from prance.cli import main
    from prance.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "dense.pt", create_model("fmnist-micro", **MICRO), "dense")
    common = ["--data-dir", fmnist_dir, "--threads", "1"]
    assert main(["train-meta", "--init", str(tmp_path / "dense.pt"), "--teacher", "init", "--limit", "300",
                 "--holdout", "0.2", "--val-limit", "32", "--batch-size", "60", "--epochs", "1", "--warmup-steps",
                 "1", "--out", str(tmp_path / "meta"), *common]) == 0
    assert "meta training in" in capsys.readouterr().out
    assert main(["sweep", "--checkpoint", str(tmp_path / "meta" / "last.pt"), "--budget-gmacs", "0.0025",
                 "--count", "10", "--holdout-limit", "30", "--test-limit", "30", "--compare",
                 f"dense={tmp_path / 'dense.pt'}", "--out", str(tmp_path / "sweep"), *common]) == 0
    printed = capsys.readouterr().out
    assert "best static subnet within 0.0025 GMACs" in printed and "dense test top-1" in printed
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep["holdout"] == 0.2 and sweep["holdout_images"] == 30  # the meta run's holdout, read from its checkpoint
    assert main(["evaluate", "--checkpoint", str(tmp_path / "meta" / "last.pt"), "--plan",
                 str(tmp_path / "sweep" / "best_plan.yaml"), "--limit", "30", *common]) == 0
    assert sweep["best"]["name"] in capsys.readouterr().out
    # A user error is one line and exit code 2.
    assert main(["sweep", "--checkpoint", str(tmp_path / "meta" / "last.pt"), "--budget-gmacs", "0.0001",
                 "--no-test", "--holdout-limit", "10", "--out", str(tmp_path / "s2"), *common]) == 2
    assert "raise --budget-gmacs" in capsys.readouterr().err
