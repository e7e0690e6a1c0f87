"""``prance train-meta`` under ``torchrun --nproc_per_node 2`` (DDP over gloo, two CPU processes)."""

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
from prance.training.meta import DUMP_RANKS_ENV

MICRO = dict(embed_dim=32, depth=4, stage_depth=1, num_heads=2)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_process_training_keeps_ranks_identical_and_learns(tmp_path: Path, fmnist_dir: str):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "dense.pt", create_model("fmnist-micro", **MICRO), "dense")
    out = tmp_path / "meta"
    env = {**os.environ, DUMP_RANKS_ENV: "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "prance", "train-meta", "--init", str(tmp_path / "dense.pt"), "--data-dir", fmnist_dir,
           "--limit", "800", "--holdout", "0.2", "--val-limit", "64", "--batch-size", "32", "--epochs", "3",
           "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "2", "--num-random", "1", "--min-keep", "0.5",
           "--elastic-heads", "--device", "cpu", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = log[0]
    assert start["event"] == "start" and start["world_size"] == 2
    assert start["steps_per_epoch"] == 640 // 2 // 32  # each rank sees its own half of the 640 training images
    steps = [r for r in log if r["event"] == "step"]
    assert steps[-1]["step"] == 3 * 10
    first, last = sum(r["loss_largest"] for r in steps[:3]) / 3, sum(r["loss_largest"] for r in steps[-3:]) / 3
    assert last < first - 0.05, (first, last)

    # Both ranks end with the same weights, and rank 0's checkpoint holds them.
    r0, r1 = torch.load(out / "rank0_final.pt"), torch.load(out / "rank1_final.pt")
    saved = load_checkpoint(out / "last.pt", kind="meta")["model"]
    assert r0.keys() == r1.keys() == saved.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], saved[k]), k
    dense = load_checkpoint(tmp_path / "dense.pt")["model"]
    assert not torch.equal(r0["blocks.1.mlp.fc1.weight"], dense["blocks.1.mlp.fc1.weight"])
    # Only rank 0 writes the log and checkpoints (no second "start" line, no stray files).
    assert sum(r["event"] == "start" for r in log) == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "log.jsonl", "rank0_final.pt",
                                                     "rank1_final.pt"]
