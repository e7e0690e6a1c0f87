"""Attention buckets: every image's q, k, v in one token grid, cut into calls (DESIGN.md §5).

Attention needs per-image structure but not the residual width (q, k, v have
``heads × head_dim`` channels), so it runs across width groups: images sorted by token count
sit in one grid, cut into *buckets*; a bucket is one attention call, its images padded to its
longest with padded keys masked out. Where buckets are cut is a cost model: padding costs
wasted attention MACs, one more call a fixed price (``attention_call_macs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prance.engine.groups import _Group, _take, _token_counts, cheapest_cut
from prance.engine.weights import WeightSlices
from prance.model.layers import Block
from prance.tokens import ops as token_ops

#: ``exact``: only images with equal token counts share an attention call (never pads);
#: ``padded``: one call for the whole batch, padded to the longest; ``auto``: the cost model.
ATTENTION_MODES = ("auto", "exact", "padded")
_CALL_MACS = {"exact": 0.0, "padded": float("inf")}  # each fixed mode's call price (read by the executor)

#: Fixed price of one more attention call, in MACs: about 15 µs of call overhead at the
#: ~16 GMAC/s a CPU core reaches on small attention problems (measured on the dev machine).
DEFAULT_ATTENTION_CALL_MACS = 2.5e5


@dataclass
class _Grid:
    """Every image's tokens in one ``[slots, n_max]`` grid for attention, cut into buckets.

    Images sit in slots sorted by token count; bucket ``(a, z, n)`` is slots ``a:z`` truncated
    to ``n`` tokens (their longest) and is one attention call.
    """

    slot: torch.Tensor  # [B] slot of each batch image
    n_max: int
    buckets: list[tuple[int, int, int]]
    key_bias: torch.Tensor | None  # [B, n_max]: 0 / log(size) for real keys, -inf for padding; None if never needed
    masked: list[bool]  # per bucket: does it need the key bias
    pad_rows: torch.Tensor | None  # grid rows inside some bucket that hold padding (to be zeroed)
    bucket_bias: list[torch.Tensor | None] | None = None  # per bucket, its key bias [images, 1, 1, n] (cached)
    image_of_slot: torch.Tensor | None = None  # [B] batch image in each slot (cached)

    def bias_of_buckets(self) -> list[torch.Tensor | None]:
        """Each bucket's additive key bias, broadcast over heads and queries (None where it needs none)."""
        if self.bucket_bias is None:
            self.bucket_bias = [self.key_bias[a:z, None, None, :n] if masked else None
                                for (a, z, n), masked in zip(self.buckets, self.masked)]
        return self.bucket_bias

    def images_in_slots(self) -> torch.Tensor:
        if self.image_of_slot is None:
            self.image_of_slot = self.slot.argsort()
        return self.image_of_slot

    def rows_of(self, g: _Group) -> torch.Tensor:
        """``[T]`` grid row (``slot * n_max + token``) of every packed row of ``g`` (cached on ``g``)."""
        if g.grid_rows is None:
            starts = torch.repeat_interleave(g.offsets()[:-1], g.counts)
            within = torch.arange(len(g.x), device=g.counts.device) - starts
            g.grid_rows = torch.repeat_interleave(self.slot[g.images] * self.n_max, g.counts) + within
        return g.grid_rows


def buckets(counts: list[int], unit_macs: int, call_macs: float) -> list[tuple[int, int, int]]:
    """Cut ascending ``counts`` into contiguous buckets ``(start, end, longest)`` of least cost.

    A bucket costs ``call_macs`` (the price of one more attention call) plus its images padded
    to its longest, ``images × longest² × unit_macs``. ``call_macs = 0`` pads nothing (equal
    counts only), ``inf`` gives one bucket.
    """
    if call_macs == float("inf"):
        return [(0, len(counts), counts[-1])] if counts else []
    values, starts = [], []  # distinct counts and where each one's run starts
    for i, c in enumerate(counts):
        if not values or values[-1] != c:
            values.append(c)
            starts.append(i)
    starts.append(len(counts))
    cut = cheapest_cut(len(values), lambda a, z: call_macs + (starts[z] - starts[a]) * values[z - 1] ** 2 * unit_macs)
    return [(starts[a], starts[z], values[z - 1]) for a, z in cut]


def attention_grid(groups: list[_Group], b: int, sized: bool, unit_macs: int, call_macs: float) -> _Grid:
    """Sort all images by token count into one grid and cut it into buckets (see :func:`buckets`)."""
    for g in groups:  # rows cached for an earlier grid (e.g. a group no reduction touched) are stale here
        g.grid_rows = None
    counts = _token_counts(groups, b)
    order = counts.sort(stable=True).indices
    slot = torch.empty_like(order)
    slot[order] = torch.arange(b, device=order.device)
    sorted_counts = counts[order].tolist()
    cut = buckets(sorted_counts, unit_macs, call_macs)
    n_max = sorted_counts[-1]
    masked = [sized or sorted_counts[a] < n for a, _, n in cut]
    grid = _Grid(slot, n_max, cut, None, masked, None)
    if any(masked):
        dev = order.device
        lengths = torch.tensor(sorted_counts, device=dev)[:, None]
        bucket_len = torch.cat([torch.full((z - a,), n, device=dev) for a, z, n in cut])[:, None]
        t = torch.arange(n_max, device=dev)
        pad = (t >= lengths) & (t < bucket_len)
        grid.pad_rows = pad.view(-1).nonzero().squeeze(1) if bool(pad.any()) else None
        bias = torch.full((b * n_max,), float("-inf"), dtype=groups[0].x.dtype, device=dev)
        for g in groups:
            bias[grid.rows_of(g)] = g.size.log() if sized else 0.0
        grid.key_bias = bias.view(b, n_max)
    return grid


