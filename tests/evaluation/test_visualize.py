from __future__ import annotations

import numpy as np
import torch

from prance import Plan
from prance.evaluation.visualize import visualize


def test_visualize_marks_kept_merged_and_pruned_patches(tiny, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16)
    plans = Plan.cat([
        Plan.uniform(tiny.config, [32] * 4, 4.0, keep=0.5),  # prune only
        Plan.uniform(tiny.config, [32] * 4, 4.0, merge_keep=0.5),  # merge only
        Plan.uniform(tiny.config, [32, 24, 16, 16], 4.0, keep=0.75, merge_keep=0.5),
    ])
    path = tmp_path / "tokens.png"
    owners = visualize(tiny, x, plans, path, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert path.stat().st_size > 0
    assert owners.shape == (3, 4, 16)
    # stage 0 keeps every patch as its own token
    assert all(sorted(owners[i, 0].tolist()) == list(range(16)) for i in range(3))
    # prune only: 16 → 8 → 4 → 2 tokens, each covering one patch, the rest pruned
    assert [(owners[0, s] >= 0).sum() for s in range(4)] == [16, 8, 4, 2]
    # merge only: nothing is pruned, tokens cover groups of patches
    assert (owners[1] >= 0).all()
    assert [len(np.unique(owners[1, s])) for s in range(4)] == [16, 8, 4, 2]
    # prune then merge: 16 → keep 12 → merge to 6 tokens
    assert len(np.unique(owners[2, 1][owners[2, 1] >= 0])) == 6 and (owners[2, 1] >= 0).sum() == 12
