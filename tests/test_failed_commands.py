"""Failed commands leave nothing new behind, keep ratios and devices are checked like every other flag.

(More bad input through the command line is in tests/test_bad_input.py; following the checkpoint's
data set is in tests/evaluation/test_follow_checkpoint.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prance import create_model
from prance.cli import main
from prance.files import removed_if_left_empty
from prance.training.checkpoint import save_checkpoint
from tests.conftest import TINY, cli_error

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "tiny.pt", create_model("fmnist-tiny", **TINY), "dense")


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- no new empty folder
MISSING = "{tmp}/missing.pt"
# Each fails on its input after the arguments parsed and the output folder was created.
FAILURES = {
    "train-dense": (["train-dense", "--preset", "fmnist-micro", "--data", "folder", "--data-dir", "{tmp}/no-data",
                     "--out", "{out}"], "dataset root"),
    "train-meta": (["train-meta", "--preset", "fmnist-micro", "--data", "folder", "--data-dir", "{tmp}/no-data",
                    "--out", "{out}"], "dataset root"),
    "evaluate": (["evaluate", "--checkpoint", MISSING, "--out", "{out}/eval.json"], "does not exist"),
    "evaluate-data": (["evaluate", "--checkpoint", "{ckpt}", "--data", "folder", "--data-dir", "{tmp}/no-data",
                       "--out", "{out}/eval.json"], "dataset root"),
    "sweep": (["sweep", "--checkpoint", MISSING, "--out", "{out}"], "does not exist"),
    "visualize": (["visualize", "--checkpoint", MISSING, "--out", "{out}/tokens.png"], "does not exist"),
    "visualize-keep": (["visualize", "--checkpoint", "{ckpt}", "--keep", "0", "--out", "{out}/tokens.png"], "--keep"),
    "bench": (["bench", "--checkpoint", MISSING, "--out", "{out}"], "does not exist"),
}


@pytest.mark.parametrize("case", FAILURES)
def test_a_failed_command_leaves_no_new_folder(capsys, tmp_path: Path, checkpoint: Path, case: str):
    argv, fragment = FAILURES[case]
    out = tmp_path / "new" / "deeper"
    before = _tree(tmp_path)
    cli_error(capsys, [a.format(tmp=tmp_path, out=out, ckpt=checkpoint) for a in argv], fragment)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("case", ["train-dense", "sweep", "evaluate"])
def test_a_failed_command_keeps_an_output_folder_that_existed(capsys, tmp_path: Path, checkpoint: Path, case: str):
    argv, fragment = FAILURES[case]
    out = tmp_path / "mine"
    out.mkdir()
    cli_error(capsys, [a.format(tmp=tmp_path, out=out, ckpt=checkpoint) for a in argv], fragment)
    assert out.is_dir()


def test_only_new_folders_that_are_still_empty_are_removed(tmp_path: Path):
    kept = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), removed_if_left_empty([kept / "c", tmp_path / "x" / "y"]):
        (kept / "c").mkdir(parents=True)
        (kept / "note.txt").write_text("written before the failure")
        (tmp_path / "x" / "y").mkdir(parents=True)
        raise RuntimeError("the command failed")
    assert _tree(tmp_path) == ["a", "a/b", "a/b/note.txt"]
    with removed_if_left_empty([tmp_path / "ok"]):  # success: nothing is removed
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()


# ----------------------------------------------------------------------------- keep ratios
@pytest.mark.parametrize("flag", ["--keep", "--merge-keep"])
@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "inf", "0.05"])
def test_visualize_refuses_keep_ratios_outside_the_search_space(capsys, tmp_path: Path, checkpoint: Path, flag,
                                                                value):
    """0.05 is below the search space's min_keep (0.1); 0 used to be read as "no reduction"."""
    cli_error(capsys, ["visualize", "--checkpoint", checkpoint, flag, value, "--out", tmp_path / "t.png"],
               f"{flag} {float(value)} must be in [0.1, 1]")
    assert not (tmp_path / "t.png").exists()


# ----------------------------------------------------------------------------- --device
@NO_GPU
@pytest.mark.parametrize("command", [
    ["evaluate", "--checkpoint", "{ckpt}"],
    ["sweep", "--checkpoint", "{ckpt}", "--out", "{tmp}/s"],
    ["visualize", "--checkpoint", "{ckpt}", "--out", "{tmp}/t.png"],
])
def test_cuda_without_a_gpu_is_one_error_line(capsys, tmp_path: Path, checkpoint: Path, command):
    argv = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in command]
    cli_error(capsys, [*argv, "--device", "cuda"], "--device cuda: no CUDA device is visible", "use --device cpu")
    cli_error(capsys, [*argv, "--device", "tpu"], "--device 'tpu' is not a device")
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_on_cuda_matches_cpu(tmp_path: Path, checkpoint: Path, fmnist_dir: str):
    results = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data-dir", fmnist_dir, "--limit", "256",
                     "--plan", "random:2", "--device", device, "--out", str(out)]) == 0
        results[device] = json.loads(out.read_text())
    assert results["cuda"]["device"].startswith("cuda")
    for cpu, gpu in zip(results["cpu"]["rows"], results["cuda"]["rows"]):
        assert gpu["images"] == cpu["images"] == 256 and gpu["macs"] == cpu["macs"]
        assert abs(gpu["top1"] - cpu["top1"]) <= 100 * 2 / 256  # at most a couple of near-ties flip
