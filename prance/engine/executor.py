"""Per-image plans at real speed: grouped, packed physical execution (DESIGN.md §5).

Every image runs its own widths, MLP widths, heads and token counts, yet the batch still
runs as a few large matrix products:

* images sharing a residual width form a *width group* for the whole stage; their tokens are
  packed into one ``[tokens, width]`` matrix (no padding), so LayerNorm, QKV, projection and
  the MLP run once per group (per distinct heads / MLP width inside it). When a group would
  be too small to pay for its own calls, its images join a wider group instead, their
  channels zero-padded and masked (exact, at the price of some wasted MACs; a cost model
  with ``group_call_macs`` decides);
* attention needs per-image structure but not the residual width (its q, k, v have
  ``heads × head_dim`` channels), so it runs across width groups: every image's q, k, v go
  into one token grid, images sorted by token count and cut into *buckets*; a bucket is one
  attention call, its images padded to its longest with padded keys masked out. Where
  buckets are cut is a cost model: padding an image costs wasted attention MACs, one more
  call costs a fixed price (``attention_call_macs``), so small models pad more and large
  ones pad little;
* groups are rebuilt at every stage boundary, where widths change and tokens are reduced;
* when a stage holds only a few distinct decisions (plans rounded up to representatives), each
  decision and token count gets its own unpadded group, and every block runs group by group as
  plain ``[images, tokens, width]`` batches: no attention grid, no copies into and out of it
  (7 % faster for fmnist-tiny at batch 64 with K = 4 representatives).

Here: the execution state and the stage loop (token reduction, MLP); width groups live in
:mod:`~prance.engine.groups`, the attention grid in :mod:`~prance.engine.grid`, weight slices
in :mod:`~prance.engine.weights`. The engine reads the meta-network's weights, it owns none;
for every image its logits equal ``MetaViT(x, plan, mode="masked")`` for that image (up to
float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from prance.errors import PranceError
from prance.model.layers import Block
from prance.model.metavit import MetaViT
from prance.engine.grid import (_CALL_MACS, ATTENTION_MODES, DEFAULT_ATTENTION_CALL_MACS, _Grid, attention_grid,
                                packed_attention)
from prance.engine.groups import (DEFAULT_GROUP_CALL_MACS, _Group, _rows, _take, _token_counts, group_widths,
                                  regroup)
from prance.engine.reduce import reduce_packed
from prance.engine.stepwise import StepwiseExecutor, budget_slot
from prance.engine.weights import WeightSlices, _masked_layer_norm
from prance.plan import Plan
from prance.schedule import stage_steps
from prance.policy import StageState
from prance.tokens import ops as token_ops
from prance.tokens.state import TokenState


@dataclass(frozen=True)
class ExecutionState:
    """A batch partway through the engine: every image has run the stages before ``stage``.

    Continuing a state never changes it (every op writes into tensors it allocated), so one
    state can be continued several ways (Result-to-Go). ``plan`` holds ``[B]`` rows: the stages
    that ran and the defaults of those to come. ``key_means`` (``[B, N0]``) is the last block's
    keys averaged over the active heads' channels, zero past each image's tokens; None when
    no decision follows or ``observed`` is False. ``budget`` is ``[B]`` float64 (NaN: none).
    """

    stage: int
    groups: tuple[_Group, ...]
    plan: Plan
    sized: bool  # some tokens stand for several patches (merged): attention adds log sizes
    key_means: torch.Tensor | None
    budget: torch.Tensor
    n0: int
    observed: bool = True

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size


#: At most this many width groups run a block group by group, each as one plain batch (below).
UNIFORM_GROUPS = 4


def _decision_labels(steps: list, counts: torch.Tensor) -> tuple[list[int], int]:
    """Each image's label for its stage decisions and token count (equal labels: identical work
    for the whole stage), and the number of distinct labels."""
    columns = [counts, steps[0].width]
    for s in steps:
        columns += [s.heads, s.mlp_hidden] + ([s.prune_k, s.merge_k] if s.reduces_tokens else [])
    distinct, labels = torch.stack([c.to(torch.int64) for c in columns], 1).unique(dim=0, return_inverse=True)
    return labels.tolist(), len(distinct)


def _uniform_groups(groups: list[_Group], heads: list[int], hidden: list[int],
                    reduce: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> list[tuple[int, int, tuple[int, int] | None]] | None:
    """``(heads, MLP width, (prune_k, merge_k) or None)`` of each group if the images of every
    group run the next block identically (one width, token count, heads, MLP width, reduction),
    else None. Such groups need no attention grid: each is a plain ``[images, tokens, width]``
    batch, which saves copying every q, k, v into the grid and the output back. Images rounded
    up to a few representative decisions per stage form such groups. Beyond
    :data:`UNIFORM_GROUPS` groups the grid's fewer attention calls win."""
    def reduction(images: torch.Tensor) -> tuple[int, int] | None:
        return None if reduce is None else (int(reduce[0][images[0]]), int(reduce[1][images[0]]))

    if len(heads) == 1:
        return [(heads[0], hidden[0], reduction(groups[0].images))]
    if len(groups) > UNIFORM_GROUPS:
        return None
    out = []
    for g in groups:
        images = g.images_list()
        if g.mixed or len({heads[j] for j in images}) > 1 or len({hidden[j] for j in images}) > 1:
            return None
        if not bool((g.counts == g.counts[0]).all()):
            return None
        if reduce is not None and not all(bool((t[g.images] == t[g.images[0]]).all()) for t in reduce):
            return None
        out.append((heads[images[0]], hidden[images[0]], reduction(g.images)))
    return out


