"""Training under ``torchrun --nproc_per_node 2`` (DDP over gloo, two CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prance import create_model
from prance.training.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import REPO

MICRO = dict(embed_dim=32, depth=4, stage_depth=1, num_heads=2)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")]


def _torchrun(tmp_path: Path, argv: list[str]) -> Path:
    """Run ``prance ARGV`` on two processes; returns the folder where each rank left its final weights."""
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "training" / "ddp_worker.py"), str(ranks), *argv, "--threads", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ranks


def _assert_ranks_identical_and_saved(ranks: Path, out: Path) -> dict[str, torch.Tensor]:
    """Each rank trained on its own half of every batch; equal weights mean gradients were all-reduced."""
    r0, r1 = torch.load(ranks / "rank0.pt"), torch.load(ranks / "rank1.pt")
    saved = load_checkpoint(out / "last.pt")["model"]
    assert r0.keys() == r1.keys() == saved.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], saved[k]), k
    # Only rank 0 writes: one start line, no stray files.
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "start" for r in log) == 1 and log[0]["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "log.jsonl", "split.json"]
    return r0


def test_dense_training_on_two_processes(tmp_path: Path, fmnist_dir: str):
    out = tmp_path / "dense"
    ranks = _torchrun(tmp_path, ["train-dense", "--preset", "fmnist-micro", "--data-dir", fmnist_dir, "--limit", "256",
                                 "--val-limit", "64", "--batch-size", "32", "--epochs", "2", "--out", str(out)])
    _assert_ranks_identical_and_saved(ranks, out)
    start = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert start["steps_per_epoch"] == 256 // 2 // 32  # each rank reads its own half of the 256 images


def test_meta_training_on_two_processes_learns(tmp_path: Path, fmnist_dir: str):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "dense.pt", create_model("fmnist-micro", **MICRO), "dense")
    out = tmp_path / "meta"
    ranks = _torchrun(tmp_path, ["train-meta", "--init", str(tmp_path / "dense.pt"), "--data-dir", fmnist_dir,
                                 "--limit", "640", "--holdout", "0.2", "--val-limit", "64", "--batch-size", "32",
                                 "--epochs", "3", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "2",
                                 "--num-random", "1", "--min-keep", "0.5", "--elastic-heads", "--out", str(out)])
    weights = _assert_ranks_identical_and_saved(ranks, out)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["steps_per_epoch"] == 640 // 2 // 32
    steps = [r for r in log if r["event"] == "step"]
    assert steps[-1]["step"] == 3 * 10
    first, last = sum(r["loss_largest"] for r in steps[:3]) / 3, sum(r["loss_largest"] for r in steps[-3:]) / 3
    assert last < first - 0.05, (first, last)
    dense = load_checkpoint(tmp_path / "dense.pt")["model"]
    assert not torch.equal(weights["blocks.1.mlp.fc1.weight"], dense["blocks.1.mlp.fc1.weight"])


def test_selector_training_on_two_processes_keeps_ranks_in_step(tmp_path: Path, fmnist_dir: str):
    """Each rank rolls out its own images; averaged gradients and costs keep one selector and one λ."""
    from tests.training.test_selector_training import _meta

    out = tmp_path / "selector"
    ranks = _torchrun(tmp_path, ["train-selector", "--meta", str(_meta(tmp_path)), "--data-dir", fmnist_dir,
                                 "--limit", "128", "--holdout-limit", "64", "--batch-size", "16", "--updates", "4",
                                 "--hidden", "16", "--budget", "0.6", "--checkpoint-every", "2", "--out", str(out)])
    r0, r1 = torch.load(ranks / "rank0.pt"), torch.load(ranks / "rank1.pt")
    assert r0.keys() == r1.keys() and "lam" in r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    last = load_checkpoint(out / "last.pt")
    saved = last["selector"]["state"]
    for k, v in r0.items():
        if k != "lam":
            assert torch.equal(v, saved[k]), k
    assert torch.equal(r0["lam"], last["train_state"]["dual"]["lam"])
    assert not torch.equal(r0["lam"], torch.full_like(r0["lam"], 0.5))  # λ moved from its start
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "start" for r in log) == 1 and log[0]["world_size"] == 2
    assert (out / "adaptive.pt").is_file()
