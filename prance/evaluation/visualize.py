"""Which patches survive, and which were merged together, after every stage (a PNG grid).

One row per image: the input, then one panel per stage. Pruned patches are dimmed; patches
merged into one token share a colour tint; patches still carried by their own token are shown
as they are. Runs the masked path with source tracking, so each image keeps its own plan.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from prance.model.metavit import MetaViT
from prance.plan import Plan
from prance.tokens.state import TokenState


def stage_assignments(trace: list[TokenState]) -> np.ndarray:
    """``[B, S, P]`` id of the token covering each original patch after each stage (-1: pruned).

    A merged token's id is shared by all its patches; ids are token positions at that stage.
    """
    out = []
    for state in trace:
        source = state.source[:, 1:].clone()  # patch tokens only, [B, N-1, P]
        if state.alive is not None:
            source &= state.alive[:, 1:, None]
        covered = source.any(1)
        owner = source.to(torch.int8).argmax(1)  # [B, P]
        out.append(torch.where(covered, owner, -1))
    return torch.stack(out, 1).cpu().numpy()


def _to_rgb(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    img = image.detach().cpu().float()
    img = img * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    img = img.clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def render_panel(rgb: np.ndarray, owners: np.ndarray, patch: int, seed: int = 0) -> np.ndarray:
    """The image with pruned patches dimmed and merged groups tinted one colour each."""
    grid = rgb.shape[0] // patch
    owner_grid = owners.reshape(grid, grid)
    ids, counts = np.unique(owner_grid[owner_grid >= 0], return_counts=True)
    merged = set(ids[counts > 1].tolist())
    colours = np.random.default_rng(seed).uniform(0.2, 1.0, size=(owners.size + 1, 3))
    panel = rgb.copy()
    for r in range(grid):
        for c in range(grid):
            tile = panel[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch]
            owner = owner_grid[r, c]
            if owner < 0:
                tile *= 0.15
            elif owner in merged:
                tile[:] = 0.45 * tile + 0.55 * colours[owner]
    return panel


@torch.inference_mode()
def visualize(
    model: MetaViT,
    images: torch.Tensor,
    plan: Plan,
    path: str | os.PathLike,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    titles: list[str] | None = None,
) -> np.ndarray:
    """Write the grid to ``path`` (PNG); returns the ``[B, S, P]`` patch→token assignments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace: list[TokenState] = []
    logits = model(images, plan, mode="masked", trace=trace)
    owners = stage_assignments(trace)
    b, s = owners.shape[:2]
    fig, axes = plt.subplots(b, s + 1, figsize=(1.6 * (s + 1), 1.6 * b), squeeze=False)
    for i in range(b):
        rgb = _to_rgb(images[i], mean, std)
        axes[i, 0].imshow(rgb)
        label = f"pred {int(logits[i].argmax())}" if titles is None else titles[i]
        axes[i, 0].set_title(label, fontsize=7)
        for st in range(s):
            panel = render_panel(rgb, owners[i, st], model.config.patch_size, seed=i)
            kept = int((np.unique(owners[i, st]) >= 0).sum())
            axes[i, st + 1].imshow(panel)
            axes[i, st + 1].set_title(f"stage {st}: {kept} tok", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return owners
