"""Prune-then-merge of packed rows, each image with its own counts (DESIGN.md §2, §5).

The engine keeps a group's tokens packed, image after image, one row per token. The masked
token ops (:func:`prance.tokens.ops.reduce_masked`) would need them padded to ``[G, n, C]``
and compute on every padded row: similarity, several ``where`` and a scatter over all of
them, then a compaction. Here only what merging needs is computed on the padded grid (the
cosine similarity, which is a batched matrix product, and the choice of each token's
destination); the merge itself touches just the merged rows and the rows they go into.

The arithmetic is that of the masked ops, in the same order: the same ranking
(:func:`~prance.tokens.ops.top_alive`), the same normalised similarity matrix, each kept
token's size-weighted sum built by adding its merged tokens in token order, one division.
So every image keeps and merges the same tokens and gets the same values, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prance.tokens import ops as token_ops


def reduce_packed(x: torch.Tensor, size: torch.Tensor, counts: torch.Tensor, importance: torch.Tensor,
                  prune_k: torch.Tensor, merge_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Survivors ``(x [T', C], size [T'])`` of reducing every image of packed rows ``x [T, C]``.

    Image ``g`` owns ``counts[g]`` consecutive rows (its cls token first); ``importance``
    ``[G, ≥ n - 1]`` ranks its patch tokens. It keeps its ``prune_k[g]`` most important
    patches, then merges those down to ``merge_k[g]`` (each other survivor folded into its most
    similar kept token). Survivors stay in order, so image ``g`` ends with ``merge_k[g] + 1`` rows.
    """
    g, n = len(counts), int(counts.max())
    dev = counts.device
    starts = counts.cumsum(0) - counts  # row of each image's cls token
    importance = importance[:, : n - 1]
    alive = torch.arange(n - 1, device=dev) < (counts - 1)[:, None]  # real patch tokens, [G, n-1]
    if not bool((prune_k == counts - 1).all()):
        alive = token_ops.top_alive(importance, alive, prune_k)
    keep = token_ops.top_alive(importance, alive, merge_k)
    image, token = torch.cat([torch.ones_like(keep[:, :1]), keep], 1).nonzero(as_tuple=True)  # cls always stays
    rows = starts[image] + token  # survivors, image by image in token order (ascending)
    out_x, out_size = x.index_select(0, rows), size.index_select(0, rows)
    drop = alive & ~keep
    if not bool(drop.any()):
        return out_x, out_size
    image, token = drop.nonzero(as_tuple=True)  # merged tokens, image by image in token order
    patches = _padded_patches(x, counts, n)
    unit = F.normalize(patches, dim=-1)
    sim = (unit @ unit.transpose(1, 2)).masked_fill(~keep[:, None, :], float("-inf"))
    src = starts[image] + 1 + token
    dst = starts[image] + 1 + sim[image, token].argmax(-1)
    into, slot = torch.unique(dst, return_inverse=True)  # kept rows that receive, and where each merged row goes
    s_src, s_into = size.index_select(0, src), size.index_select(0, into)
    total = s_into.index_add(0, slot, s_src)
    weighted = (x.index_select(0, into) * s_into[:, None]).index_add_(0, slot, x.index_select(0, src) * s_src[:, None])
    at = torch.searchsorted(rows, into)  # where the receiving rows sit among the survivors
    out_x[at] = weighted / total[:, None]
    out_size[at] = total
    return out_x, out_size


def _padded_patches(x: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """``[G, n - 1, C]`` every image's patch tokens, zero past its own (a view when all counts are ``n``)."""
    g = len(counts)
    if bool((counts == n).all()):
        return x.view(g, n, -1)[:, 1:]
    valid = torch.arange(n, device=counts.device) < counts[:, None]
    padded = x.new_zeros(g, n, x.shape[1])
    padded[valid] = x
    return padded[:, 1:]


__all__ = ["reduce_packed"]
