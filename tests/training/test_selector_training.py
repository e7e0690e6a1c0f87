"""``train_selector``: Result-to-Go PPO on real images, a budget met on the holdout, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prance import create_model
from prance.accounting import macs_per_sample
from prance.adaptive import AdaptiveViT
from prance.cli import main
from prance.data.fashion_mnist import FashionMNIST
from prance.errors import PranceError
from prance.training.checkpoint import load_checkpoint, save_checkpoint
from prance.training.selector import SelectorTrainConfig, train_selector
from prance.training.subnets import DEFAULT_TOKEN_MODE

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

MICRO = dict(embed_dim=32, depth=6, num_heads=2, stage_depth=2)


def _meta(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    from prance.config import SearchSpace

    model = create_model("fmnist-micro", **MICRO)
    model.space = SearchSpace(widths=(16, 24, 32), mlp_ratios=(2.0, 4.0), heads=(2,), token_mode=DEFAULT_TOKEN_MODE,
                              min_keep=0.25)
    path = tmp_path / "meta.pt"
    save_checkpoint(path, model, "meta", split={"data": "fashion-mnist", "holdout": {"fraction": 0.1, "seed": 0}})
    return path


def _cfg(fmnist_dir: str, **kw) -> SelectorTrainConfig:
    base = dict(budget=0.6, updates=4, batch_size=16, hidden=16, limit=128, holdout_limit=64, data_dir=fmnist_dir,
                checkpoint_every=2, ppo={"num_minibatches": 2, "update_epochs": 2})
    return SelectorTrainConfig(**{**base, **kw})


def test_selector_training_logs_every_update_and_calibrates_onto_the_budget(tmp_path: Path, fmnist_dir: str,
                                                                            monkeypatch: pytest.MonkeyPatch):
    splits_read = set()
    real = FashionMNIST._batch
    monkeypatch.setattr(FashionMNIST, "_batch", lambda self, p: (splits_read.add(self.info.split), real(self, p))[1])
    meta = _meta(tmp_path)
    monkeypatch.chdir(tmp_path)  # given relative to the working folder, recorded absolutely (found from anywhere)
    assert main(["train-selector", "--meta", meta.name, "--budget", "0.6", "--updates", "4",
                 "--batch-size", "16", "--hidden", "16", "--limit", "128", "--holdout-limit", "64",
                 "--checkpoint-every", "2", "--data-dir", fmnist_dir, "--threads", "1", "--out", "sel"]) == 0
    assert splits_read == {"train"}  # never the test split
    assert load_checkpoint(tmp_path / "sel" / "adaptive.pt")["args"]["meta"] == str(meta)

    log = [json.loads(line) for line in (tmp_path / "sel" / "log.jsonl").read_text().splitlines()]
    updates = [r for r in log if r["event"] == "update"]
    assert [r["update"] for r in updates] == list(range(1, 5))
    for key in ("charts/return", "charts/accuracy_term", "charts/macs_ratio", "charts/lambda", "charts/keep_stage1",
                "losses/approx_kl", "losses/clipfrac", "losses/explained_variance"):
        assert key in updates[-1], key
    assert (tmp_path / "sel" / "curves.png").stat().st_size > 10_000

    # The deployed selector meets the budget on the holdout (±2 %), as recorded, selector MACs included.
    adaptive = AdaptiveViT.load(tmp_path / "sel" / "adaptive.pt")
    cal = adaptive.calibration
    assert abs(cal["holdout_macs_ratio"] - 0.6) <= 0.02 * 0.6, cal
    from prance.data.splits import Holdout, holdout_set

    held = holdout_set("fashion-mnist", img_size=28, in_chans=1, holdout=Holdout(), root=fmnist_dir, limit=64)
    x = torch.stack([held[i][0] for i in range(len(held))])
    adaptive(x)
    dense = float(macs_per_sample(adaptive.model.config, adaptive.model.full_plan)[0])
    assert float(adaptive.last.macs.double().mean()) / dense == pytest.approx(cal["holdout_macs_ratio"], abs=1e-9)

    # `prance evaluate` of the adaptive model: top-1, MACs, and every image's decisions in JSON and CSV.
    assert main(["evaluate", "--checkpoint", str(tmp_path / "sel" / "adaptive.pt"), "--limit", "24",
                 "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    images = result["images"]
    assert result["split"] == "test" and len(images) == 24 and result["summary"]["images"] == 24
    assert sum(r["label"] == r["prediction"] for r in images) / 24 * 100 == pytest.approx(result["summary"]["top1"])
    assert result["summary"]["macs"] == pytest.approx(sum(r["macs"] for r in images) / 24)
    assert {"widths", "mlp_ratios", "keep", "merge_keep", "tokens"} <= set(images[0])
    assert len((tmp_path / "eval.csv").read_text().splitlines()) == 25


def test_an_interrupted_selector_run_resumes_to_the_same_selector(tmp_path: Path, fmnist_dir: str):
    meta = _meta(tmp_path)
    train_selector(meta, _cfg(fmnist_dir), tmp_path / "whole", verbose=False)
    train_selector(meta, _cfg(fmnist_dir), tmp_path / "parts", stop_after=2, verbose=False)
    train_selector(meta, _cfg(fmnist_dir), tmp_path / "parts", resume=True, verbose=False)
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["selector"]["state"]
    b = load_checkpoint(tmp_path / "parts" / "last.pt")["selector"]["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PranceError, match="resuming"):
        train_selector(meta, _cfg(fmnist_dir, budget=0.5), tmp_path / "parts", resume=True, verbose=False)


def test_the_reward_setting_reaches_the_update_and_an_older_run_resumes_with_the_reward_it_had(
        tmp_path: Path, fmnist_dir: str, monkeypatch: pytest.MonkeyPatch):
    import prance.training.selector as selector_training
    from prance.training.checkpoint import atomic_save
    from prance.selector.reward import step_rewards

    kinds: list[str] = []
    monkeypatch.setattr(selector_training, "step_rewards", lambda *a: (kinds.append(a[3]), step_rewards(*a))[1])
    meta = _meta(tmp_path)
    train_selector(meta, _cfg(fmnist_dir, reward="gain"), tmp_path / "gain", stop_after=1, verbose=False)
    assert kinds == ["gain"]

    # A run paused before the setting existed rewarded outcomes: resuming it so is no change, with gains it is.
    last = tmp_path / "gain" / "last.pt"
    ckpt = load_checkpoint(last)
    del ckpt["args"]["train"]["reward"]
    atomic_save(ckpt, last)
    with pytest.raises(PranceError, match="reward='gain', but the run used 'outcome'"):
        train_selector(meta, _cfg(fmnist_dir, reward="gain"), tmp_path / "gain", resume=True, verbose=False)
    train_selector(meta, _cfg(fmnist_dir, reward="outcome", updates=2), tmp_path / "gain", resume=True, verbose=False)
    assert kinds == ["gain", "outcome"]
    with pytest.raises(PranceError, match="reward"):
        _cfg(fmnist_dir, reward="sum")
