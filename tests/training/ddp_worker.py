"""Run by test_distributed.py under torchrun: a prance training command, then each rank saves its weights.

``python ddp_worker.py RANKS_DIR COMMAND ARGS...``: the command runs exactly as ``prance`` runs
it; only the training loop (and, for the selector, each PPO update and dual step) is wrapped so
that every rank writes the weights it holds to ``RANKS_DIR/rank{r}.pt`` (outside the run folder,
which only rank 0 may write).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from prance.cli import main
from prance.selector.budget import DualAscent
from prance.training import dense, meta, run
from prance.training import selector as selector_training


def _keep_rank_weights(ranks_dir: Path):
    def loop(task, *args, **kwargs):
        summary = run.train_loop(task, *args, **kwargs)
        weights = {k: v.detach().cpu() for k, v in task.model.state_dict().items()}
        torch.save(weights, ranks_dir / f"rank{os.environ['RANK']}.pt")
        return summary

    return loop


def _keep_rank_selector(ranks_dir: Path):
    """After every PPO update (and dual step), each rank writes its selector weights and λ."""
    update, dual_step = selector_training.ppo_update, DualAscent.step
    held: dict[str, torch.Tensor] = {}

    def save() -> None:
        torch.save(held, ranks_dir / f"rank{os.environ['RANK']}.pt")

    def ppo(agent, *args, **kwargs):
        stats = update(agent, *args, **kwargs)
        held.update({f"agent.{k}": v.detach().cpu().clone() for k, v in agent.state_dict().items()})
        save()
        return stats

    def dual(self, *args, **kwargs):
        dual_step(self, *args, **kwargs)
        held["lam"] = self.lam.clone()
        save()

    selector_training.ppo_update, DualAscent.step = ppo, dual


if __name__ == "__main__":
    ranks = Path(sys.argv[1])
    dense.train_loop = meta.train_loop = _keep_rank_weights(ranks)
    _keep_rank_selector(ranks)
    sys.exit(main(sys.argv[2:]))
