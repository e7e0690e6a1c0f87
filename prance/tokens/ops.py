"""Token reduction as small pure functions on a :class:`~prance.tokens.state.TokenState`.

Importance is the attention the cls token pays to each patch token (DESIGN.md §2). Three
reductions are built on it:

* **prune** keeps the cls token and the ``k`` most important patch tokens;
* **merge** keeps the ``k`` most important patch tokens and folds every other one into its
  most cosine-similar kept token (size-weighted mean, sizes add, sources OR);
* **reduce** prunes, then merges what is left.

Each comes in two forms. Physical ops gather the survivors, so every sample of the batch
keeps the same count. Masked ops keep full-length tensors, take one count per sample and
mark removed tokens dead in ``state.alive``; for every sample their alive tokens equal the
physical result for that sample alone. Ranking is shared by both: descending importance,
ties to the lower index. Counts ``k`` are patch tokens, cls excluded, as produced by
:func:`prance.plan.kept_count`.

:func:`bipartite_soft_matching` is ToMe's matching (Bolya et al., ICLR 2023), used by the
static merging baseline.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from prance.errors import PranceError
from prance.tokens.state import TokenState

MergeFn = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- importance
def cls_importance(attn: torch.Tensor, head_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N-1]`` attention from the cls query to every patch token, averaged over heads.

    ``attn`` holds softmax probabilities ``[B, H, N, N]``. With ``head_mask`` (``[B, H]`` bool,
    elastic heads in masked mode) only the active heads are averaged.
    """
    row = attn[:, :, 0, 1:]
    if head_mask is None:
        return row.mean(1)
    active = head_mask[:, :, None]
    return torch.where(active, row, 0).sum(1) / active.sum(1).clamp_min(1)


def attention_importance(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                         heads: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N-1]`` importance from queries and keys ``[B, H, N, hd]``: the cls row's attention
    probabilities, averaged over each image's active heads (the first ``heads[b]``; all for None).

    The one importance of PRANCE's token reduction: the engine, the physical and the masked
    path all call it, so an image keeps and merges the same tokens whichever runs it. Only
    the cls query row is computed. ``mask`` is an additive key bias broadcastable to
    ``[B, H, 1, N]`` (log sizes; -inf for padded or removed keys, which get probability 0).
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    probs = logits.softmax(-1)[:, :, 0, 1:]  # [B, H, N-1]
    if heads is None or bool((heads == q.shape[1]).all()):
        return probs.mean(1)
    active = (torch.arange(q.shape[1], device=q.device) < heads[:, None]).to(probs.dtype)[:, :, None]
    return (probs * active).sum(1) / heads[:, None].to(probs.dtype)


def _order(importance: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Patch indices by descending importance, ties to the lower index; dead tokens last."""
    order = importance.sort(dim=-1, descending=True, stable=True).indices
    if alive is not None:
        dead_last = (~alive).gather(-1, order).to(torch.uint8).sort(dim=-1, stable=True).indices
        order = order.gather(-1, dead_last)
    return order


def topk_split(importance: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``([B, k], [B, n-k])`` of the kept and the other patch tokens, each ascending."""
    order = _order(importance)
    return order[:, :k].sort(dim=-1).values, order[:, k:].sort(dim=-1).values


def top_alive(importance: torch.Tensor, alive: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` bool: the ``k[b]`` most important alive patch tokens of each sample."""
    order = _order(importance, alive)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return alive & (rank < k[:, None])


# ----------------------------------------------------------------------------- helpers
def compact(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` the entries of ``values`` where ``keep`` is True moved to the front of each row,
    in order, zeros after them (per-token values of the surviving tokens, as a physical path lays them out)."""
    order = (~keep).to(torch.uint8).sort(dim=1, stable=True).indices
    out = values.gather(1, order)
    return out.masked_fill(torch.arange(keep.shape[1], device=keep.device) >= keep.sum(1, keepdim=True), 0.0)


def take_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens ``index`` ``[B, M]`` of ``t`` ``[B, N]`` or ``[B, N, C]`` (per-sample gather along dim 1)."""
    if t.dim() == 2:
        return t.gather(1, index)
    return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))


def _with_cls(state: TokenState, x: torch.Tensor, size: torch.Tensor, source: torch.Tensor | None) -> TokenState:
    """A physical state whose patch rows are ``x``/``size``/``source``, with the cls row of ``state``."""
    return TokenState(
        torch.cat([state.x[:, :1], x], 1),
        torch.cat([state.size[:, :1], size], 1),
        None if source is None else torch.cat([state.source[:, :1], source], 1),
    )


def _check(state: TokenState, importance: torch.Tensor, masked: bool) -> None:
    if state.masked != masked:
        kind = "masked" if state.masked else "physical"
        raise PranceError(f"a {kind} token state needs the {kind} ops (the *_masked functions take masked states)")
    if importance.shape != state.size[:, 1:].shape:
        raise PranceError(f"importance has shape {tuple(importance.shape)}, expected {tuple(state.size[:, 1:].shape)}"
                          " (one value per patch token); compute it with cls_importance")


