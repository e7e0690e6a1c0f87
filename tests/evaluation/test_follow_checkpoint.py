"""Commands follow the checkpoint: evaluate, sweep, visualize and bench read the data set the model was
trained on (its folder, its classes, its image size), and refuse, naming both, data whose classes differ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from prance import create_model
from prance.cli import main
from prance.data.fashion_mnist import CLASS_NAMES, ENV_VAR
from prance.data.provenance import trained_on
from prance.training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from tests.conftest import TINY, cli_error

CLASSES = ("cat", "dog", "frog")
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 4
# One grey level per class: a model could learn them, and a test can tell the folders apart.
SHADES = {"cat": 40, "dog": 130, "frog": 220, "ant": 10, "bee": 90, "cow": 170}


def _folder(root: Path, classes: tuple[str, ...] = CLASSES, size: int = 36) -> Path:
    """root/{train,val}/<class>/<n>.png: TRAIN_PER_CLASS and VAL_PER_CLASS RGB images per class."""
    for split, n in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                shade = SHADES[name] + i
                Image.new("RGB", (size, size), (shade, shade, shade)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dense fmnist-micro (28 px, grey) trained for one epoch on a 3-class RGB folder of 36 px images."""
    root = _folder(tmp_path_factory.mktemp("data") / "pets")
    run = tmp_path_factory.mktemp("runs") / "pets"
    threads = torch.get_num_threads()
    try:
        assert main(["train-dense", "--preset", "fmnist-micro", "--data", "folder", "--data-dir", str(root),
                     "--epochs", "1", "--batch-size", "9", "--threads", "1", "--out", str(run)]) == 0
    finally:
        torch.set_num_threads(threads)
    return root, run / "best.pt"


@pytest.fixture
def no_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fashion-MNIST unreadable: a command that succeeds did not read it."""
    empty = tmp_path / "no-fmnist"
    empty.mkdir()
    monkeypatch.setenv(ENV_VAR, str(empty))


def _fashion_mnist_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo ``no_fashion_mnist``: the class check needs Fashion-MNIST readable to see its classes."""
    monkeypatch.delenv(ENV_VAR)


# ----------------------------------------------------------------------------- what a checkpoint records
def test_a_dense_run_records_its_folder_and_class_names(folder_run):
    root, best = folder_run
    trained = trained_on(load_checkpoint(best))
    assert (trained.data, trained.data_dir, trained.class_names) == ("folder", str(root), CLASSES)
    assert trained.num_classes == 3 and trained.holdout is not None


