"""Per-image plans at real speed: grouped, packed physical execution (DESIGN.md §5).

Every image runs its own widths, MLP widths, heads and token counts, yet the batch still
runs as a few large matrix products:

* images sharing a residual width form a *width group* for the whole stage; their tokens are
  packed into one ``[tokens, width]`` matrix (no padding), so LayerNorm, QKV, projection and
  the MLP run once per group (per distinct heads / MLP width inside it);
* attention needs per-image structure: inside a group, images are kept sorted by token count,
  so images with equal counts are a contiguous slice that reshapes to a dense sub-batch (or,
  with ``attention="padded"``, every image is padded to the longest and keys are masked);
* groups are rebuilt at every stage boundary, where widths change and tokens are reduced.

The engine reads the meta-network's weights, it owns none; for every image its logits equal
``MetaViT(x, plan, mode="masked")`` for that image (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from prance.errors import PranceError
from prance.model.layers import Attention, Block
from prance.model.metavit import MetaViT
from prance.plan import Plan, kept_count
from prance.tokens import ops as token_ops
from prance.tokens.state import TokenState

ATTENTION_MODES = ("grouped", "padded")


@dataclass
class _Group:
    """Images sharing one residual width; tokens packed image after image, images by token count."""

    images: torch.Tensor  # [G] batch indices, sorted by token count
    counts: torch.Tensor  # [G] tokens per image (cls included), non-decreasing
    x: torch.Tensor  # [T, w] packed tokens
    size: torch.Tensor  # [T] tokens' sizes (patches they stand for)
    row_image: torch.Tensor | None = None  # [T] position in the group of each row's image (cached)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    def offsets(self) -> torch.Tensor:
        return F.pad(self.counts.cumsum(0), (1, 0))

    def _row_image(self) -> torch.Tensor:
        if self.row_image is None:
            self.row_image = torch.repeat_interleave(torch.arange(len(self.counts)), self.counts)
        return self.row_image

    def rows_of(self, positions: list[int]) -> torch.Tensor:
        """Packed row indices of the images at ``positions`` (in packed order)."""
        chosen = torch.zeros(len(self.counts), dtype=torch.bool)
        chosen[positions] = True
        return chosen[self._row_image()].nonzero().squeeze(1)

    def partition(self, values: list[int]) -> list[tuple[int, torch.Tensor]]:
        """``(value, rows)`` for each distinct per-image value, with one sort for all of them."""
        distinct, inverse = torch.tensor(values).unique(return_inverse=True)
        row_key = inverse[self._row_image()]
        order = row_key.sort(stable=True).indices
        sizes = torch.bincount(row_key, minlength=len(distinct)).tolist()
        return list(zip(distinct.tolist(), order.split(sizes)))

    def with_x(self, x: torch.Tensor) -> "_Group":
        return replace(self, x=x)


def _rows(offsets: torch.Tensor, counts: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Packed row indices of images ``order`` (each image's rows, image after image)."""
    c = counts[order]
    starts = offsets[:-1][order]
    within = torch.arange(int(c.sum())) - torch.repeat_interleave(F.pad(c.cumsum(0), (1, 0))[:-1], c)
    return torch.repeat_interleave(starts, c) + within


