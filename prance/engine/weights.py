"""The meta-network's weights sliced to the sizes a plan asks for, cached (DESIGN.md §5).

First-k slicing makes every width, head count and MLP width a prefix of the full weights.
Slices are cached per size and weight version, so repeated plans pay no slicing and an
executor stays correct when the model's weights change in place.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from prance.engine.groups import _Group
from prance.model.layers import Block


class WeightSlices:
    """Sliced weights for one executor, keyed by what they are for (layer, block, sizes)."""

    def __init__(self) -> None:
        self._views: dict[tuple, tuple[tuple, tuple[torch.Tensor, ...]]] = {}

    def cached(self, key: tuple, source: torch.Tensor, make: Callable[[], tuple[torch.Tensor, ...]],
               copies: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, ...]:
        """Weight slices for ``key``, made once; stamped with the storage of ``source``.

        Slices that are views read the parameters' current values whatever happens to them in
        place. Slices that are copies (the QKV rows of fewer heads are not one strided view)
        name the tensors they copy in ``copies``: their in-place versions join the stamp, so
        after ``load_state_dict`` or an optimiser step the copy is made again.
        """
        stamp = (source.data_ptr(), *(_version(t) for t in copies))
        hit = self._views.get(key)
        if hit is None or hit[0] != stamp or None in stamp:
            hit = self._views[key] = (stamp, make())
        return hit[1]

    def qkv(self, i: int, blk: Block, width: int, heads: int) -> tuple[torch.Tensor, ...]:
        qkv = blk.attn.qkv
        copies = () if heads == blk.attn.num_heads else tuple(t for t in (qkv.weight, qkv.bias) if t is not None)
        return self.cached(("qkv", i, width, heads), qkv.weight, lambda: blk.attn.qkv_params(width, heads), copies)

    def proj(self, i: int, blk: Block, width: int, heads: int) -> tuple[torch.Tensor, ...]:
        p, c = blk.attn.proj, heads * blk.attn.head_dim
        return self.cached(("proj", i, width, heads), p.weight, lambda: (p.weight[:width, :c], p.bias[:width]))

    def fc(self, i: int, blk: Block, width: int, hidden: int) -> tuple[torch.Tensor, ...]:
        m = blk.mlp
        return self.cached(("mlp", i, width, hidden), m.fc1.weight, lambda: (
            m.fc1.weight[:hidden, :width], m.fc1.bias[:hidden], m.fc2.weight[:width, :hidden], m.fc2.bias[:width]))

    def group_norm(self, key: tuple, norm: torch.nn.LayerNorm, g: _Group) -> torch.Tensor:
        """LayerNorm of a group's rows, each over its own active channels."""
        if not g.mixed:
            return self.norm(key, norm, g.x)
        return _masked_layer_norm(g.x, *g.masks(), *self.norm_params(key, norm, g.width), norm.eps)

    def norm(self, key: tuple, norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        return F.layer_norm(x, (w,), *self.norm_params(key, norm, w), norm.eps)

    def norm_params(self, key: tuple, norm: torch.nn.LayerNorm, w: int) -> tuple[torch.Tensor, ...]:
        return self.cached((*key, w), norm.weight, lambda: (norm.weight[:w], norm.bias[:w]))


def _version(t: torch.Tensor) -> int | None:
    """In-place version counter of ``t``; None for inference tensors, which have none (never cached)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _masked_layer_norm(x: torch.Tensor, width: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of zero-padded rows over their first ``width`` channels (``mask`` marks them).

    Shared by a mixed group's norms here and the executor's final norm of the cls tokens.
    """
    mean = x.sum(-1, keepdim=True) / width
    centred = (x - mean) * mask
    var = (centred * centred).sum(-1, keepdim=True) / width
    return (centred * torch.rsqrt(var + eps) * weight + bias) * mask
