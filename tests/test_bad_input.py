"""Bad input through the command line: one line ``prance: error: <problem; fix>``, exit code 2, no
traceback (``--debug`` shows it), and nothing already saved is overwritten or lost.

tests/test_cli.py already covers: unknown preset / dataset / command, --batch-size 0 and --epochs -1
for train-dense, --lr 0, non-numeric --epochs, missing --init file, missing --out, missing checkpoint,
a raw timm state dict given to evaluate, an --out under a regular file for train-dense, a plan width
outside the search space, ``--plan random:x`` / unknown plan names, an existing run without --resume /
--overwrite and changed settings on --resume, and --debug in-process. The cases here are the others.
Checkpoint-level checks (truncated, garbage, newer format version, wrong kind, weights not matching the
config, interrupted atomic writes) are unit-tested in tests/training/test_checkpoint.py; here they go
through the CLI. Malformed Fashion-MNIST IDX files and folder layouts are unit-tested in tests/data/.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from prance import PranceError, create_model, to_timm_state_dict
from prance.cli import main
from prance.data.fashion_mnist import ENV_VAR
from prance.engine import DynamicExecutor
from prance.training.checkpoint import FORMAT_VERSION, atomic_save, make_checkpoint, save_checkpoint
from tests.conftest import REPO, TINY



# ----------------------------------------------------------------------------- helpers and fixtures
def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("fmnist-tiny", **TINY)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "tiny.pt", _tiny_model(), "dense")


@pytest.fixture
def saved_run(tmp_path: Path) -> Path:
    """A run folder holding last.pt, best.pt and log.jsonl, as a finished dense run leaves it."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "last.pt"):
        save_checkpoint(run / name, _tiny_model(), "dense", metrics={"epoch": 1})
    (run / "log.jsonl").write_text('{"event": "end"}\n')
    return run


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Contents and modification time of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys: pytest.CaptureFixture[str], argv: list, *fragments: str) -> str:
    """Run the CLI in-process; expect exit code 2 and exactly one ``prance: error:`` line naming each fragment."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prance: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _image_folder(root: Path, classes: dict[str, list[str]] | int, size: int = 32, mode: str = "RGB") -> Path:
    """root/{train,val}/<class>/<n>.png of flat colours; ``classes``: a count (same classes, two images each
    in both splits) or {split/class: [file names]}."""
    if isinstance(classes, int):
        classes = {f"{split}/c{c}": ["0.png", "1.png"] for split in ("train", "val") for c in range(classes)}
    for folder, names in classes.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            Image.new("RGB", (size, size), (25 * i, 40, 90)).convert(mode).save(root / folder / name)
    return root


# ----------------------------------------------------------------------------- 1. image shape, channels, dtype
@pytest.mark.parametrize("runner", ["model", "engine"])
@pytest.mark.parametrize(
    "images, fragments",
    [
        (torch.zeros(2, 3, 32, 32), ["[B, 1, 28, 28]", "[2, 3, 32, 32]", "resize to 28x28"]),  # RGB 32 px
        (torch.zeros(2, 3, 28, 28), ["[B, 1, 28, 28]", "1 channel(s)"]),  # channel count only
        (torch.zeros(1, 28, 28), ["[1, 28, 28]", "[B, 1, 28, 28]"]),  # batch dimension missing
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), ["torch.uint8", "float", "normalise"]),
    ],
    ids=["rgb32", "channels", "no-batch-dim", "uint8"],
)
def test_wrong_image_shape_or_dtype_in_the_python_api(runner: str, images: torch.Tensor, fragments: list[str]):
    """The model and the engine reject what they cannot run, with the fix (the CLI resizes, see below)."""
    model = _tiny_model().eval()
    run = model if runner == "model" else DynamicExecutor(model)
    with pytest.raises(PranceError) as info:
        run(images)
    assert "\n" not in str(info.value)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_folder_of_other_size_and_channels_is_resized_but_a_different_class_count_is_refused(
    capsys, tmp_path: Path, tiny_checkpoint: Path
):
    """A 28 px grey model evaluated on a folder of 32 px RGB images: the data module converts and resizes
    to the model's input (that is fine); a folder with another number of classes is an error, and an
    existing --out file is left as it was."""
    ten = _image_folder(tmp_path / "ten", 10)
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", "folder", "--data-dir", str(ten),
                 "--batch-size", "8", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["images"] == 20
    capsys.readouterr()
    three = _image_folder(tmp_path / "three", 3)
    before = _snapshot(tmp_path)
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--data", "folder", "--data-dir", three,
                         "--out", out], f"{tiny_checkpoint} was trained on", "(10 classes)", f"not folder {three} (3 classes)",
                "use a data set of 10 classes")
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 2. NaN / Inf pixels
@pytest.mark.parametrize("runner", ["model", "engine"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_pixels_are_refused_not_turned_into_nan_logits(runner: str, bad: float):
    """An image folder cannot hold NaN, so this reaches the model only through the Python API (or a
    broken normalisation); ``check_images`` is unit-tested in tests/data/test_transforms.py."""
    model = _tiny_model().eval()
    run = model if runner == "model" else DynamicExecutor(model)
    x = torch.zeros(3, 1, 28, 28)
    x[1, 0, 5, 5] = bad
    with pytest.raises(PranceError, match=r"1 NaN/Inf pixel value\(s\); check the source images"):
        run(x)


# ----------------------------------------------------------------------------- 3-5. image folders
@pytest.mark.parametrize(
    "layout, fragments",
    [
        ({}, ["val does not exist", "root/train/<class>/<image>"]),  # an empty folder
        ({"train/a": [], "val/a": []}, ["has no images", "add images or remove the folder"]),
        ({"train/.cache": [], "val/.cache": []}, ["has no class folders", "root/val/<class>/<image>"]),
    ],
    ids=["empty-root", "empty-class-folder", "no-class-folders"],
)
def test_empty_image_folders_are_named(capsys, tmp_path: Path, tiny_checkpoint: Path, layout, fragments):
    root = _image_folder(tmp_path / "data", layout)
    root.mkdir(exist_ok=True)
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--data", "folder", "--data-dir", root],
                *fragments)


def test_data_dir_that_is_a_file_or_missing(capsys, tmp_path: Path, tiny_checkpoint: Path):
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--data", "folder", "--data-dir",
                         tiny_checkpoint], "is a file, not a folder", "expected root/train")
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--data", "folder", "--data-dir",
                         tmp_path / "nowhere"], "does not exist")
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--data", "folder"], "pass --data-dir")


def test_zero_byte_and_unreadable_images_are_named(capsys, tmp_path: Path, tiny_checkpoint: Path):
    root = _image_folder(tmp_path / "data", 10)
    empty = root / "val" / "c4" / "empty.png"
    empty.write_bytes(b"")
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--data", "folder", "--data-dir", root],
                str(empty), "0 bytes", "replace or delete")
    empty.unlink()
    broken = root / "val" / "c7" / "1.png"
    broken.write_bytes(broken.read_bytes()[:60])  # a truncated PNG: only decoding can tell
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--data", "folder", "--data-dir", root,
                         "--batch-size", "4"], str(broken), "cannot read image", "replace or delete")


def test_unreadable_image_in_a_dataloader_worker_is_still_one_named_line(capsys, tmp_path: Path):
    """A PranceError raised inside a DataLoader worker process comes back wrapped by torch; the user must
    still see the original message (file name and fix), and no checkpoint is written."""
    root = _image_folder(tmp_path / "data", 10)
    broken = root / "train" / "c2" / "0.png"
    broken.write_bytes(broken.read_bytes()[:60])
    run = tmp_path / "run"
    _error_line(capsys, ["train-dense", "--preset", "fmnist-micro", "--data", "folder", "--data-dir", root,
                         "--epochs", "1", "--batch-size", "4", "--workers", "1", "--threads", "1", "--out", run],
                str(broken), "cannot read image", "replace or delete")
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()


def test_class_folders_that_differ_between_train_and_val_leave_a_saved_run_intact(
    capsys, tmp_path: Path, saved_run: Path
):
    root = _image_folder(tmp_path / "data", {"train/cat": ["0.png"], "train/dog": ["0.png"],
                                             "val/cat": ["0.png"], "val/frog": ["0.png"]})
    before = _snapshot(saved_run)
    # Even with --overwrite, the old run's files stay until the new run has something to save.
    _error_line(capsys, ["train-dense", "--data", "folder", "--data-dir", root, "--overwrite", "--out", saved_run],
                "class folders differ", "only in train: [dog]", "only in val: [frog]", "same class folders")
    assert _snapshot(saved_run) == before


# ----------------------------------------------------------------------------- 6. Fashion-MNIST files missing
@pytest.mark.parametrize("command", ["evaluate", "train-dense"])
def test_missing_fashion_mnist_files_say_how_to_install(
    capsys, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, command: str
):
    empty = tmp_path / "no-data"
    empty.mkdir()
    monkeypatch.setenv(ENV_VAR, str(empty))
    argv = (["evaluate", "--checkpoint", tiny_checkpoint] if command == "evaluate"
            else ["train-dense", "--preset", "fmnist-micro", "--out", tmp_path / "run"])
    _error_line(capsys, argv, "idx3-ubyte[.gz] not found in " + str(empty),
                "sudo apt-get install dataset-fashion-mnist", ENV_VAR)


# ----------------------------------------------------------------------------- 7-8. checkpoints
@pytest.mark.parametrize("keep", [0, 64, 0.5, 0.99])
def test_truncated_checkpoint_through_the_cli(capsys, tmp_path: Path, tiny_checkpoint: Path, keep):
    data = tiny_checkpoint.read_bytes()
    tiny_checkpoint.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    fragments = ["0 bytes", "interrupted"] if keep == 0 else ["truncated, corrupt", "use another copy"]
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint], str(tiny_checkpoint), *fragments)
    _error_line(capsys, ["sweep", "--checkpoint", tiny_checkpoint, "--out", tmp_path / "sweep"], *fragments)


def test_resume_from_a_truncated_last_pt_changes_no_file(capsys, saved_run: Path):
    last = saved_run / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    before = _snapshot(saved_run)
    _error_line(capsys, ["train-dense", "--resume", "--out", saved_run], str(last), "truncated", "use another copy")
    assert _snapshot(saved_run) == before


def test_resume_from_a_checkpoint_of_another_training_stage(capsys, tmp_path: Path):
    run = tmp_path / "meta-run"
    run.mkdir()
    save_checkpoint(run / "last.pt", _tiny_model(), "meta")
    before = _snapshot(run)
    _error_line(capsys, ["train-dense", "--resume", "--out", run], "holds a 'meta' model, expected 'dense'",
                "right training stage")
    assert _snapshot(run) == before


def test_raw_timm_state_dict_where_a_prance_checkpoint_is_expected(capsys, tmp_path: Path):
    """(evaluate is covered in tests/test_cli.py; sweep shares the loader but is its own command)"""
    path = tmp_path / "deit.pth"
    torch.save(to_timm_state_dict(_tiny_model()), path)
    _error_line(capsys, ["sweep", "--checkpoint", path, "--out", tmp_path / "sweep"], "plain state dict",
                "--init timm:")


def test_prance_checkpoint_where_a_timm_file_is_expected(capsys, tmp_path: Path, tiny_checkpoint: Path):
    _error_line(capsys, ["train-dense", "--init", tiny_checkpoint, "--out", tmp_path / "run"],
                "is a prance checkpoint, not a timm/DeiT state dict", "--resume", "train-meta --init")
    _error_line(capsys, ["train-dense", "--init", f"timm:{tiny_checkpoint}", "--out", tmp_path / "run"],
                "is a prance checkpoint")
    assert not (tmp_path / "run" / "last.pt").exists()


def _edited(ckpt: dict, what: str) -> dict:
    if what == "head":
        ckpt["model"]["head.weight"] = torch.zeros(5, 32)
    elif what == "missing-key":
        del ckpt["model"]["blocks.0.attn.qkv.weight"]
    elif what == "config-width":
        ckpt["config"]["embed_dim"] = 64
    elif what == "space":
        ckpt["space"]["widths"] = [16, 999]
    elif what == "version":
        ckpt["format_version"] = FORMAT_VERSION + 1
    return ckpt


@pytest.mark.parametrize(
    "what, fragments",
    [
        ("head", ["head.weight", "(5, 32)", "(10, 32)", "edited or is corrupt"]),
        ("missing-key", ["blocks.0.attn.qkv.weight", "do not match its config"]),
        ("config-width", ["checkpoint config is invalid", "use another copy"]),
        ("space", ["checkpoint config is invalid", "999", "use another copy"]),
        ("version", [f"format version {FORMAT_VERSION + 1}", "upgrade prance"]),
    ],
)
def test_checkpoint_whose_weights_config_or_version_do_not_fit(capsys, tmp_path: Path, what, fragments):
    path = atomic_save(_edited(make_checkpoint(_tiny_model(), "dense"), what), tmp_path / f"{what}.pt")
    _error_line(capsys, ["evaluate", "--checkpoint", path], *fragments)
    if what == "version":  # a newer checkpoint as the starting point of meta training, too
        _error_line(capsys, ["train-meta", "--init", path, "--out", tmp_path / "meta"], *fragments)


# ----------------------------------------------------------------------------- 9-10. plan files
@pytest.mark.parametrize(
    "plan, fragments",
    [
        ({"widths": [32, 32, 32], "mlp_ratios": 5.0}, ["MLP ratio [5.0] is outside the search space", "use one of"]),
        ({"widths": [32, 32, 32], "mlp_ratios": 4.0, "heads": [2, 2, 5]}, ["head count [5]", "elastic_heads"]),
        ({"widths": [32, 32], "mlp_ratios": 4.0}, ["needs 3 stage widths, got 2", "one per stage"]),
        ({"widths": [16, 32, 32], "mlp_ratios": 4.0}, ["stage 0 always runs at full width 32"]),
        ({"widths": [32, 32, 32], "mlp_ratios": [4.0, 4.0]}, ["needs 3 MLP ratios", "one per block"]),
        ({"widths": [32, 32, 32], "mlp_ratios": 4.0, "speed": 2}, ["unknown plan keys ['speed']"]),
        ({"widths": [32, 32, 32]}, ["needs at least 'widths' and 'mlp_ratios'"]),
        ({"widths": "big", "mlp_ratios": 4.0}, ["widths must be a list of 3 whole numbers", "'big'"]),
        ({"widths": [32, 32.5, 32], "mlp_ratios": 4.0}, ["widths must be whole numbers, got 32.5"]),
        ({"widths": [32, 32, 32], "mlp_ratios": None}, ["MLP ratios must be a number or a list", "None"]),
        ({"widths": [32, 32, 32], "mlp_ratios": 4.0, "keep": "half"}, ["keep ratios must be a number", "'half'"]),
    ],
    ids=["mlp-ratio", "heads", "width-count", "stage0", "ratio-count", "unknown-key", "no-ratios", "widths-str",
         "width-fraction", "ratios-null", "keep-str"],
)
def test_plan_file_outside_the_search_space_or_malformed(capsys, tmp_path: Path, tiny_checkpoint: Path, plan,
                                                          fragments):
    """(a width outside the search space is in tests/test_cli.py)"""
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--plan", plan_file], *fragments)


@pytest.mark.parametrize("field", ["keep", "merge_keep"])
@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, [0.5, 2.0], [1.0, 0.5, 0.0], math.nan, math.inf])
def test_keep_ratio_not_in_zero_one_in_a_plan_file(capsys, tmp_path: Path, tiny_checkpoint: Path, field, value):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"widths": [32, 32, 32], "mlp_ratios": 4.0, field: value}))
    _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--plan", plan_file],
                f"{field} ratios must be in (0, 1]")


def test_failed_evaluation_keeps_the_previous_result_file(capsys, tmp_path: Path, tiny_checkpoint: Path):
    out = tmp_path / "eval.json"
    out.write_text('{"rows": ["an earlier result"]}\n')
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"widths": [32, 32, 32], "mlp_ratios": 4.0, "keep": 0}))
    before = _snapshot(tmp_path)
    for argv in (["--plan", plan_file], ["--plan", "random:0"], ["--batch-size", "-1"], ["--data", "imagenet"]):
        _error_line(capsys, ["evaluate", "--checkpoint", tiny_checkpoint, "--out", out, *argv])
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 11. MACs budget
@pytest.mark.parametrize("budget", ["0", "-1", "-0.5", "nan"])
def test_budget_not_positive(capsys, tmp_path: Path, tiny_checkpoint: Path, budget: str):
    _error_line(capsys, ["sweep", "--checkpoint", tiny_checkpoint, "--budget-gmacs", budget, "--out",
                         tmp_path / "sweep"], f"--budget-gmacs must be positive, got {float(budget)}")
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").iterdir())


def test_budget_above_the_dense_network(capsys, tmp_path: Path, tiny_checkpoint: Path, fmnist_dir: str):
    """A budget far above the full network's 0.0024 GMACs is most likely MACs given as GMACs."""
    _error_line(capsys, ["sweep", "--checkpoint", tiny_checkpoint, "--budget-gmacs", "2400000",
                         "--holdout-limit", "8", "--no-test", "--count", "2", "--threads", "1", "--out",
                         tmp_path / "sweep"], "2400000", "GMACs")


