"""prance bench of an adaptive model: PRANCE is timed on the selector's own decisions, the baselines at
its mean MACs. Checked against the adaptive model called directly; no test asserts a timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prance import create_model
from prance.adaptive import AdaptiveViT
from prance.bench import benchmark, format_table
from prance.bench.plans import differing_decisions
from prance.cli import main
from prance.data.splits import final_test_set
from prance.engine import DynamicExecutor
from prance.plan import Plan
from prance.selector.selector import Selector, SelectorConfig
from tests.conftest import cli_error

pytestmark = pytest.mark.usefixtures("one_thread")

SPLIT = {"data": "fashion-mnist"}


def _adaptive(images: torch.Tensor) -> AdaptiveViT:
    """fmnist-micro cut to 4 one-block stages, with an untrained selector fitted to ``images``' states;
    its actor is scaled up so that its decisions differ from image to image."""
    torch.manual_seed(0)
    model = create_model("fmnist-micro", depth=4, stage_depth=1).eval()
    selector = Selector(model.config, model.space, SelectorConfig(hidden=16, budget=0.5))
    with torch.no_grad():
        for p in selector.agent.actor.parameters():
            p.mul_(30.0)
    seen = []
    DynamicExecutor(model).run(images, policy=lambda s: (seen.append(s), selector(s))[1], budget=0.5)
    selector.fit_features(seen)
    return AdaptiveViT(model, selector.eval(), split=SPLIT)


def _fmnist(root: str, n: int) -> torch.Tensor:
    ds = final_test_set("fashion-mnist", img_size=28, in_chans=1, root=root, limit=n, seed=1)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _alone(net: AdaptiveViT, images: torch.Tensor) -> list:
    """What the adaptive model decides and costs for each image, called on it alone."""
    out = []
    with torch.inference_mode():
        for x in images:
            net(x[None])
            out.append((net.last.plan.to_dict(0), int(net.last.macs[0])))
    return out


def _same_plan(recorded: dict, want: dict) -> bool:
    """Equal choices; keep ratios equal up to the rounding of a batched matrix product in the selector's
    features (what runs, the token counts, is compared through the MACs)."""
    exact = all(recorded[k] == want[k] for k in ("widths", "mlp_ratios", "heads"))
    return exact and all(recorded[k] == pytest.approx(want[k], abs=1e-4) for k in ("keep", "merge_keep"))


def _row(result, method, batch):
    return next(r for r in result["rows"] if r["method"] == method and r["batch_size"] == batch)


@pytest.fixture(scope="module")
def images(fmnist_dir) -> torch.Tensor:
    return _fmnist(fmnist_dir, 12)


@pytest.fixture(scope="module")
def run(images):
    net = _adaptive(images)
    result = benchmark(net, batch_sizes=[1, 4], runs=3, warmup=1, rounds=1, images=images, pool=12,
                       image_indices=list(range(100, 112)), model_label="micro adaptive")
    return net, result


def test_the_plans_timed_are_the_ones_the_adaptive_model_chooses(run, images):
    net, result = run
    alone = _alone(net, images)
    assert len({str(plan["widths"]) + str(plan["keep"]) for plan, _ in alone}) >= 3  # decisions differ per image
    selector = result["meta"]["selector"]
    pool = result["meta"]["pool"]
    assert len(selector["plans"]) == pool == 12
    for i in range(pool):
        plan, macs = alone[i]
        assert _same_plan(selector["plans"][i], plan), i
        assert selector["macs"][i] == macs, i
    for b in (1, 4):
        for method in ("prance", "prance-padded"):  # every timed call re-decided exactly these plans
            row = _row(result, method, b)
            assert row["decisions_checked"] >= b and row["decisions_differing"] == 0
    assert result["meta"]["image_indices"] == list(range(100, 112))


def test_macs_are_the_adaptive_models_and_the_baselines_are_matched_to_them(run, images):
    net, result = run
    alone = _alone(net, images)
    mean_ratio = sum(macs for _, macs in alone) / len(alone) / net.last.dense_macs
    meta = result["meta"]
    assert meta["selector"]["macs_ratio"] == pytest.approx(mean_ratio)
    assert meta["target_macs"] == pytest.approx(min(1.0, meta["selector"]["macs_ratio"]))
    # At batch 4 the 3 timed calls run the pool's 3 batches: images 0..11 once each.
    assert _row(result, "prance", 4)["macs_fraction"] == pytest.approx(mean_ratio)
    assert _row(result, "prance", 4)["gmacs"] == pytest.approx(mean_ratio * net.last.dense_macs / 1e9)
    for b in (1, 4):
        for method in ("evit", "tome", "static-subnet"):
            assert _row(result, method, b)["macs_fraction"] == pytest.approx(meta["target_macs"], abs=0.03), method


def test_the_prance_rows_say_selector_plans(run):
    _, result = run
    assert result["meta"]["methods"]["prance"]["plans"].startswith("selector plans")
    assert all(_row(result, "prance", b)["note"].startswith("selector plans") for b in (1, 4))
    table = format_table(result)
    assert "selector plans" in table and "selector: mean" in table


@pytest.fixture(scope="module")
def adaptive_file(fmnist_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adaptive") / "adaptive.pt"
    _adaptive(_fmnist(fmnist_dir, 16)).save(path)
    return path


def test_command_line_times_an_adaptive_checkpoint_on_its_test_images(adaptive_file, fmnist_dir, tmp_path,
                                                                      capsys, monkeypatch):
    import prance.training.checkpoint as checkpoint

    loads = []
    real_load = checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])
    code = main(["bench", "--checkpoint", str(adaptive_file), "--data-dir", fmnist_dir, "--batch-sizes", "1,4",
                 "--pool", "8", "--runs", "2", "--warmup", "0", "--rounds", "1", "--threads", "1", "--methods",
                 "dense-timm,dense,prance", "--out", str(tmp_path)])
    assert code == 0
    assert len(loads) == 1  # the checkpoint is read once
    assert "selector plans" in capsys.readouterr().out
    meta = json.loads((tmp_path / "bench.json").read_text())["meta"]
    # The recorded images are test images of the checkpoint's data set, and their recorded plans are what
    # the saved adaptive model decides for them.
    test = final_test_set("fashion-mnist", img_size=28, in_chans=1, root=fmnist_dir)
    indices = meta["image_indices"]
    assert len(indices) == 8 and len(set(indices)) == 8
    images = torch.stack([test[i][0] for i in indices])
    alone = _alone(AdaptiveViT.load(adaptive_file), images)
    assert all(_same_plan(meta["selector"]["plans"][i], plan) for i, (plan, _) in enumerate(alone))
    assert meta["selector"]["macs"] == [macs for _, macs in alone]
    assert "fashion-mnist test images" in meta["inputs"]


@pytest.mark.parametrize("argv, fragment", [
    (["--target-macs", "0.4"], "drop --target-macs"),
    (["--distinct-plans", "2"], "decides its own per-image plans"),
    (["--data", "random"], "drop --data random"),
    (["--budget", "0.7"], "budget 0.7 is outside"),
])
def test_adaptive_checkpoint_errors_are_one_line(adaptive_file, fmnist_dir, tmp_path, capsys, argv, fragment):
    cli_error(capsys, ["bench", "--checkpoint", str(adaptive_file), "--data-dir", fmnist_dir, "--batch-sizes", "2",
                       "--runs", "1", "--out", str(tmp_path / "out"), *argv], fragment)
    assert not (tmp_path / "out").exists()


def test_budget_needs_an_adaptive_checkpoint(tmp_path, capsys):
    cli_error(capsys, ["bench", "--preset", "fmnist-micro", "--budget", "0.5", "--out", str(tmp_path / "out")],
              "--budget is for an adaptive checkpoint")


def test_a_decision_differs_when_what_runs_differs():
    model = create_model("fmnist-micro", depth=4, stage_depth=1)
    cfg = model.config  # 49 patches
    base = Plan.uniform(cfg, [48, 36, 36, 36], [4.0, 3.0, 3.0, 3.0], keep=0.5)

    def variant(**fields):
        return Plan(**{k: fields.get(k, getattr(base, k)).clone() for k in ("widths", "mlp_ratios", "heads", "keep",
                                                                          "merge_keep")})
    noisy = base.keep.clone()
    noisy[:, 1:] += 1e-7  # same token counts
    fewer = base.keep.clone()
    fewer[:, 2] = 0.3  # fewer tokens from stage 2 on
    wider = base.widths.clone()
    wider[:, 3] = 48
    plans = Plan.cat([variant(keep=noisy), variant(keep=fewer), variant(widths=wider), base])
    assert differing_decisions(plans, base.select([0, 0, 0, 0]), cfg).tolist() == [False, True, True, False]
