"""The Result-to-Go reward of one decision (DESIGN.md §3).

Step ``t``'s outcome is read off the run that finishes the network from stage ``t`` with the
stages not yet decided at full size. It has two parts, and the step's reward one more:

* accuracy, relative to the dense model: 1 when the run's prediction is as correct as the
  dense model's, 0 when the dense model is right and the run is wrong (an image the dense
  model gets wrong costs nothing to get wrong, so it is free to be cheap);
* minus ``λ ·`` the run's MACs as a fraction of the dense model's (selector included); λ is
  not a hand-set weight but the Lagrange multiplier of the budget (see :mod:`.budget`);
* minus ``keep_penalty ·`` the fraction of the tokens entering the decided stage that it keeps
  (its own decision, not what earlier stages removed; a small nudge towards fewer tokens when
  accuracy and MACs are indifferent).

How the outcomes become the rewards PPO sums (``kind``):

* ``"outcome"`` (the paper's): step ``t``'s reward is its own outcome. With γ = 1 a decision's
  return adds up the outcomes of every later step, runs that finished at full size, so the
  sum is not what the deployed run scores and earlier stages pay their MACs once per later step.
* ``"gain"`` (the default): step ``t``'s reward is its outcome minus the previous step's, the
  full-size run standing before step 1. The outcomes telescope: every decision's return is the decided run's
  outcome (what is deployed and what the budget constrains) minus the outcome its state had
  already secured, which its action cannot change, i.e. the Result-to-Go outcome serves as a
  potential (Ng et al., 1999) and still tells each step at once what it changed. On fmnist-tiny
  (merge, budget 0.5, 300 updates, 3 seeds) it reached 90.37 % on the holdout against 90.11 %,
  ahead on every seed (+0.17 to +0.33 pt).

The keep penalty is the step's own, in both.
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

    def outcome(self, lam: torch.Tensor | float) -> torch.Tensor:
        """``accuracy − λ · macs_ratio``; ``lam`` may be one value or one per image."""
        return self.accuracy - lam * self.macs_ratio

    def total(self, lam: torch.Tensor | float, keep_penalty: float) -> torch.Tensor:
        """The outcome less ``keep_penalty · kept``: the step's reward in the paper's form."""
        return self.outcome(lam) - keep_penalty * self.kept


REWARD_KINDS = ("outcome", "gain")


def step_rewards(parts: list[StepReward], lam: torch.Tensor | float, keep_penalty: float, kind: str,
                 full_macs_ratio: float) -> torch.Tensor:
    """``[T, B]`` rewards of a rollout's steps from their parts (``kind`` as in the module docstring).

    ``full_macs_ratio`` is the full-size run's MACs over the dense MACs (selector included): the
    outcome before step 1 in ``"gain"``, whose accuracy term is 1 (the dense model itself)."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"reward kind {kind!r} is none of {REWARD_KINDS}")
    outcomes = [p.outcome(lam) for p in parts]
    if kind == "gain":
        before = [1.0 - lam * full_macs_ratio + torch.zeros_like(outcomes[0]), *outcomes[:-1]]
        outcomes = [now - prev for now, prev in zip(outcomes, before)]
    return torch.stack([o - keep_penalty * p.kept for o, p in zip(outcomes, parts)])


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


__all__ = ["REWARD_KINDS", "StepReward", "relative_accuracy", "step_reward", "step_rewards"]