def _runs(values: list[int], counts: list[int]) -> list[tuple[int, int, int]]:
    """``(value, first row, end row)`` of each run of consecutive images with equal values."""
    runs, row = [], 0
    for v, c in zip(values, counts):
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1], row + c)
        else:
            runs.append((v, row, row + c))
        row += c
    return runs


def _survivors(values: torch.Tensor, importance: torch.Tensor, counts: torch.Tensor, merge_k: torch.Tensor
               ) -> torch.Tensor:
    """``[B, n]`` per-token ``values`` (cls first) of the tokens a reduction to ``merge_k`` patch tokens
    keeps, moved to the front in order. Prune-then-merge keeps the ``merge_k`` most important alive
    patches (merging only folds the others into them), so the survivors follow from importance alone."""
    n = importance.shape[1]
    alive = torch.arange(n, device=counts.device) < (counts - 1)[:, None]
    kept = token_ops.top_alive(importance, alive, merge_k)
    return token_ops.compact(values, torch.cat([kept.new_ones(len(kept), 1), kept], 1))


class DynamicExecutor(StepwiseExecutor):
    """Runs a :class:`MetaViT` with one plan per image, physically, in grouped sub-batches.

    ``attention`` — ``"auto"`` (cost model, default), ``"exact"`` (no padding) or ``"padded"``
    (one call per block); ``attention_call_macs`` sets the cost model's price of a call.
    ``group_call_macs`` is the price of one more width group per block: 0 gives every width
    its own group, ``inf`` runs each stage as one zero-padded group.
    Weight slices are cached per size and weight version, so repeated plans pay no slicing and
    an executor stays correct when the model's weights change in place.
    """

    def __init__(self, model: MetaViT, attention: str = "auto",
                 attention_call_macs: float = DEFAULT_ATTENTION_CALL_MACS,
                 group_call_macs: float = DEFAULT_GROUP_CALL_MACS) -> None:
        if attention not in ATTENTION_MODES:
            raise PranceError(f"unknown attention mode {attention!r}; use one of {', '.join(ATTENTION_MODES)}")
        for name, value in (("attention_call_macs", attention_call_macs), ("group_call_macs", group_call_macs)):
            if not value >= 0:
                raise PranceError(f"{name} must be >= 0, got {value}")
        self.model = model
        self.attention = attention
        self.call_macs = _CALL_MACS.get(attention, attention_call_macs)
        self.group_call_macs = group_call_macs
        self._slices = WeightSlices()

    # ------------------------------------------------------------------ stepwise API
    @torch.inference_mode()
    def start(self, x: torch.Tensor, plan: Plan | None = None, budget: torch.Tensor | float | None = None,
              observed: bool = True) -> ExecutionState:
        """Embed ``x`` and run stage 0 (``plan``, default full size, holds the stages to come).
        ``observed=False`` skips what only a policy reads (the key means)."""
        model = self.model
        model.check_input(x)
        b = x.shape[0]
        plan = (model.full_plan if plan is None else plan).validate(model.config, model.space).expand(b)
        tokens = model.embed(x)
        n0 = tokens.shape[1]
        counts = torch.full((b,), n0, device=x.device)
        group = _Group(torch.arange(b, device=x.device), counts, tokens.reshape(b * n0, -1),
                       x.new_ones(b * n0))
        return self._advance(ExecutionState(0, (group,), plan, False, None, budget_slot(budget, b), n0, observed), plan)

    def advance(self, state: ExecutionState, plan: Plan) -> ExecutionState:
        with torch.inference_mode():
            return self._advance(state, plan)

    def _advance(self, state: ExecutionState, plan: Plan) -> ExecutionState:
        """Run stage ``state.stage`` of every image under its row of ``plan``."""
        model, cfg = self.model, self.model.config
        stage, b = state.stage, state.batch_size
        if stage >= cfg.num_stages:
            raise PranceError("every stage has run; read the logits with finish()")
        groups, sized = list(state.groups), state.sized
        counts = _token_counts(groups, b).cpu()
        steps = stage_steps(cfg, plan, stage, counts)
        if stage > 0:
            widths = steps[0].width.tolist()
            labels, distinct = _decision_labels(steps, counts) if b > 1 else ([0], 1)
            if 1 < distinct <= UNIFORM_GROUPS:
                # A few distinct decisions (rounded-up plans): one unpadded group each, which run
                # their blocks as plain batches; padding them into fewer groups would forgo that.
                groups = regroup(groups, widths, model.stage_maps[stage - 1], lambda _, ws: {w: w for w in ws},
                                 labels)
            else:
                groups = regroup(groups, widths, model.stage_maps[stage - 1], self._group_widths)
        want_keys = stage < cfg.num_stages - 1 and state.observed
        grid, key_means, ragged = None, None, False  # ragged: key means run past some images' tokens
        for s in steps:
            i, blk = s.block, model.blocks[s.block]
            block_heads, block_hidden = s.heads.tolist(), s.mlp_hidden.tolist()
            reduce = None
            if s.reduces_tokens:
                dev = groups[0].counts.device
                reduce = (s.prune_k.to(dev), s.merge_k.to(dev))
            keys = want_keys and s.ends_stage
            uniform = _uniform_groups(groups, block_heads, block_hidden, reduce)
            if uniform is not None:
                # Each group's images run this block identically (always so at batch 1): plain sliced tensors.
                done = [self._uniform_block(i, blk, g, *u, sized, keys) for g, u in zip(groups, uniform)]
                groups, key_means = [g for g, _ in done], None
                if keys:  # by batch image, zero past each image's tokens
                    key_means = done[0][1].new_zeros(b, max(m.shape[1] for _, m in done))
                    for g, m in done:
                        key_means[g.images, : m.shape[1]] = m
                grid, ragged = None, False
                if reduce is not None:
                    sized = sized or bool((reduce[1] < reduce[0]).any())
                continue
            if grid is None:
                grid = self._grid(groups, b, sized)
            groups, importance, key_means = packed_attention(self._slices, i, blk, groups, grid, block_heads,
                                                             reduce is not None, keys)
            ragged = True
            if reduce is not None:
                prune_k, merge_k = reduce
                if key_means is not None:  # the keys of the tokens that survive this block's reduction
                    order = grid.slot.argsort()  # slot -> image
                    key_means = _survivors(key_means[order], importance, _token_counts(groups, b)[order],
                                           merge_k[order])[grid.slot]
                if bool((merge_k == prune_k).all()):
                    groups = self._prune(groups, grid, importance, prune_k)
                else:
                    sized = True
                    groups = [self._reduce(g, importance[grid.slot[g.images]], prune_k[g.images], merge_k[g.images])
                              for g in groups]
                grid = None
            groups = [self._mlp(i, blk, g, [block_hidden[j] for j in g.images_list()]) for g in groups]
        if key_means is not None:  # zero past each image's tokens, padded to the initial count
            n = key_means.shape[1]
            if ragged:
                counts = _token_counts(groups, b)
                key_means = key_means.masked_fill(torch.arange(n, device=counts.device) >= counts[:, None], 0.0)
            key_means = F.pad(key_means, (0, state.n0 - n))
        return ExecutionState(stage + 1, tuple(groups), plan, sized, key_means, state.budget, state.n0, state.observed)

    def logits(self, state: ExecutionState) -> torch.Tensor:
        with torch.inference_mode():
            return self._logits(state)

    def _logits(self, state: ExecutionState) -> torch.Tensor:
        model = self.model
        if state.stage != model.config.num_stages:
            raise PranceError(f"stage {state.stage} has not run yet; finish the state before reading the logits")
        x0 = state.groups[0].x
        logits = x0.new_empty(state.batch_size, model.config.num_classes)
        for g in state.groups:
            cls = g.x[g.offsets()[:-1]]
            if g.mixed:
                wr = g.img_w[:, None]
                mask = (torch.arange(g.width, device=wr.device) < wr).to(cls.dtype)
                params = self._slices.norm_params(("norm",), model.norm, g.width)
                cls = _masked_layer_norm(cls, wr.to(cls.dtype), mask, *params, model.norm.eps)
            else:
                cls = self._slices.norm(("norm",), model.norm, cls)
            logits[g.images] = model.classify(cls)
        return logits

    def observe(self, state: ExecutionState) -> StageState:
        """The policy's view of ``state``: ordinary tensors (made outside inference mode)."""
        if state.key_means is None:
            raise PranceError(f"no decision is taken before stage {state.stage}; observe states before stages 1.."
                              f"{self.model.config.num_stages - 1}")
        b, d = state.batch_size, self.model.config.embed_dim
        cls = state.key_means.new_zeros(b, d)
        tokens, widths = _token_counts(state.groups, b).clone(), state.groups[0].counts.new_empty(b)
        for g in state.groups:
            cls[g.images, : g.width] = g.x[g.offsets()[:-1]]
            widths[g.images] = g.widths()
        return StageState(state.stage, cls, state.key_means.clone(), tokens, widths, state.budget.clone())

    def cat(self, states: Sequence[ExecutionState]) -> ExecutionState:
        """The images of ``states`` (all at one stage) in one state; tensors are shared, not copied."""
        first, groups, offset = states[0], [], 0
        for st in states:
            if st.stage != first.stage or st.n0 != first.n0:
                raise PranceError("only states at the same stage can be joined")
            groups += [replace(g, images=g.images + offset, grid_rows=None, images_cache=None) for g in st.groups]
            offset += st.batch_size
        key_means = None if first.key_means is None else torch.cat([st.key_means for st in states])
        return ExecutionState(first.stage, tuple(groups), Plan.cat([st.plan for st in states]),
                              any(st.sized for st in states), key_means,
                              torch.cat([st.budget for st in states]), first.n0, first.observed)

    def select(self, state: ExecutionState, images: torch.Tensor) -> ExecutionState:
        """The state of batch images ``images`` (distinct, in that order); untouched groups are shared."""
        dev = state.groups[0].counts.device
        images = torch.as_tensor(images, dtype=torch.int64, device=dev)
        position = torch.full((state.batch_size,), -1, dtype=torch.int64, device=dev)
        position[images] = torch.arange(len(images), device=dev)
        groups = []
        for g in state.groups:
            p = position[g.images]
            inside = p >= 0
            if bool(inside.all()):
                groups.append(replace(g, images=p, grid_rows=None, images_cache=None))
            elif bool(inside.any()):
                keep = inside.nonzero().squeeze(1)
                rows = _rows(g.offsets(), g.counts, keep)
                groups.append(_Group(p[keep], g.counts[keep], g.x.index_select(0, rows), g.size.index_select(0, rows),
                                     None if g.img_w is None else g.img_w[keep]))
        cpu = images.cpu()
        return ExecutionState(state.stage, tuple(groups), state.plan.select(cpu), state.sized,
                              None if state.key_means is None else state.key_means[images],
                              state.budget[cpu], state.n0, state.observed)

    def _uniform_block(self, i: int, blk: Block, g: _Group, heads: int, hidden: int,
                       reduce: tuple[int, int] | None, sized: bool, want_keys: bool
                       ) -> tuple[_Group, torch.Tensor | None]:
        """One block for a group whose images share counts, heads, MLP width and token reduction
        (``(prune_k, merge_k)``); with ``want_keys`` also its images' key means ``[images, tokens]``."""
        attn, (n_img, n, w) = blk.attn, (len(g.counts), g.counts_list()[0], g.width)
        x, size = g.x.view(n_img, n, w), g.size.view(n_img, n)
        qkv = F.linear(self._slices.norm(("norm1", i), blk.norm1, x), *self._slices.qkv(i, blk, w, heads))
        q, k, v = qkv.view(n_img, n, 3, heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        mask = g.size_bias() if sized else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n_img, n, -1)
        x = x + F.linear(o, *self._slices.proj(i, blk, w, heads))
        n_in = n
        if reduce is not None:
            importance = token_ops.attention_importance(q, k, attn.scale, mask)
            state = token_ops.reduce(TokenState(x, size), importance, *reduce)
            x, size, n = state.x, state.size, state.x.shape[1]
        w1, b1, w2, b2 = self._slices.fc(i, blk, w, hidden)
        x = x + F.linear(F.gelu(F.linear(self._slices.norm(("norm2", i), blk.norm2, x), w1, b1)), w2, b2)
        means = None
        if want_keys:  # the keys are one contiguous slice of each token's qkv row (k itself is strided)
            means = qkv.view(n_img, n_in, 3, -1)[:, :, 1].mean(-1)
            if reduce is not None:  # of the tokens that survived this block's reduction
                means = _survivors(means, importance, g.counts, torch.full_like(g.counts, reduce[1]))
        if reduce is None:  # same tokens: counts, sizes and what is cached of them stay
            return g.with_x(x.reshape(n_img * n, w)), means
        return _Group(g.images, torch.full_like(g.counts, n), x.reshape(n_img * n, w), size.reshape(-1)), means

    # ------------------------------------------------------------------ width groups and attention grid
    def _group_widths(self, groups: list[_Group], new_widths: list[int]) -> dict[int, int]:
        """The group width each new width runs in: :func:`~prance.engine.groups.group_widths` for this model."""
        attn = self.model.blocks[0].attn
        ratios = self.model.space.mlp_ratios
        return group_widths(groups, new_widths, self.group_call_macs, attn.num_heads * attn.head_dim,
                            sum(ratios) / len(ratios))

    def _grid(self, groups: list[_Group], b: int, sized: bool) -> _Grid:
        """All images' attention grid, bucketed by this executor's call price."""
        attn = self.model.blocks[0].attn
        return attention_grid(groups, b, sized, 2 * attn.num_heads * attn.head_dim, self.call_macs)

    # ------------------------------------------------------------------ token reduction
    def _prune(self, groups: list[_Group], grid: _Grid, importance: torch.Tensor, keep_k: torch.Tensor
               ) -> list[_Group]:
        """Pruning only: rank every image's tokens at once on the grid, then gather each group's survivors."""
        slot_counts = torch.empty_like(keep_k)
        slot_counts[grid.slot] = keep_k
        alive = torch.empty_like(keep_k)
        alive[grid.slot] = _token_counts(groups, len(keep_k)) - 1
        n = grid.n_max - 1
        kept = token_ops.top_alive(importance, torch.arange(n, device=alive.device) < alive[:, None], slot_counts)
        kept = torch.cat([kept.new_ones(len(kept), 1), kept], 1).view(-1)  # cls always stays
        out = []
        for g in groups:
            rows = kept[grid.rows_of(g)].nonzero().squeeze(1)
            out.append(_Group(g.images, keep_k[g.images] + 1, g.x.index_select(0, rows), g.size.index_select(0, rows),
                              g.img_w))
        return out

    def _reduce(self, g: _Group, importance: torch.Tensor, keep_k: torch.Tensor, merge_k: torch.Tensor) -> _Group:
        """Reduce every image's tokens of the group in one batched call.

        A group whose images all have equal counts before and after uses the physical ops (always
        so for a batch sharing one plan). Otherwise the packed rows are reduced image by image
        with one count per image (:func:`~prance.engine.reduce.reduce_packed`, the masked ops'
        arithmetic without their padding).
        """
        n_max, G = int(g.counts.max()), len(g.counts)
        if not bool((merge_k < g.counts - 1).any()):
            return g
        if bool((g.counts == n_max).all() and (keep_k == keep_k[0]).all() and (merge_k == merge_k[0]).all()):
            state = TokenState(g.x.view(G, n_max, -1), g.size.view(G, n_max))
            state = token_ops.reduce(state, importance[:, : n_max - 1], int(keep_k[0]), int(merge_k[0]))
            n = state.x.shape[1]
            return _Group(g.images, torch.full_like(g.counts, n), state.x.reshape(G * n, -1), state.size.reshape(-1),
                          g.img_w)
        x, size = reduce_packed(g.x, g.size, g.counts, importance, keep_k, merge_k)
        return _Group(g.images, merge_k + 1, x, size, g.img_w)

    # ------------------------------------------------------------------ MLP
    def _mlp(self, i: int, blk: Block, g: _Group, hidden: list[int]) -> _Group:
        """Residual MLP; rows are sorted by MLP width once, so each width runs on a contiguous slice."""
        h = self._slices.group_norm(("norm2", i), blk.norm2, g)
        mask = g.masks()[1] if g.mixed else None
        if len(set(hidden)) == 1:
            w1, b1, w2, b2 = self._slices.fc(i, blk, g.width, hidden[0])
            out = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
            return g.with_x(g.x + (out if mask is None else out * mask))
        # Images' rows are contiguous, so runs of images with equal MLP width are already slices;
        # when there are many more runs than widths, one sorted copy makes each width one slice.
        runs = _runs(hidden, g.counts_list())
        order = None
        if len(runs) > len(set(hidden)) + 2:
            values, order, sizes = g.sort_rows(hidden)
            h = h.index_select(0, order)
            ends = torch.tensor(sizes).cumsum(0).tolist()
            runs = [(m, e - n, e) for m, n, e in zip(values, sizes, ends)]
        out = torch.empty_like(h)
        for m, a, z in runs:
            w1, b1, w2, b2 = self._slices.fc(i, blk, g.width, m)
            torch.addmm(b2, F.gelu(F.linear(h[a:z], w1, b1)), w2.t(), out=out[a:z])
        if mask is not None:
            out = out * _take(mask, order)
        return g.with_x(g.x + out if order is None else g.x.index_add(0, order, out))
