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
* groups are rebuilt at every stage boundary, where widths change and tokens are reduced.

The engine reads the meta-network's weights, it owns none; for every image its logits equal
``MetaViT(x, plan, mode="masked")`` for that image (up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from prance.errors import PranceError
from prance.model.layers import Block
from prance.model.metavit import MetaViT
from prance.engine.reduce import reduce_packed
from prance.engine.stepwise import StepwiseExecutor, budget_slot
from prance.plan import Plan
from prance.schedule import stage_steps
from prance.policy import StageState
from prance.tokens import ops as token_ops
from prance.tokens.state import TokenState

#: ``exact``: only images with equal token counts share an attention call (never pads);
#: ``padded``: one call for the whole batch, padded to the longest; ``auto``: the cost model.
ATTENTION_MODES = ("auto", "exact", "padded")
_CALL_MACS = {"exact": 0.0, "padded": float("inf")}

#: Fixed price of one more attention call, in MACs: about 15 µs of call overhead at the
#: ~16 GMAC/s a CPU core reaches on small attention problems (measured on the dev machine).
DEFAULT_ATTENTION_CALL_MACS = 2.5e5

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
            within = torch.arange(len(g.x), device=g.counts.device) - torch.repeat_interleave(g.offsets()[:-1], g.counts)
            g.grid_rows = torch.repeat_interleave(self.slot[g.images] * self.n_max, g.counts) + within
        return g.grid_rows


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


def cheapest_cut(k: int, cost: Callable[[int, int], float]) -> list[tuple[int, int]]:
    """Split ``0..k`` into contiguous segments ``(a, z)`` minimising the sum of ``cost(a, z)`` (DP)."""
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


def _uniform(groups: list[_Group], heads: list[int], hidden: list[int],
             reduce: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """Does every image run the next block identically (one width, count, heads, MLP width, reduction)?"""
    if len(heads) == 1:
        return True
    if len(groups) > 1 or len(set(heads)) > 1 or len(set(hidden)) > 1:
        return False
    counts = groups[0].counts
    if groups[0].mixed or not bool((counts == counts[0]).all()):
        return False
    return reduce is None or all(bool((t == t[0]).all()) for t in reduce)


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


def _token_counts(groups: list[_Group], b: int) -> torch.Tensor:
    """``[B]`` tokens (cls included) of every batch image (a lone image's group's own tensor: do not write to it)."""
    if b == 1:
        return groups[0].counts
    counts = groups[0].counts.new_empty(b)
    for g in groups:
        counts[g.images] = g.counts
    return counts


def _survivors(values: torch.Tensor, importance: torch.Tensor, counts: torch.Tensor, merge_k: torch.Tensor
               ) -> torch.Tensor:
    """``[B, n]`` per-token ``values`` (cls first) of the tokens a reduction to ``merge_k`` patch tokens
    keeps, moved to the front in order. Prune-then-merge keeps the ``merge_k`` most important alive
    patches (merging only folds the others into them), so the survivors follow from importance alone."""
    n = importance.shape[1]
    alive = torch.arange(n, device=counts.device) < (counts - 1)[:, None]
    kept = token_ops.top_alive(importance, alive, merge_k)
    return token_ops.compact(values, torch.cat([kept.new_ones(len(kept), 1), kept], 1))


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows ``rows`` of ``t`` (all of it for None); index_select is the fast CPU gather."""
    return t if rows is None else t.index_select(0, rows)


def _rows(offsets: torch.Tensor, counts: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Packed row indices of images ``order`` (each image's rows, image after image)."""
    c = counts[order]
    starts = offsets[:-1][order]
    within = torch.arange(int(c.sum()), device=c.device) - torch.repeat_interleave(F.pad(c.cumsum(0), (1, 0))[:-1], c)
    return torch.repeat_interleave(starts, c) + within


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
        self._views: dict[tuple, tuple[tuple, tuple[torch.Tensor, ...]]] = {}

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
        steps = stage_steps(cfg, plan, stage, _token_counts(groups, b).cpu())
        if stage > 0:
            groups = self._regroup(groups, steps[0].width.tolist(), stage)
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
            if _uniform(groups, block_heads, block_hidden, reduce):
                # Every image runs this block identically (always so at batch 1): plain sliced tensors.
                groups, key_means = self._uniform_block(i, blk, groups[0], block_heads[0], block_hidden[0], reduce,
                                                        sized, keys)
                grid, ragged = None, False
                if reduce is not None:
                    sized = sized or bool((reduce[1] < reduce[0]).any())
                continue
            if grid is None:
                grid = self._grid(groups, b, sized)
            groups, importance, key_means = self._attention(i, blk, groups, grid, block_heads, reduce is not None, keys)
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
                cls = _masked_layer_norm(cls, wr.to(cls.dtype), mask, *self._norm_params(("norm",), model.norm, g.width),
                                         model.norm.eps)
            else:
                cls = self._norm(("norm",), model.norm, cls)
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
                       reduce: tuple[torch.Tensor, torch.Tensor] | None, sized: bool, want_keys: bool
                       ) -> tuple[list[_Group], torch.Tensor | None]:
        """One block for a group whose images share counts, heads, MLP width and token reduction."""
        attn, (n_img, n, w) = blk.attn, (len(g.counts), g.counts_list()[0], g.width)
        x, size = g.x.view(n_img, n, w), g.size.view(n_img, n)
        qkv = F.linear(self._norm(("norm1", i), blk.norm1, x), *self._qkv(i, blk, w, heads))
        q, k, v = qkv.view(n_img, n, 3, heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        mask = g.size_bias() if sized else None
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n_img, n, -1)
        x = x + F.linear(o, *self._proj(i, blk, w, heads))
        if reduce is not None:
            importance = token_ops.attention_importance(q, k, attn.scale, mask)
            state = token_ops.reduce(TokenState(x, size), importance, int(reduce[0][0]), int(reduce[1][0]))
            x, size, n = state.x, state.size, state.x.shape[1]
        w1, b1, w2, b2 = self._fc(i, blk, w, hidden)
        x = x + F.linear(F.gelu(F.linear(self._norm(("norm2", i), blk.norm2, x), w1, b1)), w2, b2)
        key_means = None
        if want_keys:  # keys of this block, by batch image (the group may be a subset in any order)
            means = k.mean((1, 3))
            if reduce is not None:  # of the tokens that survived this block's reduction
                means = _survivors(means, importance, g.counts, reduce[1][g.images])
            if n_img == 1:
                key_means = means
            else:
                key_means = k.new_empty(int(g.images.max()) + 1, means.shape[1])
                key_means[g.images] = means
        if reduce is None:  # same tokens: counts, sizes and what is cached of them stay
            return [g.with_x(x.reshape(n_img * n, w))], key_means
        out = _Group(g.images, torch.full_like(g.counts, n), x.reshape(n_img * n, w), size.reshape(-1))
        return [out], key_means

    # ------------------------------------------------------------------ weights
    def _cached(self, key: tuple, source: torch.Tensor, make: Callable[[], tuple[torch.Tensor, ...]],
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

    def _qkv(self, i: int, blk: Block, width: int, heads: int) -> tuple[torch.Tensor, ...]:
        qkv = blk.attn.qkv
        copies = () if heads == blk.attn.num_heads else tuple(t for t in (qkv.weight, qkv.bias) if t is not None)
        return self._cached(("qkv", i, width, heads), qkv.weight, lambda: blk.attn.qkv_params(width, heads), copies)

    def _proj(self, i: int, blk: Block, width: int, heads: int) -> tuple[torch.Tensor, ...]:
        p, c = blk.attn.proj, heads * blk.attn.head_dim
        return self._cached(("proj", i, width, heads), p.weight, lambda: (p.weight[:width, :c], p.bias[:width]))

    def _fc(self, i: int, blk: Block, width: int, hidden: int) -> tuple[torch.Tensor, ...]:
        m = blk.mlp
        return self._cached(("mlp", i, width, hidden), m.fc1.weight, lambda: (
            m.fc1.weight[:hidden, :width], m.fc1.bias[:hidden], m.fc2.weight[:width, :hidden], m.fc2.bias[:width]))

    def _group_norm(self, key: tuple, norm: torch.nn.LayerNorm, g: _Group) -> torch.Tensor:
        """LayerNorm of a group's rows, each over its own active channels."""
        if not g.mixed:
            return self._norm(key, norm, g.x)
        return _masked_layer_norm(g.x, *g.masks(), *self._norm_params(key, norm, g.width), norm.eps)

    def _norm(self, key: tuple, norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        return F.layer_norm(x, (w,), *self._norm_params(key, norm, w), norm.eps)

    def _norm_params(self, key: tuple, norm: torch.nn.LayerNorm, w: int) -> tuple[torch.Tensor, ...]:
        return self._cached((*key, w), norm.weight, lambda: (norm.weight[:w], norm.bias[:w]))

    # ------------------------------------------------------------------ stage boundary
    def _regroup(self, groups: list[_Group], new_widths: list[int], stage: int) -> list[_Group]:
        """Regroup images by their width for ``stage``, applying the stage map where it changes.

        The map runs once per old group, at the largest new width any of its images needs; a
        narrower image takes the first columns of that output (first-k slicing makes it exact).
        Images whose width has a small group join a wider one, zero-padded (see
        :meth:`_group_widths`). Each old group is permuted once so that every new group's
        images are a contiguous slice of it.
        """
        stage_map = self.model.stage_maps[stage - 1]
        if len(groups) == 1 and not groups[0].mixed and new_widths.count(new_widths[0]) == len(new_widths):
            # One group, one new width (always so at batch 1): the map, or nothing, on every row.
            g, w = groups[0], new_widths[0]
            return [_Group(g.images, g.counts, g.x if w == g.width else stage_map(g.x, w), g.size)]
        target = self._group_widths(groups, new_widths)
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
                x = x * (torch.arange(w_top, device=x.device) < torch.repeat_interleave(new_w, g.counts)[:, None]).to(x.dtype)
            dest = torch.tensor([target[w] for w in new_w.tolist()], device=g.counts.device)
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
        for w, parts in pieces.items():
            parts = [(i, c, x[:, :w] if x.shape[1] >= w else F.pad(x, (0, w - x.shape[1])), s, iw)
                     for i, c, x, s, iw in parts]
            images, counts, x, size, img_w = (parts[0] if len(parts) == 1 else
                                              [torch.cat([p[k] for p in parts]) for k in range(5)])
            out.append(_Group(images, counts, x, size, None if bool((img_w == w).all()) else img_w))
        return out

    def _group_widths(self, groups: list[_Group], new_widths: list[int]) -> dict[int, int]:
        """The group width each new width runs in: its own, or a wider one when cheaper.

        Running ``rows`` tokens of width ``w`` inside a group of width ``W`` costs about
        ``rows × W × (4·A + 2·r·w)`` MACs per block (A = attention channels, r = mean MLP
        ratio) against ``rows × w × (…)`` alone; each group costs ``group_call_macs`` more.
        """
        rows: dict[int, int] = {}
        for g in groups:
            for j, c in zip(g.images.tolist(), g.counts_list()):
                rows[new_widths[j]] = rows.get(new_widths[j], 0) + c
        values = sorted(rows)
        if self.group_call_macs == 0 or len(values) == 1:
            return {w: w for w in values}
        if self.group_call_macs == float("inf"):
            return {w: values[-1] for w in values}
        attn = self.model.blocks[0].attn
        a_dim = attn.num_heads * attn.head_dim
        ratio = sum(self.model.space.mlp_ratios) / len(self.model.space.mlp_ratios)

        def cost(a: int, z: int) -> float:
            top = values[z - 1]
            return self.group_call_macs + sum(rows[w] * top * (4 * a_dim + 2 * ratio * w) for w in values[a:z])

        return {w: values[z - 1] for a, z in cheapest_cut(len(values), cost) for w in values[a:z]}

    # ------------------------------------------------------------------ attention
    def _grid(self, groups: list[_Group], b: int, sized: bool) -> _Grid:
        """Sort all images by token count into one grid and cut it into buckets."""
        for g in groups:  # rows cached for an earlier grid (e.g. a group no reduction touched) are stale here
            g.grid_rows = None
        counts = _token_counts(groups, b)
        order = counts.sort(stable=True).indices
        slot = torch.empty_like(order)
        slot[order] = torch.arange(b, device=order.device)
        sorted_counts = counts[order].tolist()
        attn = self.model.blocks[0].attn
        cut = buckets(sorted_counts, 2 * attn.num_heads * attn.head_dim, self.call_macs)
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

    def _attention(self, i: int, blk: Block, groups: list[_Group], grid: _Grid, heads: list[int],
                   need_importance: bool, want_keys: bool = False
                   ) -> tuple[list[_Group], torch.Tensor | None, torch.Tensor | None]:
        """Residual attention for every group.

        Also returns cls importance ``[slots, n_max - 1]`` if asked and, with ``want_keys``, the
        keys averaged over the active heads' channels, per image ``[B, n_max]`` (garbage past
        each image's count).
        """
        attn = blk.attn
        hd, h_max, b = attn.head_dim, max(heads), len(heads)
        same_heads = heads.count(h_max) == b
        normed = [self._group_norm(("norm1", i), blk.norm1, g) for g in groups]
        # Fast path: one group holding every image in slot order with no padding needs no grid.
        direct = (len(groups) == 1 and len(grid.buckets) == 1 and not grid.masked[0] and same_heads
                  and bool((grid.slot[groups[0].images] == torch.arange(b, device=grid.slot.device)).all()))
        if direct:
            qkv = F.linear(normed[0], *self._qkv(i, blk, groups[0].width, h_max))
        else:
            zero = h_max != attn.num_heads or not same_heads  # unused heads must be zero
            qkv = groups[0].x.new_zeros if zero else groups[0].x.new_empty
            qkv = qkv(b * grid.n_max, 3, h_max, hd)
            if grid.pad_rows is not None and not zero:
                qkv.index_fill_(0, grid.pad_rows, 0.0)  # padded keys/values must be finite
            for g, h in zip(groups, normed):
                for hv, rows in self._by_heads(g, heads, same_heads):
                    out = F.linear(_take(h, rows), *self._qkv(i, blk, g.width, hv)).view(-1, 3, hv, hd)
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
            for hv, rows in self._by_heads(g, heads, same_heads):
                proj = F.linear(_take(o, rows)[:, : hv * hd], *self._proj(i, blk, g.width, hv))
                if g.mixed:  # rows narrower than the group stay zero beyond their width
                    proj = proj * _take(g.masks()[1], rows)
                # never in place into the incoming rows: they may belong to a state that is continued elsewhere
                x = x + proj if rows is None else x.index_add(0, rows, proj) if x is g.x else x.index_add_(0, rows, proj)
            new_groups.append(g.with_x(x))
        return new_groups, importance, key_means

    @staticmethod
    def _by_heads(g: _Group, heads: list[int], same: bool = False) -> list[tuple[int, torch.Tensor | None]]:
        """``(heads, rows)`` for each head count of the group's images (rows None: all of them)."""
        if same:
            return [(heads[0], None)]
        values = [heads[j] for j in g.images_list()]
        if len(set(values)) == 1:
            return [(values[0], None)]
        return g.partition(values)

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
        h = self._group_norm(("norm2", i), blk.norm2, g)
        mask = g.masks()[1] if g.mixed else None
        if len(set(hidden)) == 1:
            w1, b1, w2, b2 = self._fc(i, blk, g.width, hidden[0])
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
            w1, b1, w2, b2 = self._fc(i, blk, g.width, m)
            torch.addmm(b2, F.gelu(F.linear(h[a:z], w1, b1)), w2.t(), out=out[a:z])
        if mask is not None:
            out = out * _take(mask, order)
        return g.with_x(g.x + out if order is None else g.x.index_add(0, order, out))


def _version(t: torch.Tensor) -> int | None:
    """In-place version counter of ``t``; None for inference tensors, which have none (never cached)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _masked_layer_norm(x: torch.Tensor, width: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of zero-padded rows over their first ``width`` channels (``mask`` marks them)."""
    mean = x.sum(-1, keepdim=True) / width
    centred = (x - mean) * mask
    var = (centred * centred).sum(-1, keepdim=True) / width
    return (centred * torch.rsqrt(var + eps) * weight + bias) * mask
