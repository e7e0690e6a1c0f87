"""The command line: one-line errors with exit code 2, training and evaluation end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prance import PranceError, create_model, to_timm_state_dict
from prance.cli import main
from prance.training.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import REPO, TINY




@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "tiny.pt", create_model("fmnist-tiny", **TINY), "dense")


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("prance: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["train-dense", "--preset", "deit-huge", "--out", "{tmp}/r"], ["unknown preset 'deit-huge'", "fmnist-tiny"]),
        (["train-dense", "--batch-size", "0", "--out", "{tmp}/r"], ["--batch-size must be positive"]),
        (["train-dense", "--epochs", "-1", "--out", "{tmp}/r"], ["--epochs must be positive"]),
        (["train-dense", "--lr", "0", "--out", "{tmp}/r"], ["--lr must be positive"]),
        (["train-dense", "--epochs", "two", "--out", "{tmp}/r"], ["--epochs", "invalid int"]),
        (["train-dense", "--data", "cifar", "--out", "{tmp}/r"], ["unknown dataset 'cifar'"]),
        (["train-dense", "--init", "{tmp}/deit.pth", "--out", "{tmp}/r"], ["deit.pth", "not found"]),
        (["train-dense"], ["--out"]),
        (["train-dense", "--init", __file__, "--preset", "deit-tiny", "--out", "{tmp}/r"], ["drop --preset"]),
        (["evaluate", "--checkpoint", "{tmp}/missing.pt"], ["missing.pt", "does not exist"]),
        (["evaluate", "--checkpoint", "{tmp}/missing.pt", "--batch-size", "0"], ["--batch-size must be positive"]),
        (["fly"], ["invalid choice"]),
        ([], ["give a command"]),
    ],
)
def test_bad_input_is_one_error_line_with_exit_code_2(capsys, tmp_path: Path, argv, fragments):
    _error_line(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv], *fragments)


def test_unwritable_output_folder_is_named(capsys, tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _error_line(capsys, ["train-dense", "--out", str(blocker / "run")], "cannot write to folder", str(blocker / "run"))
    _error_line(capsys, ["train-dense", "--out", str(blocker)], str(blocker), "is a file")


def test_resume_without_a_run_creates_nothing(capsys, tmp_path: Path):
    _error_line(capsys, ["train-dense", "--out", str(tmp_path / "none"), "--resume"], "nothing to resume")
    assert not (tmp_path / "none").exists()


def test_foreign_checkpoint_points_to_init(capsys, tmp_path: Path):
    path = tmp_path / "deit.pth"
    torch.save(to_timm_state_dict(create_model("fmnist-tiny", **TINY)), path)
    _error_line(capsys, ["evaluate", "--checkpoint", str(path)], "not a prance checkpoint", "--init timm:")


def test_debug_shows_the_traceback(tmp_path: Path):
    with pytest.raises(PranceError):
        main(["--debug", "evaluate", "--checkpoint", str(tmp_path / "missing.pt")])
    with pytest.raises(PranceError):
        main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--debug"])


def test_python_dash_m_prance_prints_one_line_and_exits_2(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "prance", "evaluate", "--checkpoint", str(tmp_path / "no.pt")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("prance: error: checkpoint") and proc.stderr.count("\n") == 1, proc.stderr


def test_evaluate_writes_json_rows(fmnist_dir: str, tiny_checkpoint: Path, tmp_path: Path, capsys):
    out = tmp_path / "results" / "eval.json"
    argv = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data-dir", fmnist_dir, "--limit", "48",
            "--batch-size", "16", "--out", str(out)]
    assert main([*argv, "--plan", "max"]) == 0
    full = json.loads(out.read_text())
    assert full["kind"] == "dense" and full["config"]["embed_dim"] == 32
    (row,) = full["rows"]
    assert row["plan_name"] == "max" and row["images"] == 48 and 0 <= row["top1"] <= 100
    assert row["gmacs"] > 0 and row["params_m"] > 0 and row["tokens"] == 49
    assert row["plan"]["widths"] == [32, 32, 32]

    assert main([*argv, "--plan", "min"]) == 0
    (small,) = json.loads(out.read_text())["rows"]
    assert small["gmacs"] < row["gmacs"] and small["params_m"] < row["params_m"]

    assert main([*argv, "--plan", "random:3"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["plan_name"] for r in rows] == ["random-0", "random-1", "random-2"]
    assert all(r["images"] == 48 for r in rows)
    assert "top-1" in capsys.readouterr().out


def test_evaluate_static_baselines(fmnist_dir: str, tiny_checkpoint: Path, tmp_path: Path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data-dir", fmnist_dir, "--limit", "32",
                 "--baseline", "tome:4", "--baseline", "evit:0.5", "--out", str(out)]) == 0
    full, tome, evit = json.loads(out.read_text())["rows"]
    assert [r["plan_name"] for r in (full, tome, evit)] == ["max", "tome:4", "evit:0.5"]
    assert tome["gmacs"] < full["gmacs"] and tome["tokens"] < full["tokens"]
    assert evit["gmacs"] == full["gmacs"]  # a 3-block model has no EViT decision block (3, 6, 9)
    _error_line(capsys, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--baseline", "tome:x"], "tome:R")


def test_evaluate_plan_from_yaml(fmnist_dir: str, tiny_checkpoint: Path, tmp_path: Path, capsys):
    plan_file = tmp_path / "half.yaml"
    plan_file.write_text(yaml.safe_dump({"widths": [32, 16, 16], "mlp_ratios": [4.0, 2.0, 2.0], "keep": 0.5}))
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data-dir", fmnist_dir, "--limit", "32",
                 "--plan", str(plan_file), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["plan_name"] == "half" and row["plan"]["keep"] == [1.0, 0.5, 0.5]
    assert row["tokens"] < 49

    plan_file.write_text(yaml.safe_dump({"widths": [32, 7, 16], "mlp_ratios": 4.0}))
    _error_line(capsys, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--plan", str(plan_file)],
                "width [7] is outside the search space")
    _error_line(capsys, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--plan", "random:x"], "random:8")
    _error_line(capsys, ["evaluate", "--checkpoint", str(tiny_checkpoint), "--plan", "medium"], "medium")


def test_train_dense_then_refuse_then_resume(fmnist_dir: str, tmp_path: Path, capsys):
    run = tmp_path / "run"
    argv = ["train-dense", "--preset", "fmnist-micro", "--data-dir", fmnist_dir, "--epochs", "1", "--limit", "64",
            "--val-limit", "32", "--batch-size", "32", "--threads", "1", "--out", str(run)]
    assert main(argv) == 0
    assert "best holdout top-1" in capsys.readouterr().out
    ckpt = load_checkpoint(run / "best.pt", kind="dense")
    assert ckpt["args"]["preset"] == "fmnist-micro" and ckpt["train_state"]["epoch"] == 1
    before = (run / "last.pt").read_bytes()

    _error_line(capsys, argv, "already holds a run", "--resume", "--overwrite")
    assert (run / "last.pt").read_bytes() == before
    _error_line(capsys, [*argv, "--resume", "--lr", "0.5"], "lr=0.5")

    # Resuming with no flags at all takes the run's own settings; a finished run stays as it is.
    assert main(["train-dense", "--out", str(run), "--resume", "--threads", "1"]) == 0
    assert (run / "last.pt").read_bytes() == before


def test_visualize_writes_png(fmnist_dir: str, tmp_path: Path, capsys):
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "micro.pt", create_model("fmnist-micro"), "dense")
    out = tmp_path / "vis" / "tokens.png"
    out.parent.mkdir()
    assert main(["visualize", "--checkpoint", str(ckpt), "--data-dir", fmnist_dir, "--keep", "0.7",
                 "--merge-keep", "0.5", "--num-images", "2", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _error_line(capsys, ["visualize", "--checkpoint", str(ckpt), "--keep", "1.5", "--out", str(out)], "keep")
