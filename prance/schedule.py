"""The walk over the blocks under a plan, written once (DESIGN.md §1, §2).

Which block reduces tokens, how many tokens survive, which residual width, heads and MLP
width each block runs: the physical and masked paths of :class:`~prance.model.MetaViT`, the
execution engine and the accounting (:func:`prance.count_macs`) all read it from here, so
they cannot disagree. Token counts depend on the plan only (never on pixel values), so the
walk needs no forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from prance.config import ViTConfig
from prance.plan import Plan, kept_count

#: ``tokens_after(block, tokens)``: a static reducer's token count after ``block`` (cls included).
TokensAfter = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockStep:
    """What every image does in one block; per-image fields are ``[B]`` int64 tensors.

    width:      residual width the block runs at (its stage's width).
    prev_width: width of the residual stream entering the block; differs from ``width`` only
                at a stage start, where the stage map carries it over.
    heads:      attention heads; ``mlp_hidden``: MLP hidden width.
    tokens_in:  tokens entering the block, cls included.
    prune_k:    patch tokens kept by the plan's pruning (``tokens_in - 1`` unless ``reduces_tokens``).
    merge_k:    patch tokens left after merging those.
    tokens_out: tokens leaving the block, cls included (``merge_k + 1``, or a static reducer's count).
    """

    block: int
    stage: int
    block_in_stage: int
    stage_depth: int
    width: torch.Tensor
    prev_width: torch.Tensor
    heads: torch.Tensor
    mlp_hidden: torch.Tensor
    tokens_in: torch.Tensor
    prune_k: torch.Tensor
    merge_k: torch.Tensor
    tokens_out: torch.Tensor

    @property
    def starts_stage(self) -> bool:
        """The first block of stages 1..: the stage map runs before it, tokens are reduced in it."""
        return self.stage > 0 and self.block_in_stage == 0

    @property
    def reduces_tokens(self) -> bool:
        """Whether the plan prunes / merges here (after attention, before the MLP) for some image."""
        return self.starts_stage and bool((self.merge_k < self.tokens_in - 1).any())

    @property
    def ends_stage(self) -> bool:
        return self.block_in_stage == self.stage_depth - 1


def stage_steps(config: ViTConfig, plan: Plan, stage: int, tokens_in: torch.Tensor | None = None,
                tokens_after: TokensAfter | None = None) -> list[BlockStep]:
    """The blocks of ``stage`` for every plan row, entering with ``tokens_in`` ``[B]`` tokens
    (cls included; default: every patch, which is right for stage 0)."""
    b, k = plan.batch_size, config.stage_depth
    n = torch.full((b,), config.num_patches + 1, dtype=torch.int64) if tokens_in is None else tokens_in
    width = plan.widths[:, stage]
    blocks = slice(stage * k, (stage + 1) * k)
    heads, hidden = plan.heads[:, blocks].unbind(1), plan.mlp_hidden(config)[:, blocks].unbind(1)
    steps = []
    for j in range(k):
        i = stage * k + j
        prune_k = merge_k = n - 1
        prev = width
        if stage > 0 and j == 0:
            prev = plan.widths[:, stage - 1]
            prune_k = kept_count(n - 1, plan.keep[:, stage])
            merge_k = kept_count(prune_k, plan.merge_keep[:, stage])
        out = merge_k + 1
        if tokens_after is not None:
            out = tokens_after(i, out)
        steps.append(BlockStep(i, stage, j, k, width, prev, heads[j], hidden[j], n, prune_k, merge_k, out))
        n = out
    return steps


def walk(config: ViTConfig, plan: Plan, tokens_after: TokensAfter | None = None) -> Iterator[BlockStep]:
    """Every block of the network under ``plan``, in order (``tokens_after``: a static reducer)."""
    n = None
    for stage in range(config.num_stages):
        for step in stage_steps(config, plan, stage, n, tokens_after):
            yield step
        n = step.tokens_out


__all__ = ["BlockStep", "TokensAfter", "stage_steps", "walk"]
