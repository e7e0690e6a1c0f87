"""Width groups: images sharing a residual width, their tokens packed (DESIGN.md §5).

A group's tokens are one ``[tokens, width]`` matrix, image after image, so LayerNorm, QKV,
projection and the MLP run once per group. At a stage boundary images are regrouped by their
new width; a width whose group would be too small to pay for its own calls joins a wider
group, zero-padded and masked, when the cost model (``group_call_macs``) finds it cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from prance.model.layers import StageMap

#: Fixed price, per block, of running one more width group: its ~20 extra calls plus the
#: lower speed of smaller matrix products, about 0.7 ms at ~30 GMAC/s. Calibrated on the dev
#: machine with `prance bench`: fmnist-tiny gains from merging its width groups, DeiT-T does not.
#: Narrower images join a wider group, zero-padded, when that is cheaper.
DEFAULT_GROUP_CALL_MACS = 2.0e7


@dataclass
class _Group:
    """Images sharing one residual width; tokens packed image after image."""

    images: torch.Tensor  # [G] batch indices
    counts: torch.Tensor  # [G] tokens per image (cls included)
    x: torch.Tensor  # [T, w] packed tokens
    size: torch.Tensor  # [T] tokens' sizes (patches they stand for)
    img_w: torch.Tensor | None = None  # [G] each image's own width if some run narrower than the group (padded)
    grid_rows: torch.Tensor | None = None  # [T] row of each token in the attention grid (cached)
    counts_cache: list[int] | None = None  # counts as a list (cached)
    images_cache: list[int] | None = None  # images as a list (cached)
    mask_cache: tuple[torch.Tensor, torch.Tensor] | None = None
    bias_cache: torch.Tensor | None = None  # equal counts: [G, 1, 1, n] log sizes, the key bias of merged tokens

    @property
    def mixed(self) -> bool:
        return self.img_w is not None

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A mixed group's ``[T, 1]`` active width and ``[T, w]`` channel mask of every row (cached)."""
        if self.mask_cache is None:
            wr = torch.repeat_interleave(self.img_w, self.counts)[:, None]
            self.mask_cache = wr.to(self.x.dtype), (torch.arange(self.width, device=wr.device) < wr).to(self.x.dtype)
        return self.mask_cache

    def widths(self) -> torch.Tensor:
        """``[G]`` each image's own residual width."""
        return self.img_w if self.mixed else torch.full_like(self.counts, self.width)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    def offsets(self) -> torch.Tensor:
        return F.pad(self.counts.cumsum(0), (1, 0))

    def counts_list(self) -> list[int]:
        if self.counts_cache is None:
            self.counts_cache = self.counts.tolist()
        return self.counts_cache

    def size_bias(self) -> torch.Tensor:
        """``[G, 1, 1, n]`` key bias of a group whose images all have ``n`` tokens: their log sizes (cached)."""
        if self.bias_cache is None:
            self.bias_cache = self.size.log().view(len(self.counts), 1, 1, -1)
        return self.bias_cache

    def images_list(self) -> list[int]:
        if self.images_cache is None:
            self.images_cache = self.images.tolist()
        return self.images_cache

    def row_image(self) -> torch.Tensor:
        """``[T]`` position in the group of each row's image."""
        return torch.repeat_interleave(torch.arange(len(self.counts), device=self.counts.device), self.counts)

    def sort_rows(self, values: list[int]) -> tuple[list[int], torch.Tensor, list[int]]:
        """Distinct per-image values (ascending), the rows sorted by their image's value, rows per value."""
        distinct, inverse = torch.tensor(values, device=self.counts.device).unique(return_inverse=True)
        row_key = inverse[self.row_image()]
        order = row_key.sort(stable=True).indices
        return distinct.tolist(), order, torch.bincount(row_key, minlength=len(distinct)).tolist()

    def partition(self, values: list[int]) -> list[tuple[int, torch.Tensor]]:
        """``(value, rows)`` for each distinct per-image value, with one sort for all of them."""
        distinct, order, sizes = self.sort_rows(values)
        return list(zip(distinct, order.split(sizes)))

    def with_x(self, x: torch.Tensor) -> "_Group":
        """The same images and tokens (and what is cached of them) with new features ``x``."""
        new = object.__new__(_Group)  # a shallow copy without dataclasses.replace, which re-runs __init__ in Python
        new.__dict__.update(self.__dict__)
        new.x = x
        return new


def cheapest_cut(k: int, cost: Callable[[int, int], float]) -> list[tuple[int, int]]:
    """Split ``0..k`` into contiguous segments ``(a, z)`` minimising the sum of ``cost(a, z)`` (DP).

    The one cost-model solver: width groups here, attention buckets in :mod:`prance.engine.grid`.
    """
    best, cut = [0.0] + [float("inf")] * k, [0] * (k + 1)
    for z in range(1, k + 1):
        for a in range(z):
            c = best[a] + cost(a, z)
            if c < best[z]:
                best[z], cut[z] = c, a
    out, z = [], k
    while z > 0:
        out.append((cut[z], z))
        z = cut[z]
    return out[::-1]


