"""Static token-reduction baselines (DESIGN.md §6), written from their papers.

* :class:`EViTReducer` — EViT (Liang et al., ICLR 2022): at a few fixed blocks keep the
  patch tokens the cls token attends to most; optionally fuse the rest into one token.
* :class:`ToMeReducer` — ToMe (Bolya et al., ICLR 2023): merge ``r`` tokens in every block
  by bipartite soft matching on the keys.

Both are *reducers*, the small interface the meta-network calls in physical mode, once per
block, after the attention residual and before the MLP:

* ``reducer(block, state, attn, keys) -> TokenState`` with ``attn`` the softmax attention
  probabilities ``[B, H, N, N]`` (may be None where ``needs_attn(block)`` is False) and
  ``keys`` ``[B, H, N, head_dim]`` of that block's attention;
* ``needs_attn(block)``: whether ``attn`` must be materialised at that block;
* ``tokens_after(block, n_tokens)``: tokens (cls included) after the block, given ``n_tokens``
  entering it — exactly what ``__call__`` returns;
* ``extra_macs(block, n_tokens, width, head_dim)``: MACs per sample of the reduction's own
  matmuls at that block (``width`` the residual width, ``head_dim`` the key width).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from prance.errors import PranceError
from prance.plan import kept_count
from prance.tokens.ops import take_tokens, bipartite_soft_matching, cls_importance, merge_state, prune, topk_split
from prance.tokens.state import TokenState


class Reducer(Protocol):
    """What the model calls to reduce tokens inside a block (physical mode)."""

    def __call__(self, block: int, state: TokenState, attn: torch.Tensor | None,
                 keys: torch.Tensor | None) -> TokenState: ...

    def needs_attn(self, block: int) -> bool: ...

    def tokens_after(self, block: int, n_tokens: int) -> int: ...

    def extra_macs(self, block: int, n_tokens: int, width: int, head_dim: int | None = None) -> int: ...


def _physical(state: TokenState, name: str) -> None:
    if state.masked:
        raise PranceError(f"the {name} baseline runs in physical mode only; run the model without token masks")


class EViTReducer:
    """Keep cls + the ``kept_count(n, keep_rate)`` most attended patch tokens at ``blocks``.

    With ``fuse`` the dropped tokens become one extra token appended at the end: their mean
    weighted by cls attention, of size the sum of theirs. Later blocks treat it as a patch token.
    """

    def __init__(self, keep_rate: float, blocks: Sequence[int] = (3, 6, 9), fuse: bool = False) -> None:
        if not 0 < keep_rate <= 1:
            raise PranceError(f"EViT keep_rate must be in (0, 1], got {keep_rate}")
        self.keep_rate = float(keep_rate)
        self.blocks = frozenset(int(b) for b in blocks)
        self.fuse = fuse

    def __repr__(self) -> str:
        return f"EViTReducer(keep_rate={self.keep_rate}, blocks={sorted(self.blocks)}, fuse={self.fuse})"

    def _kept(self, block: int, n_tokens: int) -> int:
        """Patch tokens kept at ``block`` (all of them outside the reduction blocks)."""
        n = n_tokens - 1
        return int(kept_count(n, self.keep_rate)) if block in self.blocks and n > 0 else n

    def needs_attn(self, block: int) -> bool:
        return block in self.blocks and self.keep_rate < 1

    def tokens_after(self, block: int, n_tokens: int) -> int:
        k = self._kept(block, n_tokens)
        return 1 + k + int(self.fuse and k < n_tokens - 1)

    def extra_macs(self, block: int, n_tokens: int, width: int, head_dim: int | None = None) -> int:
        """The fused token's weighted sum, one MAC per dropped token and channel."""
        dropped = n_tokens - 1 - self._kept(block, n_tokens)
        return dropped * width if self.fuse else 0

    def __call__(self, block: int, state: TokenState, attn: torch.Tensor | None,
                 keys: torch.Tensor | None = None) -> TokenState:
        n_tokens = state.x.shape[1]
        k = self._kept(block, n_tokens)
        if k == n_tokens - 1:
            return state
        _physical(state, "EViT")
        if attn is None:
            raise PranceError(f"EViT needs the attention probabilities of block {block} (see needs_attn)")
        importance = cls_importance(attn)
        kept = prune(state, importance, k)
        if not self.fuse:
            return kept
        _, drop = topk_split(importance, k)
        w = importance.gather(1, drop)
        total = w.sum(1, keepdim=True)
        w = torch.where(total > 0, w / total, 1.0 / drop.shape[1])  # all-zero attention: plain mean
        x = (w[:, None, :] @ take_tokens(state.x[:, 1:], drop))  # [B, 1, C]
        size = take_tokens(state.size[:, 1:], drop).sum(1, keepdim=True)
        source = None
        if state.source is not None:
            source = torch.cat([kept.source, take_tokens(state.source[:, 1:], drop).any(1, keepdim=True)], 1)
        return TokenState(torch.cat([kept.x, x.to(kept.x.dtype)], 1), torch.cat([kept.size, size], 1), source)


class ToMeReducer:
    """Merge ``r`` token pairs in every block by bipartite soft matching on the keys.

    The metric is the block's keys averaged over heads; merging is size-weighted and the cls
    token never merges. When fewer than ``2r`` patch tokens remain, ``r`` is capped at half
    the patch tokens (rounded down), so at least cls + 1 patch token always survives.
    """

    def __init__(self, r: int) -> None:
        if r < 0:
            raise PranceError(f"ToMe r must be a non-negative number of merges per block, got {r}")
        self.r = int(r)

    def __repr__(self) -> str:
        return f"ToMeReducer(r={self.r})"

    def merges(self, n_tokens: int) -> int:
        """Merges done in a block entered by ``n_tokens`` tokens (cls included)."""
        return min(self.r, (n_tokens - 1) // 2)

    def needs_attn(self, block: int) -> bool:
        return False

    def tokens_after(self, block: int, n_tokens: int) -> int:
        return n_tokens - self.merges(n_tokens)

    def extra_macs(self, block: int, n_tokens: int, width: int, head_dim: int | None = None) -> int:
        """The cosine-similarity matmul between sets A and B over the head-averaged keys."""
        if self.merges(n_tokens) == 0:
            return 0
        if head_dim is None:
            raise PranceError("ToMe matches on keys averaged over heads; pass head_dim to extra_macs")
        return ((n_tokens + 1) // 2) * (n_tokens // 2) * head_dim

    def __call__(self, block: int, state: TokenState, attn: torch.Tensor | None,
                 keys: torch.Tensor | None) -> TokenState:
        if self.merges(state.x.shape[1]) == 0:
            return state
        _physical(state, "ToMe")
        if keys is None:
            raise PranceError(f"ToMe needs the keys of block {block}")
        merge_fn = bipartite_soft_matching(keys.mean(1), self.r, protect_cls=True)
        return merge_state(merge_fn, state)


def parse_reducer(spec: str) -> EViTReducer | ToMeReducer:
    """A baseline from its command-line name: ``evit:KEEP``, ``evit-fuse:KEEP`` or ``tome:R``."""
    kind, _, value = spec.partition(":")
    try:
        if kind in ("evit", "evit-fuse"):
            return EViTReducer(float(value), fuse=kind == "evit-fuse")
        if kind == "tome":
            return ToMeReducer(int(value))
    except ValueError:
        pass
    raise PranceError(f"unknown baseline {spec!r}; use evit:KEEP (e.g. evit:0.7), evit-fuse:KEEP or tome:R "
                      "(e.g. tome:4)")
