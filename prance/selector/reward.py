"""The Result-to-Go reward of one decision (DESIGN.md §3).

Step ``t``'s reward is read off the run that finishes the network from stage ``t`` with the
stages not yet decided at full size. It has three parts:

* accuracy, relative to the dense model: 1 when the run's prediction is as correct as the
  dense model's, 0 when the dense model is right and the run is wrong (an image the dense
  model gets wrong costs nothing to get wrong, so it is free to be cheap);
* minus ``λ ·`` the run's MACs as a fraction of the dense model's (selector included); λ is
  not a hand-set weight but the Lagrange multiplier of the budget (see :mod:`.budget`);
* minus ``keep_penalty ·`` the fraction of the tokens entering the decided stage that it keeps
  (its own decision, not what earlier stages removed; a small nudge towards fewer tokens when
  accuracy and MACs are indifferent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepReward:
    """Per-image parts of a step's reward, each ``[B]``."""

    accuracy: torch.Tensor  # 1 / 0 as defined above
    macs_ratio: torch.Tensor  # MACs of the completed run / dense MACs
    kept: torch.Tensor  # fraction of patch tokens kept by the decided stage

    def total(self, lam: torch.Tensor | float, keep_penalty: float) -> torch.Tensor:
        """``accuracy − λ · macs_ratio − keep_penalty · kept``; ``lam`` may be one value or one per image."""
        return self.accuracy - lam * self.macs_ratio - keep_penalty * self.kept


def relative_accuracy(logits: torch.Tensor, labels: torch.Tensor, dense_correct: torch.Tensor) -> torch.Tensor:
    """``[B]`` 0 where the dense model is right and ``logits`` are wrong, else 1."""
    correct = logits.argmax(-1) == labels
    return (~(dense_correct & ~correct)).to(logits.dtype)


def step_reward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    dense_correct: torch.Tensor,
    macs: torch.Tensor,
    dense_macs: float,
    kept: torch.Tensor,
) -> StepReward:
    """The parts of one step's reward from its completed run (``macs`` per image, selector included)."""
    dtype, dev = torch.float32, logits.device  # rewards in float32 whatever the network's precision
    return StepReward(
        relative_accuracy(logits, labels, dense_correct).to(dtype),
        macs.to(device=dev, dtype=dtype) / dense_macs,
        kept.to(device=dev, dtype=dtype),
    )


__all__ = ["StepReward", "relative_accuracy", "step_reward"]