# ----------------------------------------------------------------------------- 12. unknown names
@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train-meta", "--preset", "deit-huge", "--out", "{tmp}/m"], ["unknown preset 'deit-huge'", "fmnist-tiny"]),
        (["train-meta", "--distill-from", "smallest", "--out", "{tmp}/m"], ["--distill-from", "invalid choice"]),
        (["train-meta", "--data", "cifar", "--preset", "fmnist-micro", "--out", "{tmp}/m"],
         ["unknown dataset 'cifar'", "fashion-mnist"]),
        (["evaluate", "--checkpoint", "{ckpt}", "--data", "imagenet"], ["unknown dataset 'imagenet'", "folder"]),
        (["evaluate", "--checkpoint", "{ckpt}", "--plan", "fastest"], ["fastest", "max, min, random:K"]),
        (["train-meta", "--min-keep", "0", "--out", "{tmp}/m"], ["--min-keep 0.0 must be in (0, 1]"]),
        (["train-meta", "--widths", "a,b", "--out", "{tmp}/m"], ["--widths 'a,b'", "comma-separated numbers"]),
        (["train-meta", "--holdout", "0", "--out", "{tmp}/m"], ["--holdout 0.0 must be in (0, 1)"]),
        (["train-dense", "--img-size", "30", "--out", "{tmp}/r"], ["img_size 30", "multiple of patch_size 4"]),
        (["train-dense", "--resume", "--out", "{tmp}/none"], ["nothing to resume", "drop --resume"]),
        (["evaluate", "--checkpoint", "{ckpt}", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    ],
    ids=["meta-preset", "distill-from", "meta-data", "eval-data", "plan-name", "min-keep", "widths", "holdout",
         "img-size", "resume-nothing", "unknown-flag"],
)
def test_unknown_names_and_contradictory_settings(capsys, tmp_path: Path, tiny_checkpoint: Path, argv, fragments):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(tiny_checkpoint)) for a in argv]
    _error_line(capsys, argv, *fragments)


