"""Run by test_distributed.py under torchrun: a prance training command, then each rank saves its weights.

``python ddp_worker.py RANKS_DIR COMMAND ARGS...``: the command runs exactly as ``prance`` runs
it; only the training loop is wrapped so that every rank, after training, writes the weights it
holds to ``RANKS_DIR/rank{r}.pt`` (outside the run folder, which only rank 0 may write).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from prance.cli import main
from prance.training import dense, meta, run


def _keep_rank_weights(ranks_dir: Path):
    def loop(task, *args, **kwargs):
        summary = run.train_loop(task, *args, **kwargs)
        weights = {k: v.detach().cpu() for k, v in task.model.state_dict().items()}
        torch.save(weights, ranks_dir / f"rank{os.environ['RANK']}.pt")
        return summary

    return loop


if __name__ == "__main__":
    ranks = Path(sys.argv[1])
    dense.train_loop = meta.train_loop = _keep_rank_weights(ranks)
    sys.exit(main(sys.argv[2:]))
