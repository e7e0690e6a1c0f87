"""No training or selection command reads a test image, and training steps never read a held-out one.

A spy on the one place Fashion-MNIST images are read (``FashionMNIST._batch``) records, for every
read, the split file, whether the view augments (training steps do; validation and selection
read plain images) and the storage rows. The held-out rows are recomputed independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prance import PranceError
from prance.cli import main
from prance.training.meta import MetaRunConfig, MetaTrainConfig, run_train_meta

pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_and_selection_commands_read_no_test_image_and_train_on_no_held_out_one(
    reads: list, fmnist_dir: str, tmp_path: Path
):
    common = ["--data-dir", fmnist_dir, "--batch-size", "32", "--threads", "1"]
    assert main(["train-dense", "--preset", "fmnist-micro", "--limit", "96", "--val-limit", "32", "--epochs", "1",
                 "--out", str(tmp_path / "dense"), *common]) == 0
    assert main(["train-meta", "--init", str(tmp_path / "dense" / "best.pt"), "--teacher", "init", "--limit", "96",
                 "--val-limit", "32", "--epochs", "1", "--warmup-steps", "1", "--num-random", "1",
                 "--out", str(tmp_path / "meta"), *common]) == 0
    assert main(["sweep", "--checkpoint", str(tmp_path / "meta" / "best.pt"), "--no-test", "--holdout-limit", "32",
                 "--count", "2", "--out", str(tmp_path / "sweep"), *common]) == 0

    # The default holdout, independently: the first 10 % of a permutation of the 60 000 images seeded by 0.
    held_out = set(torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:6_000].tolist())
    assert {split for split, _, _ in reads} == {"train"}  # not one read of the test file
    trained = set().union(*(rows for _, augmented, rows in reads if augmented))
    chosen_on = set().union(*(rows for _, augmented, rows in reads if not augmented))
    assert len(trained) == 96 and not trained & held_out
    assert chosen_on and chosen_on <= held_out
    # Meta-training took the dense run's holdout, and recorded it next to its run.
    dense_split = json.loads((tmp_path / "dense" / "split.json").read_text())
    meta_split = json.loads((tmp_path / "meta" / "split.json").read_text())
    assert dense_split["holdout"] == meta_split["holdout"] == {"fraction": 0.1, "seed": 0}


def test_meta_training_refuses_another_holdout_than_its_init_was_trained_with(fmnist_dir: str, tmp_path: Path):
    from prance import create_model
    from prance.training.checkpoint import save_checkpoint

    dense = tmp_path / "dense.pt"
    save_checkpoint(dense, create_model("fmnist-micro"), "dense",
                    split={"data": "fashion-mnist", "holdout": {"fraction": 0.1, "seed": 4}})
    cfg = MetaTrainConfig(epochs=1, batch_size=32, max_steps=1, warmup_steps=1)
    for holdout, seed in ((0.2, None), (None, 0)):
        run = MetaRunConfig(init=str(dense), data_dir=fmnist_dir, limit=32, val_limit=8, holdout=holdout,
                            holdout_seed=seed)
        with pytest.raises(PranceError, match=r"was trained with holdout 0.1 \(seed 4\).*drop --holdout"):
            run_train_meta(run, cfg, tmp_path / "meta", progress=False)
    assert not (tmp_path / "meta").exists()
    # By default it takes the init's holdout; a checkpoint that records none gets the default, with a warning.
    summary = run_train_meta(MetaRunConfig(init=str(dense), data_dir=fmnist_dir, limit=32, val_limit=8), cfg,
                             tmp_path / "meta", progress=False)
    assert json.loads((tmp_path / "meta" / "split.json").read_text())["holdout"] == {"fraction": 0.1, "seed": 4}
    assert summary["complete"]
    save_checkpoint(tmp_path / "bare.pt", create_model("fmnist-micro"), "dense")
    with pytest.warns(UserWarning, match="records no holdout; using holdout 0.1 \\(seed 0\\)"):
        run_train_meta(MetaRunConfig(init=str(tmp_path / "bare.pt"), data_dir=fmnist_dir, limit=32, val_limit=8),
                       cfg, tmp_path / "meta2", progress=False)