# ----------------------------------------------------------------------------- 13. output folder not writable
@pytest.mark.parametrize("command", ["evaluate", "sweep", "train-meta"])
def test_output_under_a_regular_file(capsys, tmp_path: Path, tiny_checkpoint: Path, command: str):
    """(train-dense is in tests/test_cli.py). A path under a regular file cannot be created even by root,
    where chmod would not stop writes."""
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    argv = {"evaluate": ["evaluate", "--checkpoint", tiny_checkpoint, "--out", blocker / "sub" / "eval.json"],
            "sweep": ["sweep", "--checkpoint", tiny_checkpoint, "--out", blocker / "sub"],
            "train-meta": ["train-meta", "--preset", "fmnist-micro", "--out", blocker / "sub"]}[command]
    _error_line(capsys, argv, str(blocker), "choose")
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders; the "
                    "regular-file case above covers unwritable outputs there")
def test_read_only_output_folder(capsys, tmp_path: Path, tiny_checkpoint: Path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _error_line(capsys, ["sweep", "--checkpoint", tiny_checkpoint, "--out", locked], "cannot write to folder",
                    str(locked), "choose a writable --out")
        _error_line(capsys, ["train-meta", "--preset", "fmnist-micro", "--out", locked / "run"],
                    "cannot write to folder")
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------- 14. out-of-range numbers
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["evaluate", "--checkpoint", "{ckpt}", "--batch-size", "-4"], "--batch-size"),
        (["evaluate", "--checkpoint", "{ckpt}", "--limit", "0"], "--limit"),
        (["evaluate", "--checkpoint", "{ckpt}", "--threads", "0"], "--threads"),
        (["train-dense", "--batch-size", "-3", "--out", "{tmp}/r"], "--batch-size"),
        (["train-dense", "--val-limit", "0", "--out", "{tmp}/r"], "--val-limit"),
        (["train-dense", "--workers", "-1", "--out", "{tmp}/r"], "--workers"),
        (["train-dense", "--warmup-epochs", "-1", "--out", "{tmp}/r"], "--warmup-epochs"),
        (["train-meta", "--batch-size", "0", "--out", "{tmp}/m"], "--batch-size"),
        (["train-meta", "--batch-size", "-2", "--out", "{tmp}/m"], "--batch-size"),
        (["train-meta", "--max-steps", "0", "--out", "{tmp}/m"], "--max-steps"),
        (["sweep", "--checkpoint", "{ckpt}", "--batch-size", "0", "--out", "{tmp}/s"], "--batch-size"),
        (["sweep", "--checkpoint", "{ckpt}", "--count", "-1", "--out", "{tmp}/s"], "--count"),
    ],
)
def test_out_of_range_numbers(capsys, tmp_path: Path, tiny_checkpoint: Path, argv, flag):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(tiny_checkpoint)) for a in argv]
    err = _error_line(capsys, argv, flag)
    assert "must be" in err
    assert not any(p.suffix == ".pt" for p in tmp_path.rglob("*") if p != tiny_checkpoint)