def _keeps_all(state: TokenState, importance: torch.Tensor, k: int, what: str) -> bool:
    """Check a physical reduction to ``k`` patch tokens; True if it would keep every one (a no-op)."""
    _check(state, importance, masked=False)
    n = state.x.shape[1] - 1
    _check_k(k, n, what)
    return k == n


def _check_k(k: int, n: int, what: str) -> None:
    if not 1 <= k <= n:
        raise PranceError(f"{what} must keep between 1 and {n} patch tokens, got {k}; use prance.plan.kept_count")


def _counts(k: torch.Tensor | int, state: TokenState, what: str) -> torch.Tensor:
    """Per-sample counts ``[B]``, checked against each sample's alive patch tokens."""
    b = state.x.shape[0]
    k = torch.as_tensor(k, dtype=torch.int64, device=state.x.device).expand(b)
    n = state.num_patches()
    if bool(((k < 1) | (k > n)).any()):
        raise PranceError(f"{what} must keep between 1 and the alive patch tokens of each sample "
                          f"({n.tolist()}), got {k.tolist()}; use prance.plan.kept_count")
    return k


@torch.no_grad()
def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B, M, K]`` cosine similarity of the rows of ``a`` ``[B, M, C]`` and ``b`` ``[B, K, C]``."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)


def merge_macs(num_patches: int, k: int, width: int) -> int:
    """MACs per sample of the similarity matmul of a physical :func:`merge` (0 when nothing merges)."""
    return (num_patches - k) * k * width


# ----------------------------------------------------------------------------- physical
def prune(state: TokenState, importance: torch.Tensor, k: int) -> TokenState:
    """Keep cls and the ``k`` most important patch tokens, in their original order."""
    if _keeps_all(state, importance, k, "prune"):
        return state
    keep, _ = topk_split(importance, k)
    keep = torch.cat([keep.new_zeros(keep.shape[0], 1), keep + 1], 1)
    return TokenState(take_tokens(state.x, keep), take_tokens(state.size, keep),
                      None if state.source is None else take_tokens(state.source, keep))


def merge(state: TokenState, importance: torch.Tensor, k: int) -> TokenState:
    """Keep the ``k`` most important patch tokens; merge each other one into its most similar kept token.

    Similarity is the cosine of ``state.x``; a merged token is the size-weighted mean of its
    parts, its size their sum and its source their union. Kept tokens stay in original order;
    a kept token that receives nothing is returned bit for bit.
    """
    if _keeps_all(state, importance, k, "merge"):
        return state
    keep, drop = topk_split(importance, k)
    x, size = state.x[:, 1:], state.size[:, 1:]
    x_keep, x_drop = take_tokens(x, keep), take_tokens(x, drop)
    s_keep, s_drop = take_tokens(size, keep), take_tokens(size, drop)
    dst = _cosine(x_drop, x_keep).argmax(-1)  # [B, n-k], a position among the kept tokens
    total = s_keep.scatter_add(1, dst, s_drop)
    weighted = (x_keep * s_keep[..., None]).scatter_add(1, dst[..., None].expand_as(x_drop), x_drop * s_drop[..., None])
    got = torch.zeros_like(s_keep, dtype=torch.bool).scatter_(1, dst, True)
    x_new = torch.where(got[..., None], weighted / total[..., None], x_keep)
    source = None
    if state.source is not None:
        src = state.source[:, 1:]
        src_drop = take_tokens(src, drop).to(torch.uint8)
        source = take_tokens(src, keep).to(torch.uint8).scatter_reduce(
            1, dst[..., None].expand_as(src_drop), src_drop, reduce="amax").bool()
    return _with_cls(state, x_new, total, source)


def reduce(state: TokenState, importance: torch.Tensor, keep_k: int, merge_k: int) -> TokenState:
    """Prune to ``keep_k`` patch tokens, then merge them down to ``merge_k`` (same importance)."""
    _check(state, importance, masked=False)
    n = state.x.shape[1] - 1
    _check_k(keep_k, n, "reduce (prune step)")
    _check_k(merge_k, keep_k, "reduce (merge step)")
    if keep_k < n:
        keep, _ = topk_split(importance, keep_k)
        state = prune(state, importance, keep_k)
        importance = importance.gather(1, keep)
    return merge(state, importance, merge_k)


# ----------------------------------------------------------------------------- masked
def prune_masked(state: TokenState, importance: torch.Tensor, k: torch.Tensor | int) -> TokenState:
    """Masked :func:`prune`: per sample, all but cls and the ``k[b]`` most important alive patches die."""
    _check(state, importance, masked=True)
    k = _counts(k, state, "prune")
    keep = top_alive(importance, state.alive[:, 1:], k)
    return TokenState(state.x, state.size, state.source, torch.cat([state.alive[:, :1], keep], 1))