def packed_attention(slices: WeightSlices, i: int, blk: Block, groups: list[_Group], grid: _Grid,
                     heads: list[int], need_importance: bool, want_keys: bool = False
                     ) -> tuple[list[_Group], torch.Tensor | None, torch.Tensor | None]:
    """Residual attention for every group (weights from ``slices``).

    Also returns cls importance ``[slots, n_max - 1]`` if asked and, with ``want_keys``, the
    keys averaged over the active heads' channels, per image ``[B, n_max]`` (garbage past
    each image's count).
    """
    attn = blk.attn
    hd, h_max, b = attn.head_dim, max(heads), len(heads)
    same_heads = heads.count(h_max) == b
    normed = [slices.group_norm(("norm1", i), blk.norm1, g) for g in groups]
    # Fast path: one group holding every image in slot order with no padding needs no grid.
    direct = (len(groups) == 1 and len(grid.buckets) == 1 and not grid.masked[0] and same_heads
              and bool((grid.slot[groups[0].images] == torch.arange(b, device=grid.slot.device)).all()))
    if direct:
        qkv = F.linear(normed[0], *slices.qkv(i, blk, groups[0].width, h_max))
    else:
        zero = h_max != attn.num_heads or not same_heads  # unused heads must be zero
        qkv = groups[0].x.new_zeros if zero else groups[0].x.new_empty
        qkv = qkv(b * grid.n_max, 3, h_max, hd)
        if grid.pad_rows is not None and not zero:
            qkv.index_fill_(0, grid.pad_rows, 0.0)  # padded keys/values must be finite
        for g, h in zip(groups, normed):
            for hv, rows in _by_heads(g, heads, same_heads):
                out = F.linear(_take(h, rows), *slices.qkv(i, blk, g.width, hv)).view(-1, 3, hv, hd)
                target = qkv if hv == h_max else qkv[:, :, :hv]
                target.index_copy_(0, _take(grid.rows_of(g), rows), out)
    qkv = qkv.view(b, grid.n_max, 3, h_max, hd)
    out = qkv.new_empty(b, grid.n_max, h_max, hd)
    importance = qkv.new_zeros(b, grid.n_max - 1) if need_importance else None
    head_count = None
    if need_importance and not same_heads:
        head_count = torch.tensor(heads, device=qkv.device)[grid.images_in_slots()]
    for (a, z, n), mask in zip(grid.buckets, grid.bias_of_buckets()):
        q, k, v = qkv[a:z, :n].permute(2, 0, 3, 1, 4)
        out[a:z, :n] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        if need_importance:
            importance[a:z, : n - 1] = token_ops.attention_importance(
                q, k, attn.scale, mask, None if head_count is None else head_count[a:z])
    key_means = None
    if want_keys:
        k = qkv[:, :, 1]  # [slots, n_max, heads, hd]
        if same_heads:
            per_slot = k.mean((-2, -1))
        else:
            head_count = torch.tensor(heads, dtype=qkv.dtype, device=qkv.device)[grid.images_in_slots()]
            active = (torch.arange(h_max, device=qkv.device) < head_count[:, None]).to(qkv.dtype)
            per_slot = (k.sum(-1) * active[:, None, :]).sum(-1) / (head_count[:, None] * hd)
        key_means = per_slot[grid.slot]
    out = out.view(b * grid.n_max, h_max * hd)
    new_groups = []
    for g in groups:
        o = out if direct else out.index_select(0, grid.rows_of(g))
        x = g.x
        for hv, rows in _by_heads(g, heads, same_heads):
            proj = F.linear(_take(o, rows)[:, : hv * hd], *slices.proj(i, blk, g.width, hv))
            if g.mixed:  # rows narrower than the group stay zero beyond their width
                proj = proj * _take(g.masks()[1], rows)
            # never in place into the incoming rows: they may belong to a state that is continued elsewhere
            x = x + proj if rows is None else x.index_add(0, rows, proj) if x is g.x else x.index_add_(0, rows, proj)
        new_groups.append(g.with_x(x))
    return new_groups, importance, key_means


def _by_heads(g: _Group, heads: list[int], same: bool = False) -> list[tuple[int, torch.Tensor | None]]:
    """``(heads, rows)`` for each head count of the group's images (rows None: all of them)."""
    if same:
        return [(heads[0], None)]
    values = [heads[j] for j in g.images_list()]
    if len(set(values)) == 1:
        return [(values[0], None)]
    return g.partition(values)