def test_out_of_range_numbers_leave_a_saved_run_as_it_was(capsys, saved_run: Path):
    before = _snapshot(saved_run)
    for flags, fragment in ((["--batch-size", "0"], "--batch-size must be positive"),
                            (["--epochs", "-1"], "--epochs must be positive"),
                            (["--overwrite", "--batch-size", "-8"], "--batch-size must be positive"),
                            (["--resume", "--limit", "0"], "--limit must be positive"),
                            (["--resume", "--overwrite"], "contradict"),
                            (["--resume", "--lr", "0.5"], "lr=0.5"),
                            ([], "already holds a run")):
        _error_line(capsys, ["train-dense", *flags, "--out", saved_run], fragment)
    assert _snapshot(saved_run) == before


# ----------------------------------------------------------------------------- 15. --debug
def test_debug_flag_shows_the_traceback_in_a_real_process(capsys, tmp_path: Path):
    """Without --debug: one line, exit 2. With it: Python's traceback of the same PranceError (the
    one-line case in a real process is in tests/test_cli.py)."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    _error_line(capsys, ["evaluate", "--checkpoint", bad], f"cannot read checkpoint {bad}")
    cmd = [sys.executable, "-m", "prance", "evaluate", "--checkpoint", str(bad)]
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr
    assert "prance.errors.PranceError: cannot read checkpoint" in debug.stderr