def merge_masked(state: TokenState, importance: torch.Tensor, k: torch.Tensor | int) -> TokenState:
    """Masked :func:`merge` with ``k[b]`` kept patch tokens per sample; merged-away tokens die.

    Dead tokens keep their old features, sizes and sources (attention never sees them).
    """
    _check(state, importance, masked=True)
    k = _counts(k, state, "merge")
    alive = state.alive[:, 1:]
    keep = top_alive(importance, alive, k)
    drop = alive & ~keep
    x, size = state.x[:, 1:], state.size[:, 1:]
    sim = _cosine(x, x).masked_fill(~keep[:, None, :], float("-inf"))
    self_index = torch.arange(x.shape[1], device=x.device).expand_as(size)
    dst = torch.where(drop, sim.argmax(-1), self_index)  # every other token adds zero to itself
    total = size.scatter_add(1, dst, torch.where(drop, size, 0))
    sent = torch.where(drop[..., None], x * size[..., None], 0)
    weighted = (x * size[..., None]).scatter_add(1, dst[..., None].expand_as(x), sent)
    got = torch.zeros_like(size, dtype=torch.uint8).scatter_reduce(1, dst, drop.to(torch.uint8), reduce="amax")
    got = keep & got.bool()
    x_new = torch.where(got[..., None], weighted / total[..., None], x)
    size_new = torch.where(got, total, size)
    source = state.source
    if source is not None:
        src = source[:, 1:].to(torch.uint8)
        sent_src = torch.where(drop[..., None], src, 0)
        merged = src.scatter_reduce(1, dst[..., None].expand_as(src), sent_src, reduce="amax").bool()
        source = torch.where(got[..., None], merged, source[:, 1:])
        source = torch.cat([state.source[:, :1], source], 1)
    return TokenState(torch.cat([state.x[:, :1], x_new], 1), torch.cat([state.size[:, :1], size_new], 1),
                      source, torch.cat([state.alive[:, :1], keep], 1))


def reduce_masked(state: TokenState, importance: torch.Tensor, keep_k: torch.Tensor | int,
                  merge_k: torch.Tensor | int) -> TokenState:
    """Masked :func:`reduce`: prune to ``keep_k[b]``, then merge down to ``merge_k[b]`` patch tokens."""
    state = prune_masked(state, importance, keep_k)
    if bool((torch.as_tensor(merge_k) == torch.as_tensor(keep_k)).all()):
        return state  # nothing to merge: skip the similarity matrix
    return merge_masked(state, importance, merge_k)


# ----------------------------------------------------------------------------- ToMe matching
def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_cls: bool = True) -> MergeFn:
    """ToMe's bipartite soft matching: a function that merges ``r`` tokens of any ``[B, N, C]`` tensor.

    Tokens alternate into sets A (even positions) and B (odd). Each A token is matched to its
    most cosine-similar B token under ``metric`` ``[B, N, C]``; the ``r`` best-matched A tokens
    are merged into their partners. ``r`` is capped at the number of A tokens that may merge,
    ``(N - protect_cls) // 2``. With ``protect_cls`` the cls token (A's first) never merges.

    The returned ``merge(x, mode="mean")`` reduces each B token with its incoming A tokens by
    ``mode`` (``"mean"``, ``"sum"``, ``"amax"``) and returns ``[unmerged A in original order, B]``,
    so the cls token stays first. Use :func:`merge_weighted` for size-weighted means.
    """
    n = metric.shape[1]
    r = min(r, (n - int(protect_cls)) // 2)
    if r <= 0:
        return _identity
    scores = _cosine(metric[:, ::2], metric[:, 1::2])  # [B, |A|, |B|]
    if protect_cls:
        scores[:, 0, :] = float("-inf")
    partner = scores.argmax(-1)  # [B, |A|]
    best = scores.gather(-1, partner[..., None])[..., 0]
    order = best.sort(dim=-1, descending=True, stable=True).indices
    src = order[:, :r]
    unmerged = order[:, r:].sort(dim=-1).values
    dst = partner.gather(1, src)

    def merge_tokens(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        b = b.scatter_reduce(1, dst[..., None].expand(-1, -1, x.shape[-1]), take_tokens(a, src), reduce=mode)
        return torch.cat([take_tokens(a, unmerged), b], 1)

    return merge_tokens


def merge_weighted(merge_fn: MergeFn, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``merge_fn`` as a size-weighted mean: features ``[B, N, C]``, sizes ``[B, N]`` add up."""
    total = merge_fn(size[..., None], mode="sum")
    x = merge_fn(x * size[..., None], mode="sum") / total
    return x, total[..., 0]


def merge_source(merge_fn: MergeFn, source: torch.Tensor) -> torch.Tensor:
    """Apply ``merge_fn`` to a ``[B, N, P]`` bool source map (union of the merged tokens' patches)."""
    return merge_fn(source.to(torch.uint8), mode="amax").bool()


def merge_state(merge_fn: MergeFn, state: TokenState) -> TokenState:
    """Apply ``merge_fn`` to a physical state: size-weighted features, summed sizes, united sources."""
    x, size = merge_weighted(merge_fn, state.x, state.size)
    source = None if state.source is None else merge_source(merge_fn, state.source)
    return TokenState(x, size, source)
