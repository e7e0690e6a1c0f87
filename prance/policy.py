"""What a selector sees and returns: the per-stage interface of adaptive execution (DESIGN.md §3, §5).

Before each stage ``s >= 1`` the executing network makes **one batched call** to a policy
with a :class:`StageState` of every image and gets back a :class:`~prance.plan.Plan` whose
stage-``s`` entries (width, keep ratios, the MLP ratios and heads of the stage's blocks) are
that image's decisions. Entries of other stages are ignored, so a policy may return any
plan. Stages not decided yet run at their defaults, which is what Result-to-Go needs.

The state offers both signals DESIGN.md §3 names: the previous block's keys averaged over
their channels, one number per token (the paper's state), and the cls token's features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from prance.plan import Plan


@dataclass
class StageState:
    """Every image's situation just before stage ``stage`` is decided.

    cls:       ``[B, D]`` cls features entering the stage, zero beyond each image's width.
    key_means: ``[B, N0]`` the previous block's keys averaged over the channels of its active
               heads, one value per surviving token (cls first, in token order), zero-padded
               to the initial token count ``N0``.
    tokens:    ``[B]`` surviving tokens, cls included.
    widths:    ``[B]`` residual width of the stage that just ended.
    budget:    ``[B]`` float64, each image's budget slot (e.g. target MACs as a fraction of
               dense) as given to ``run`` / ``rollout``; NaN where none was given (DESIGN.md
               §3, one selector for many budgets).

    All are ordinary tensors (never inference tensors, never attached to a graph), so a
    buffer of states can be fed to a policy network with autograd later.
    """

    stage: int
    cls: torch.Tensor
    key_means: torch.Tensor
    tokens: torch.Tensor
    widths: torch.Tensor
    budget: torch.Tensor


class StagePolicy(Protocol):
    """A selector: one batched decision per stage."""

    def __call__(self, state: StageState) -> Plan: ...


__all__ = ["StageState", "StagePolicy"]