def test_checkpoints_of_older_formats_and_of_meta_runs_say_what_they_can():
    model = create_model("fmnist-tiny", **TINY)
    # Dense, as written from the honest-splits commit on: a split record without class names.
    legacy = make_checkpoint(model, "dense", args={"data": "folder", "data_dir": "/data/x", "holdout": 0.1},
                             split={"data": "folder", "holdout": {"fraction": 0.1, "seed": 0},
                                    "train_images": 90, "holdout_images": 10})
    t = trained_on(legacy)
    assert (t.data, t.data_dir, t.class_names, t.num_classes) == ("folder", "/data/x", None, 10)
    assert (t.holdout.fraction, t.holdout.seed) == (0.1, 0)
    # Meta runs keep their data settings under args["run"]; Fashion-MNIST's classes are known by name.
    meta = make_checkpoint(model, "meta", args={"run": {"data": "fashion-mnist", "data_dir": "/idx"}, "train": {}})
    t = trained_on(meta)
    assert (t.data, t.data_dir, t.class_names, t.holdout) == ("fashion-mnist", "/idx", CLASS_NAMES, None)
    # A bare checkpoint knows only its class count.
    t = trained_on(make_checkpoint(model, "dense"))
    assert (t.data, t.data_dir, t.class_names, t.num_classes) == (None, None, None, 10)


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_without_data_flags_reads_the_checkpoints_folder(folder_run, tmp_path, capsys, no_fashion_mnist):
    root, best = folder_run
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(best), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["data"], result["split"]) == ("folder", "test")
    assert result["rows"][0]["images"] == len(CLASSES) * VAL_PER_CLASS
    assert "folder test images" in capsys.readouterr().out
    # --data folder alone means the folder it was trained on, too.
    assert main(["evaluate", "--checkpoint", str(best), "--data", "folder", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["images"] == len(CLASSES) * VAL_PER_CLASS


def test_evaluate_on_the_holdout_reads_the_images_training_held_out(folder_run, tmp_path):
    _, best = folder_run
    out = tmp_path / "holdout.json"
    assert main(["evaluate", "--checkpoint", str(best), "--split", "holdout", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["split"] == "holdout"
    assert result["rows"][0]["images"] == round(0.1 * len(CLASSES) * TRAIN_PER_CLASS)  # the default 10 %
    # The same images training chose its best epoch on: the same accuracy as recorded then.
    assert result["rows"][0]["top1"] == pytest.approx(load_checkpoint(best)["metrics"]["holdout_top1"])


def test_evaluate_on_fashion_mnist_names_both_data_sets(folder_run, capsys, tmp_path):
    root, best = folder_run
    before = sorted(tmp_path.rglob("*"))
    cli_error(capsys, ["evaluate", "--checkpoint", best, "--data", "fashion-mnist", "--out", tmp_path / "e.json"],
               f"{best} was trained on folder {root} (3 classes: cat, dog, frog)", "not fashion-mnist (10 classes)",
               "use --data folder", "a checkpoint trained on fashion-mnist")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_folder_with_as_many_classes_but_other_names_is_refused(folder_run, tmp_path, capsys):
    _, best = folder_run
    other = _folder(tmp_path / "farm", ("ant", "bee", "cow"))
    cli_error(capsys, ["evaluate", "--checkpoint", best, "--data", "folder", "--data-dir", other],
               "(3 classes: cat, dog, frog)", f"not folder {other} (3 classes: ant, bee, cow)")
    # The same class names in another folder are fine (e.g. a copy on another disk).
    copy = _folder(tmp_path / "copy")
    assert main(["evaluate", "--checkpoint", str(best), "--data-dir", str(copy)]) == 0


def test_a_checkpoint_without_a_recorded_holdout_cannot_be_evaluated_on_one(tmp_path, capsys):
    bare = save_checkpoint(tmp_path / "bare.pt", create_model("fmnist-tiny", **TINY), "dense")
    cli_error(capsys, ["evaluate", "--checkpoint", bare, "--split", "holdout"], "does not record which training "
               "images it held out", "use --split test")
    cli_error(capsys, ["evaluate", "--checkpoint", bare, "--split", "val"], "invalid choice: 'val'")


# ----------------------------------------------------------------------------- sweep, visualize, bench
def test_sweep_follows_the_checkpoint_and_refuses_other_classes(folder_run, tmp_path, capsys, no_fashion_mnist, monkeypatch):
    _, best = folder_run
    out = tmp_path / "sweep"
    assert main(["sweep", "--checkpoint", str(best), "--count", "2", "--out", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["data"] == "folder" and result["test_images"] == len(CLASSES) * VAL_PER_CLASS
    assert result["holdout_images"] == round(0.1 * len(CLASSES) * TRAIN_PER_CLASS)
    _fashion_mnist_back(monkeypatch)
    capsys.readouterr()
    cli_error(capsys, ["sweep", "--checkpoint", best, "--data", "fashion-mnist", "--out", tmp_path / "s2"],
               "was trained on folder", "not fashion-mnist (10 classes)")
    assert not (tmp_path / "s2").exists()


def test_sweep_refuses_a_comparison_checkpoint_with_other_classes(folder_run, tmp_path, capsys):
    _, best = folder_run
    ten = save_checkpoint(tmp_path / "ten.pt", create_model("fmnist-micro"), "dense")
    cli_error(capsys, ["sweep", "--checkpoint", best, "--count", "2", "--compare", f"ten={ten}",
                        "--out", tmp_path / "s"], f"{ten} was trained on an unrecorded data set (10 classes)",
               "not folder")


def test_visualize_follows_the_checkpoint(folder_run, tmp_path, capsys, no_fashion_mnist, monkeypatch):
    _, best = folder_run
    out = tmp_path / "tokens.png"
    assert main(["visualize", "--checkpoint", str(best), "--keep", "0.5", "--num-images", "2",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _fashion_mnist_back(monkeypatch)
    capsys.readouterr()
    cli_error(capsys, ["visualize", "--checkpoint", best, "--data", "fashion-mnist", "--out", out],
               "was trained on folder", "not fashion-mnist")


def test_bench_times_the_checkpoints_own_test_images(folder_run, tmp_path, capsys, no_fashion_mnist, monkeypatch):
    _, best = folder_run
    common = ["bench", "--checkpoint", str(best), "--methods", "dense", "--batch-sizes", "2", "--runs", "1",
              "--warmup", "0", "--pool", "2", "--threads", "1"]
    assert main([*common, "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["meta"]["inputs"].startswith("2 folder ")
    assert main([*common, "--data", "random", "--out", str(tmp_path / "r")]) == 0
    assert "folder" not in json.loads((tmp_path / "r" / "bench.json").read_text())["meta"]["inputs"]
    _fashion_mnist_back(monkeypatch)
    capsys.readouterr()
    cli_error(capsys, [*common, "--data", "fashion-mnist", "--out", tmp_path / "f"], "not fashion-mnist")
    assert not (tmp_path / "f").exists()