def _all_rows_equal(plan: Plan) -> bool:
    return all(bool((t == t[:1]).all()) for t in (plan.widths, plan.mlp_ratios, plan.heads, plan.keep, plan.merge_keep))


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows ``rows`` of ``t`` (all of it for None); index_select is the fast CPU gather."""
    return t if rows is None else t.index_select(0, rows)


def _runs(values: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs ``(start, end, value)`` of equal consecutive values."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i, values[start]))
            start = i
    return runs


def _by_value(values: list) -> list[tuple]:
    """``(value, positions)`` for each distinct (hashable) value, in first-seen order."""
    out: dict = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return list(out.items())


class DynamicExecutor:
    """Runs a :class:`MetaViT` with one plan per image, physically, in grouped sub-batches.

    ``attention="grouped"`` attends over images with equal token counts together (exact, no
    padding); ``"padded"`` pads every image of a group to the longest and masks the keys.
    """

    def __init__(self, model: MetaViT, attention: str = "grouped") -> None:
        if attention not in ATTENTION_MODES:
            raise PranceError(f"unknown attention mode {attention!r}; use one of {', '.join(ATTENTION_MODES)}")
        self.model = model
        self.attention = attention

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, plan: Plan | None = None) -> torch.Tensor:
        model, cfg = self.model, self.model.config
        model.check_input(x)
        b = x.shape[0]
        plan = (Plan.full(cfg) if plan is None else plan).validate(cfg, model.space)
        if plan.batch_size == 1 or _all_rows_equal(plan):
            # One plan for the whole batch (always so at batch 1): plain sliced execution.
            return model.forward_shared_plan(x, plan.select(0), None, None)
        plan = plan.expand(b)
        widths = plan.widths.tolist()
        heads = plan.heads.tolist()
        hidden = plan.mlp_hidden(cfg).tolist()
        keep, merge_keep = plan.keep, plan.merge_keep

        tokens = model.embed(x)
        n0 = tokens.shape[1]
        groups = [_Group(torch.arange(b), torch.full((b,), n0), tokens.reshape(b * n0, -1),
                         torch.ones(b * n0, dtype=x.dtype))]
        sized = False
        for i, blk in enumerate(model.blocks):
            stage, first = divmod(i, cfg.stage_depth)
            reduce_stage = first == 0 and stage > 0
            if reduce_stage:
                groups = self._regroup(groups, [w[stage] for w in widths], stage)
            new_groups = []
            for g in groups:
                imgs = g.images.tolist()
                reduce = None
                if reduce_stage:
                    n_patch = g.counts - 1
                    keep_k = kept_count(n_patch, keep[g.images, stage])
                    merge_k = kept_count(keep_k, merge_keep[g.images, stage])
                    if bool((merge_k < n_patch).any()):
                        reduce = (keep_k, merge_k)
                        sized = sized or bool((merge_k < keep_k).any())
                g, importance = self._attention(blk, g, [heads[j][i] for j in imgs], reduce is not None, sized)
                if reduce is not None:
                    g = self._reduce(g, importance, *reduce)
                g = self._mlp(blk, g, [hidden[j][i] for j in g.images.tolist()])  # order may have changed
                new_groups.append(g)
            groups = new_groups
        logits = x.new_empty(b, cfg.num_classes)
        for g in groups:
            cls = g.x[g.offsets()[:-1]]
            logits[g.images] = model.classify(model.norm(cls))
        return logits

    # ------------------------------------------------------------------ stage boundary
    def _regroup(self, groups: list[_Group], new_widths: list[int], stage: int) -> list[_Group]:
        """Regroup images by their width for ``stage``, applying the stage map where it changes."""
        stage_map = self.model.stage_maps[stage - 1]
        pieces: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for g in groups:
            targets = torch.tensor([new_widths[j] for j in g.images.tolist()])
            for w in targets.unique().tolist():
                pos = (targets == w).nonzero().flatten()
                if len(pos) == len(g.images):
                    xs, size = g.x, g.size
                else:
                    rows = _rows(g.offsets(), g.counts, pos)
                    xs, size = _take(g.x, rows), _take(g.size, rows)
                if w != g.width:
                    xs = stage_map(xs, w)
                pieces.setdefault(w, []).append((g.images[pos], g.counts[pos], xs, size))
        out = []
        for w, parts in pieces.items():
            if len(parts) == 1:
                out.append(_Group(*parts[0]))
                continue
            images, counts = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            xs, size = torch.cat([p[2] for p in parts]), torch.cat([p[3] for p in parts])
            order = counts.sort(stable=True).indices
            rows = _rows(F.pad(counts.cumsum(0), (1, 0)), counts, order)
            out.append(_Group(images[order], counts[order], _take(xs, rows), _take(size, rows)))
        return out

    # ------------------------------------------------------------------ attention
    def _attention(
        self, blk: Block, g: _Group, heads: list[int], need_importance: bool, sized: bool
    ) -> tuple[_Group, torch.Tensor | None]:
        """Residual attention for the group; also cls importance ``[G, Nmax-1]`` if asked."""
        attn: Attention = blk.attn
        h = blk.norm1(g.x)
        counts = g.counts.tolist()
        bias = g.size.log() if sized else None
        x = g.x
        importance = g.x.new_zeros(len(counts), max(counts) - 1) if need_importance else None
        for hv, pos in _by_value(heads):
            whole = len(pos) == len(counts)
            rows = None if whole else g.rows_of(pos)
            weight, b = attn._qkv_params(g.width, hv)
            qkv = F.linear(_take(h, rows), weight, b)
            sub_counts = [counts[p] for p in pos]
            sub_bias = None if bias is None else _take(bias, rows)
            if self.attention == "grouped":
                o, imp = self._attend_runs(attn, qkv, sub_counts, hv, sub_bias, need_importance)
            else:
                o, imp = self._attend_padded(attn, qkv, sub_counts, hv, sub_bias, need_importance)
            proj = F.linear(o, attn.proj.weight[: g.width, : hv * attn.head_dim], attn.proj.bias[: g.width])
            # In place is safe: h already holds what attention needed from x.
            x = x + proj if whole else x.index_add_(0, rows, proj)
            if importance is not None:
                importance[pos, : imp.shape[1]] = imp
        return g.with_x(x), importance

    def _attend_runs(self, attn: Attention, qkv: torch.Tensor, counts: list[int], hv: int,
                     bias: torch.Tensor | None, need_importance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over runs of images with equal token counts (contiguous rows)."""
        hd, outs, imps = attn.head_dim, [], []
        start = 0
        # Images arrive sorted by count, so equal counts are contiguous slices of rows.
        for a, z, n in _runs(counts):
            rows = slice(start, start + (z - a) * n)
            start = rows.stop
            q, k, v = qkv[rows].view(z - a, n, 3, hv, hd).permute(2, 0, 3, 1, 4)
            mask = None if bias is None else bias[rows].view(z - a, 1, 1, n)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            outs.append(o.transpose(1, 2).reshape((z - a) * n, hv * hd))
            if need_importance:
                imps.append(self._cls_importance(attn, q, k, mask, n - 1))
        imp = None
        if need_importance:
            width = max(t.shape[1] for t in imps)
            imp = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in imps])
        return torch.cat(outs) if len(outs) > 1 else outs[0], imp

    def _attend_padded(self, attn: Attention, qkv: torch.Tensor, counts: list[int], hv: int,
                       bias: torch.Tensor | None, need_importance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention with every image padded to the longest; padded keys get -inf."""
        hd, g, n = attn.head_dim, len(counts), max(counts)
        c = torch.tensor(counts)
        valid = torch.arange(n) < c[:, None]  # [G, n]
        padded = qkv.new_zeros(g, n, qkv.shape[1])
        padded[valid] = qkv
        key_bias = torch.zeros(g, n, dtype=qkv.dtype) if bias is None else qkv.new_zeros(g, n).masked_scatter(valid, bias)
        mask = key_bias.masked_fill(~valid, float("-inf")).view(g, 1, 1, n)
        q, k, v = padded.view(g, n, 3, hv, hd).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(g, n, hv * hd)[valid]
        imp = self._cls_importance(attn, q, k, mask, n - 1) if need_importance else None
        return o, imp

    @staticmethod
    def _cls_importance(attn: Attention, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                        n_patch: int) -> torch.Tensor:
        """Cls-row attention probabilities averaged over heads (only the one query row is computed)."""
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits + mask
        return logits.softmax(-1)[:, :, 0, 1 : 1 + n_patch].mean(1)

    # ------------------------------------------------------------------ token reduction
    def _reduce(self, g: _Group, importance: torch.Tensor, keep_k: torch.Tensor, merge_k: torch.Tensor) -> _Group:
        """Reduce every image's tokens in one batched call, then re-sort images by their new counts.

        Images are padded to the longest (padding marked dead, so it is never kept or merged
        into), reduced by the masked ops with one count per image, and the survivors compacted
        back into packed rows (row-major order keeps each image's tokens together).
        """
        n_max = int(g.counts.max())
        valid = torch.arange(n_max) < g.counts[:, None]
        x = g.x.new_zeros(len(g.counts), n_max, g.width)
        x[valid] = g.x
        size = g.size.new_ones(len(g.counts), n_max)
        size[valid] = g.size
        state = token_ops.reduce_masked(TokenState(x, size, alive=valid), importance[:, : n_max - 1], keep_k, merge_k)
        counts = state.alive.sum(1)
        x, size = state.x[state.alive], state.size[state.alive]
        order = counts.sort(stable=True).indices
        if bool((order != torch.arange(len(order))).any()):
            rows = _rows(F.pad(counts.cumsum(0), (1, 0)), counts, order)
            x, size = _take(x, rows), _take(size, rows)
        return _Group(g.images[order], counts[order], x, size)

    # ------------------------------------------------------------------ MLP
    def _mlp(self, blk: Block, g: _Group, hidden: list[int]) -> _Group:
        h = blk.norm2(g.x)
        if len(set(hidden)) == 1:
            return g.with_x(g.x + blk.mlp(h, hidden[0]))
        x = g.x
        for m, rows in g.partition(hidden):
            x = x.index_add_(0, rows, blk.mlp(h.index_select(0, rows), m))
        return g.with_x(x)

