"""``prance round-up``: K representatives onto a trained adaptive model, the knob calibrated again on the holdout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from prance.adaptive import AdaptiveViT
from prance.cli import main
from prance.data.splits import Holdout, holdout_set
from prance.selector.representatives import stage_decisions
from tests.conftest import cli_error
from tests.training.test_selector_training import _meta

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def _train_argv(meta: Path, out: Path, fmnist_dir: str, *extra: str) -> list[str]:
    """train-selector with two of the levers (one MLP ratio per stage, keep ratios on a 0.25 grid), budget 0.6."""
    return ["train-selector", "--meta", str(meta), "--budget", "0.6", "--updates", "3", "--batch-size", "16",
            "--hidden", "16", "--limit", "128", "--holdout-limit", "64", "--data-dir", fmnist_dir, "--threads", "1",
            "--mlp-per-stage", "--keep-grid", "0.25", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: str) -> Path:
    """A selector trained for a few updates on real images, its adaptive.pt (next to meta.pt)."""
    tmp = tmp_path_factory.mktemp("selector")
    torch.set_num_threads(1)
    assert main(_train_argv(_meta(tmp), tmp / "sel", fmnist_dir)) == 0
    return tmp / "sel" / "adaptive.pt"


def test_train_selector_levers_reach_the_written_model_and_round_up_recalibrates_it(trained: Path, tmp_path: Path,
                                                                                  fmnist_dir: str):
    plain = AdaptiveViT.load(trained)
    assert plain.selector.cfg.mlp_per_stage and plain.selector.cfg.keep_grid == 0.25
    assert plain.representatives is None
    # --round-up on the finished run (a resume that only calibrates again) writes a rounded, recalibrated model.
    run = tmp_path / "sel"
    shutil.copytree(trained.parent, run)
    assert main(_train_argv(trained.parent.parent / "meta.pt", run, fmnist_dir, "--resume", "--round-up", "2")) == 0
    rounded = AdaptiveViT.load(run / "adaptive.pt")
    assert rounded.representatives.k == 2 and rounded.calibration["round_up"] == 2
    assert abs(rounded.calibration["holdout_macs_ratio"] - 0.6) <= 0.05 * 0.6, rounded.calibration
    held = holdout_set("fashion-mnist", img_size=28, in_chans=1, holdout=Holdout(), root=fmnist_dir, limit=64)
    rounded(torch.stack([held[i][0] for i in range(len(held))]))
    plan, cfg = rounded.last.plan, rounded.model.config
    k = cfg.stage_depth
    for s in range(1, cfg.num_stages):
        assert len(stage_decisions(cfg, plan, s).unique(dim=0)) <= 2
        assert bool((plan.mlp_ratios[:, s * k : (s + 1) * k] == plan.mlp_ratios[:, s * k : s * k + 1]).all())
        assert set(plan.merge_keep[:, s].tolist()) <= {0.25, 0.5, 0.75, 1.0}


def test_round_up_writes_a_recalibrated_model_whose_rounded_mean_lands_on_the_budget(trained: Path, tmp_path: Path,
                                                                                     fmnist_dir: str):
    before = trained.read_bytes()
    out = tmp_path / "k3" / "adaptive-k3.pt"
    assert main(["round-up", "--checkpoint", str(trained), "--k", "3", "--holdout-limit", "64", "--threads", "1",
                 "--out", str(out)]) == 0
    assert trained.read_bytes() == before  # the input is left as it is
    rounded = AdaptiveViT.load(out)
    cal = rounded.calibration
    assert cal["round_up"] == 3 and rounded.representatives.k == 3 and "knob" in cal["without_round_up"]
    # Recompute the holdout mean independently: the same 64 held-out images through the loaded model.
    held = holdout_set("fashion-mnist", img_size=28, in_chans=1, holdout=Holdout(), root=fmnist_dir, limit=64)
    x = torch.stack([held[i][0] for i in range(len(held))])
    rounded(x)
    ratio = float(rounded.last.macs.double().mean()) / rounded.last.dense_macs
    assert ratio == pytest.approx(cal["holdout_macs_ratio"], abs=1e-9)
    assert abs(ratio - 0.6) <= 0.05 * 0.6, cal  # K = 3 moves the mean in coarse steps; still near the budget
    # The lever's cost is recorded paired: the model without rounding on the same 64 images.
    plain, labels = AdaptiveViT.load(trained), torch.as_tensor([int(held[i][1]) for i in range(len(held))])
    top1 = 100.0 * float((plain(x).argmax(-1) == labels).double().mean())
    same = cal["without_round_up"]["same_images"]
    assert same["holdout_images"] == 64 and same["holdout_top1"] == pytest.approx(top1)
    assert same["holdout_macs_ratio"] == pytest.approx(float(plain.last.macs.double().mean()) / plain.last.dense_macs)
    cfg = rounded.model.config
    for s in range(1, cfg.num_stages):
        assert len(stage_decisions(cfg, rounded.last.plan, s).unique(dim=0)) <= 3
    # `prance evaluate` runs the rounded model (its per-image decisions are the representatives).
    assert main(["evaluate", "--checkpoint", str(out), "--limit", "16", "--out", str(tmp_path / "eval.json")]) == 0
    images = json.loads((tmp_path / "eval.json").read_text())["images"]
    table = rounded.representatives.stages[1]
    assert all(any(row[0] == r["widths"][1] for row in table.tolist()) for r in images)


def test_round_up_refuses_bad_requests_in_one_line(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cli_error(capsys, ["round-up", "--checkpoint", trained, "--k", "0", "--out", tmp_path / "a.pt"], "--k")
    cli_error(capsys, ["round-up", "--checkpoint", trained, "--k", "2", "--out", trained], "new file")
    (tmp_path / "taken.pt").write_bytes(b"x")
    cli_error(capsys, ["round-up", "--checkpoint", trained, "--k", "2", "--out", tmp_path / "taken.pt"], "--overwrite")
    cli_error(capsys, ["round-up", "--checkpoint", trained.parent / "last.pt", "--k", "2", "--out",
                       tmp_path / "new" / "b.pt"], "adaptive.pt")
    assert not (tmp_path / "new").exists() and not (tmp_path / "a.pt").exists()