def group_widths(groups: list[_Group], new_widths: list[int], group_call_macs: float, attention_channels: int,
                 mlp_ratio: float) -> dict[int, int]:
    """The group width each new width runs in: its own, or a wider one when cheaper.

    Running ``rows`` tokens of width ``w`` inside a group of width ``W`` costs about
    ``rows × W × (4·A + 2·r·w)`` MACs per block (A = ``attention_channels``, r = ``mlp_ratio``,
    the mean MLP ratio) against ``rows × w × (…)`` alone; each group costs ``group_call_macs`` more.
    """
    rows: dict[int, int] = {}
    for g in groups:
        for j, c in zip(g.images.tolist(), g.counts_list()):
            rows[new_widths[j]] = rows.get(new_widths[j], 0) + c
    values = sorted(rows)
    if group_call_macs == 0 or len(values) == 1:
        return {w: w for w in values}
    if group_call_macs == float("inf"):
        return {w: values[-1] for w in values}

    def cost(a: int, z: int) -> float:
        top = values[z - 1]
        return group_call_macs + sum(rows[w] * top * (4 * attention_channels + 2 * mlp_ratio * w) for w in values[a:z])

    return {w: values[z - 1] for a, z in cheapest_cut(len(values), cost) for w in values[a:z]}


def regroup(groups: list[_Group], new_widths: list[int], stage_map: StageMap,
            target_widths: Callable[[list[_Group], list[int]], dict[int, int]],
            labels: list[int] | None = None) -> list[_Group]:
    """Regroup images by their new width, applying ``stage_map`` where it changes.

    The map runs once per old group, at the largest new width any of its images needs; a
    narrower image takes the first columns of that output (first-k slicing makes it exact).
    Images whose width has a small group join a wider one, zero-padded (``target_widths``:
    :func:`group_widths` with the model's sizes). Images of different ``labels`` (per batch
    image) never share a group. Each old group is permuted once so that every new group's
    images are a contiguous slice of it.
    """
    n_labels = 1 if labels is None else max(labels) + 1
    if (len(groups) == 1 and not groups[0].mixed and new_widths.count(new_widths[0]) == len(new_widths)
            and n_labels == 1):
        # One group, one new width (always so at batch 1): the map, or nothing, on every row.
        g, w = groups[0], new_widths[0]
        return [_Group(g.images, g.counts, g.x if w == g.width else stage_map(g.x, w), g.size)]
    target = target_widths(groups, new_widths)
    pieces: dict[int, list[tuple[torch.Tensor, ...]]] = {}
    for g in groups:
        new_w = torch.tensor([new_widths[j] for j in g.images.tolist()], device=g.counts.device)
        old_w = g.widths()
        changed = new_w != old_w
        w_top = int(new_w.max())
        x = g.x[:, :w_top] if g.width >= w_top else F.pad(g.x, (0, w_top - g.width))
        if bool(changed.any()):
            mapped = stage_map(g.x, w_top)
            x = mapped if bool(changed.all()) else torch.where(
                torch.repeat_interleave(changed, g.counts)[:, None], mapped, x)
        if bool((new_w != w_top).any()):  # zero every row beyond its own new width
            row_width = torch.repeat_interleave(new_w, g.counts)[:, None]
            x = x * (torch.arange(w_top, device=x.device) < row_width).to(x.dtype)
        # destination: the group width, and the label when images of one width may part
        dest = torch.tensor([target[w] * n_labels + (0 if labels is None else labels[j])
                             for w, j in zip(new_w.tolist(), g.images_list())], device=g.counts.device)
        wanted = dest.unique().tolist()
        if len(wanted) == 1:
            pieces.setdefault(wanted[0], []).append((g.images, g.counts, x, g.size, new_w))
            continue
        order = dest.sort(stable=True).indices
        rows = _rows(g.offsets(), g.counts, order)
        images, counts, widths = g.images[order], g.counts[order], new_w[order]
        x, size = x.index_select(0, rows), g.size.index_select(0, rows)
        n_images = torch.bincount(dest, minlength=max(wanted) + 1)[wanted].tolist()
        a = r = 0
        for w, n_img, c in zip(wanted, n_images, counts.split(n_images)):
            n_row = int(c.sum())
            pieces.setdefault(w, []).append((images[a : a + n_img], c, x[r : r + n_row], size[r : r + n_row],
                                             widths[a : a + n_img]))
            a, r = a + n_img, r + n_row
    out = []
    for key, parts in pieces.items():
        w = key // n_labels
        parts = [(i, c, x[:, :w] if x.shape[1] >= w else F.pad(x, (0, w - x.shape[1])), s, iw)
                 for i, c, x, s, iw in parts]
        images, counts, x, size, img_w = (parts[0] if len(parts) == 1 else
                                          [torch.cat([p[k] for p in parts]) for k in range(5)])
        out.append(_Group(images, counts, x, size, None if bool((img_w == w).all()) else img_w))
    return out


def _token_counts(groups: list[_Group], b: int) -> torch.Tensor:
    """``[B]`` tokens (cls included) of every batch image (a lone image's group's own tensor: do not write to it).

    Shared by the attention grid and the executor's stage loop, hence here with the groups.
    """
    if b == 1:
        return groups[0].counts
    counts = groups[0].counts.new_empty(b)
    for g in groups:
        counts[g.images] = g.counts
    return counts


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows ``rows`` of ``t`` (all of it for None); index_select is the fast CPU gather.

    Shared by the packed attention and the MLP of a group.
    """
    return t if rows is None else t.index_select(0, rows)


def _rows(offsets: torch.Tensor, counts: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Packed row indices of images ``order`` (each image's rows, image after image).

    Shared by regrouping and the executor's ``select``.
    """
    c = counts[order]
    starts = offsets[:-1][order]
    within = torch.arange(int(c.sum()), device=c.device) - torch.repeat_interleave(F.pad(c.cumsum(0), (1, 0))[:-1], c)
    return torch.repeat_interleave(starts, c) + within
