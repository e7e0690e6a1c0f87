"""One selector for every budget: ``train-selector --budget-range`` on real images, then any budget of the range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from prance.adaptive import AdaptiveViT
from prance.cli import main
from prance.data.splits import Holdout, holdout_set
from prance.errors import PranceError
from prance.training.selector import SelectorTrainConfig, calibrate_range_on
from tests.conftest import cli_error
from tests.selector.test_adaptive import _adaptive
from tests.training.test_selector_training import _meta

pytestmark = pytest.mark.usefixtures("one_thread")

#: The micro meta-network's smallest subnet costs 0.43 of its MACs (its first stage always runs in full).
KNOTS = [0.5, 0.6, 0.7, 0.8, 0.9]


def test_calibrating_a_few_budgets_lands_the_mean_on_budgets_between_them():
    """The knob calibrated at 0.55, 0.7 and 0.85 and interpolated: the holdout mean meets budgets in between."""
    net, x = _adaptive(images=8, budget=0.7, budget_range=(0.55, 0.85))
    held = torch.randn(128, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    net(held[:1])
    record = calibrate_range_on(net.engine, net.selector, TensorDataset(held, torch.zeros(128, dtype=torch.long)),
                                [0.55, 0.7, 0.85], 0.7, float(net.last.dense_macs), torch.device("cpu"))
    assert [p["budget"] for p in record["points"]] == pytest.approx([0.55, 0.625, 0.7, 0.775, 0.85])
    deployed = AdaptiveViT(net.model, net.selector, calibration=record)  # the curve as a file would restore it
    for b in (0.625, 0.7, 0.775):
        deployed(held, budget=b)
        assert abs(float(deployed.last.macs_ratio.mean()) - b) <= 0.025 * b, b


@pytest.fixture(scope="module")
def ranged_run(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: str) -> Path:
    """A few PPO updates of a range selector on a micro meta-network, calibrated on 96 held-out images."""
    tmp = tmp_path_factory.mktemp("ranged")
    threads = torch.get_num_threads()
    assert main(["train-selector", "--meta", str(_meta(tmp)), "--budget-range", "0.5,0.9", "--budget-bins", "5",
                 "--updates", "3",
                 "--batch-size", "32", "--hidden", "16", "--limit", "128", "--holdout-limit", "96",
                 "--data-dir", fmnist_dir, "--threads", "1", "--out", str(tmp / "sel")]) == 0
    torch.set_num_threads(threads)
    return tmp / "sel"


def _holdout_images(fmnist_dir: str) -> torch.Tensor:
    held = holdout_set("fashion-mnist", img_size=28, in_chans=1, holdout=Holdout(), root=fmnist_dir, limit=96)
    return torch.stack([held[i][0] for i in range(len(held))])


@pytest.mark.slow
def test_each_budget_bin_logs_its_cost_and_lambda(ranged_run: Path):
    log = [json.loads(line) for line in (ranged_run / "log.jsonl").read_text().splitlines()]
    updates = [r for r in log if r["event"] == "update"]
    assert len(updates) == 3
    for knot in ("0.5", "0.6", "0.7", "0.8", "0.9"):
        assert {f"bins/lambda@{knot}", f"bins/macs_ratio@{knot}", f"bins/budget@{knot}"} <= set(updates[-1]), knot
    # Budgets are drawn per image from the range: each bin sees budgets around its knot.
    assert 0.5 <= updates[0]["bins/budget@0.5"] < 0.6 and 0.8 < updates[0]["bins/budget@0.9"] <= 0.9
    assert (ranged_run / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_knob_curve_meets_budgets_across_the_range_on_the_holdout(ranged_run: Path, fmnist_dir: str):
    net = AdaptiveViT.load(ranged_run / "adaptive.pt")
    assert net.budget_range == (0.5, 0.9) and net.budget == pytest.approx(0.7)
    curve = net.calibration["knob_curve"]
    assert curve["budgets"] == pytest.approx(KNOTS)
    x = _holdout_images(fmnist_dir)
    net(x[:1])
    dense = float(net.last.dense_macs)
    macs_at = {}
    for b in (0.55, 0.7, 0.85):  # between two knots, on one, between the top two
        net.set_budget(b)
        net(x)
        macs_at[b] = net.last.macs
        mean = float(net.last.macs.double().mean()) / dense
        # Loose: a selector of 3 updates decides alike for every image, so the knob flips them all at
        # once and the micro model's mean moves in steps of several %; the test above is the precise one.
        assert abs(mean - b) <= 0.05 * b, (b, mean)
        recorded = next(p for p in net.calibration["points"] if p["budget"] == pytest.approx(b))
        assert recorded["holdout_macs_ratio"] == pytest.approx(mean, abs=1e-9)
    # One batch of mixed budgets: every image costs what it cost in the batch of its budget alone.
    budget = torch.tensor([0.55, 0.7, 0.85], dtype=torch.float64).repeat(32)
    net(x, budget=budget)
    assert all(net.last.macs[i] == macs_at[float(budget[i])][i] for i in range(len(x)))


@pytest.mark.slow
def test_evaluate_at_a_budget_of_the_range_and_refuse_one_outside(ranged_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]):
    adaptive = ranged_run / "adaptive.pt"
    assert main(["evaluate", "--checkpoint", str(adaptive), "--split", "holdout", "--limit", "48", "--budget", "0.55",
                 "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["budget"] == 0.55 and result["budget_range"] == [0.5, 0.9]
    assert {r["budget"] for r in result["images"]} == {0.55}
    cli_error(capsys, ["evaluate", "--checkpoint", adaptive, "--budget", "0.4"], "budget 0.4", "0.5 to 0.9")
    cli_error(capsys, ["evaluate", "--checkpoint", ranged_run.parent / "meta.pt", "--budget", "0.5"],
              "--budget is for adaptive models")


def test_budget_range_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    meta = _meta(tmp_path)
    base = ["train-selector", "--meta", meta, "--out", tmp_path / "x"]
    cli_error(capsys, base + ["--budget-range", "0.8,0.3"], "low < high")
    cli_error(capsys, base + ["--budget-range", "0.3"], "--budget-range", "LOW,HIGH")
    cli_error(capsys, base + ["--budget-bins", "4"], "--budget-bins", "--budget-range")
    cli_error(capsys, base + ["--budget-range", "0.3,0.8", "--budget-bins", "1"], "2 budget bins")
    assert not (tmp_path / "x").exists()
    cli_error(capsys, base + ["--budget", "0.5", "--budget-range", "0.3,0.8"], "--budget-range: not allowed with")
    with pytest.raises(PranceError, match="budget range"):
        SelectorTrainConfig(budget=0.5, budget_range=(0.6, 0.9))
