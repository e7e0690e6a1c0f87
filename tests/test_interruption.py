"""A training run killed with SIGKILL right after its first checkpoint, then continued with --resume,
ends with exactly the weights of an uninterrupted run with the same seed (CPU, one thread: bit-exact,
tolerance 0).

Real processes through the real CLI (``python -m prance``) on a small slice of the real Fashion-MNIST.
The uninterrupted reference runs at the same time as the run that gets killed (one thread each).
In-process interruptions (an exception between steps, ``stop_after``) are tested in
tests/training/test_dense.py and tests/training/test_meta.py; interrupted checkpoint writes in
tests/training/test_checkpoint.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prance.training.checkpoint import load_checkpoint
from tests.conftest import REPO

TIMEOUT = 600  # seconds per process; the machine may be busy


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "prance", *argv], stdout=f, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()


def _kill_after_first_checkpoint(proc: subprocess.Popen, last: Path, log: Path) -> None:
    """SIGKILL ``proc`` as soon as ``last`` exists (it appears by an atomic rename, so it is complete)."""
    deadline = time.monotonic() + TIMEOUT
    while not last.exists():
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k}: max difference {(wa[k] - wb[k]).abs().max().item()}"


@pytest.mark.slow
def test_train_dense_killed_after_its_first_checkpoint_resumes_to_the_same_weights(tmp_path: Path, fmnist_dir):
    common = ["--preset", "fmnist-micro", "--data-dir", fmnist_dir, "--limit", "256", "--val-limit", "64",
              "--batch-size", "64", "--epochs", "3", "--warmup-epochs", "0.5", "--seed", "3", "--threads", "1"]
    straight, run = tmp_path / "straight", tmp_path / "killed"
    reference = _start(["train-dense", *common, "--out", str(straight)], tmp_path / "straight.log")
    victim = _start(["train-dense", *common, "--out", str(run)], tmp_path / "killed.log")
    _kill_after_first_checkpoint(victim, run / "last.pt", tmp_path / "killed.log")
    saved = load_checkpoint(run / "last.pt", kind="dense")
    assert 1 <= saved["train_state"]["epoch"] < 3  # killed mid-run, the last checkpoint intact
    _finish(reference, tmp_path / "straight.log")

    # No flags but --resume: the run's own settings come from its last.pt.
    resumed = _start(["train-dense", "--resume", "--threads", "1", "--out", str(run)], tmp_path / "resumed.log")
    _finish(resumed, tmp_path / "resumed.log")
    assert load_checkpoint(run / "last.pt")["train_state"]["epoch"] == 3
    _assert_same_weights(straight / "last.pt", run / "last.pt")
    _assert_same_weights(straight / "best.pt", run / "best.pt")


@pytest.mark.slow
def test_train_meta_killed_after_its_first_checkpoint_resumes_to_the_same_weights(tmp_path: Path, fmnist_dir):
    common = ["--preset", "fmnist-micro", "--data-dir", fmnist_dir, "--limit", "256", "--val-limit", "32",
              "--batch-size", "16", "--max-steps", "8", "--checkpoint-every", "2", "--warmup-steps", "2",
              "--log-every", "2", "--seed", "3", "--threads", "1", "--device", "cpu"]
    straight, run = tmp_path / "straight", tmp_path / "killed"
    reference = _start(["train-meta", *common, "--out", str(straight)], tmp_path / "straight.log")
    victim = _start(["train-meta", *common, "--out", str(run)], tmp_path / "killed.log")
    _kill_after_first_checkpoint(victim, run / "last.pt", tmp_path / "killed.log")
    assert 2 <= load_checkpoint(run / "last.pt", kind="meta")["train_state"]["step"] < 8
    _finish(reference, tmp_path / "straight.log")

    resumed = _start(["train-meta", *common, "--resume", "--out", str(run)], tmp_path / "resumed.log")
    _finish(resumed, tmp_path / "resumed.log")
    assert load_checkpoint(run / "last.pt")["train_state"]["step"] == 8
    _assert_same_weights(straight / "last.pt", run / "last.pt")


_WRITER = """
import sys, torch
from prance import create_model
from prance.training.checkpoint import save_checkpoint
model = create_model("fmnist-tiny")  # 5 MB: each write takes a few milliseconds
for i in range(10**6):
    torch.manual_seed(i)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    save_checkpoint(sys.argv[1], model, "dense", metrics={"i": i})
    print(i, flush=True)
"""


@pytest.mark.parametrize("when", ["mid-write", "any-time"])
def test_sigkill_while_checkpoints_are_written_never_leaves_a_broken_file(tmp_path: Path, when: str):
    """The atomic write under a real SIGKILL (not an exception): the target always loads and holds one
    complete version. "mid-write" kills while a temporary file exists (a write is under way); a killed
    write may leave a hidden ``.last.pt.*.tmp`` beside the target, never a torn target."""
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + TIMEOUT
    while not path.exists() or (when == "mid-write" and not any(tmp_path.glob(".last.pt.*.tmp"))):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.001)
    if when == "any-time":
        time.sleep(0.17)
    os.kill(proc.pid, signal.SIGKILL)
    written = proc.communicate(timeout=60)[0].split()
    ckpt = load_checkpoint(path, kind="dense")
    i = ckpt["metrics"]["i"]
    assert int(written[-1]) <= i <= int(written[-1]) + 1 if written else i in (0, 1)  # last finished or the one after
    torch.manual_seed(i)  # the weights are exactly version i's
    first = next(iter(ckpt["model"].values()))
    assert torch.equal(first, torch.nn.init.normal_(torch.empty_like(first)))
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["last.pt"]
