"""Exact per-sample cost of a plan: MACs, activated parameters, surviving tokens (DESIGN.md §4).

Everything is an analytic formula over the active widths and token counts, which depend only
on the plan (never on pixel values), so the cost of an image is known before it runs. One
MAC is one multiply-add of a matrix product; :class:`torch.utils.flop_counter.FlopCounterMode`
counts 2 FLOPs per MAC. LayerNorms are priced at one MAC per element (their affine step) and
reported separately as ``norm``, because FLOP counters do not see them.
"""

from __future__ import annotations

from typing import Protocol

import torch

from prance.config import ViTConfig
from prance.model.metavit import MetaViT
from prance.plan import Plan
from prance.schedule import TokensAfter, walk

#: Components that are matrix products (what FlopCounterMode sees).
MATMUL_PARTS = ("patch_embed", "stage_map", "qkv", "attention", "proj", "fc1", "fc2", "token_merge", "head")


class CostedReducer(Protocol):
    """A static token reducer that can tell its token counts and own cost in advance."""

    def tokens_after(self, block: int, n_tokens: int) -> int: ...

    def extra_macs(self, block: int, n_tokens: int, width: int, head_dim: int) -> int: ...


def mac_breakdown(
    model: MetaViT | ViTConfig, plan: Plan | None = None, reducer: CostedReducer | None = None
) -> dict[str, torch.Tensor]:
    """Per-sample MACs of every component: ``{name: LongTensor[B]}`` (B = plan rows)."""
    cfg = model.config if isinstance(model, MetaViT) else model
    plan = Plan.full(cfg) if plan is None else plan
    b = plan.batch_size
    parts = {k: torch.zeros(b, dtype=torch.int64) for k in (*MATMUL_PARTS, "norm")}
    hd = cfg.head_dim
    parts["patch_embed"] += cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim
    for s in walk(cfg, plan, _tokens_after(reducer)):
        w, n, inner, m = s.width, s.tokens_in, s.heads * hd, s.mlp_hidden
        if s.starts_stage:
            parts["stage_map"] += torch.where(w != s.prev_width, n * s.prev_width * w, 0)
        parts["norm"] += n * w
        parts["qkv"] += n * w * 3 * inner
        parts["attention"] += 2 * s.heads * n * n * hd
        if s.starts_stage:  # the cls query's attention once more, as token importance, where tokens go
            parts["attention"] += torch.where(s.merge_k < n - 1, s.heads * n * hd, 0)
        parts["proj"] += n * inner * w
        parts["token_merge"] += (s.prune_k - s.merge_k) * s.merge_k * w
        if reducer is not None:
            parts["token_merge"] += torch.tensor(
                [reducer.extra_macs(s.block, int(t), int(wi), hd) for t, wi in zip(s.merge_k + 1, w)],
                dtype=torch.int64)
        n = s.tokens_out
        parts["norm"] += n * w
        parts["fc1"] += n * w * m
        parts["fc2"] += n * m * w
    w_last = plan.widths[:, -1]
    parts["norm"] += w_last
    parts["head"] += w_last * cfg.num_classes
    return parts


def _tokens_after(reducer: CostedReducer | None) -> TokensAfter | None:
    if reducer is None:
        return None
    return lambda block, n: torch.tensor([reducer.tokens_after(block, int(t)) for t in n], dtype=torch.int64)


def macs_per_sample(
    model: MetaViT | ViTConfig, plan: Plan | None = None, reducer: CostedReducer | None = None
) -> torch.Tensor:
    """``LongTensor[B]``: total MACs of each plan row."""
    return sum(mac_breakdown(model, plan, reducer).values())


def count_macs(model: MetaViT | ViTConfig, plan: Plan | None = None, reducer: CostedReducer | None = None) -> int:
    """MACs of one sample under ``plan`` (default: full size); a multi-row plan gives the mean."""
    return int(round(macs_per_sample(model, plan, reducer).double().mean().item()))


def params_per_sample(model: MetaViT | ViTConfig, plan: Plan | None = None) -> torch.Tensor:
    """``LongTensor[B]``: parameters each plan row actually reads (sliced weights and biases)."""
    cfg = model.config if isinstance(model, MetaViT) else model
    plan = Plan.full(cfg) if plan is None else plan
    d, hd = cfg.embed_dim, cfg.head_dim
    total = torch.full((plan.batch_size,), 0, dtype=torch.int64)
    total += cfg.in_chans * cfg.patch_size**2 * d + d  # patch embedding
    total += d + (cfg.num_patches + 1) * d  # cls token + position embedding
    qkv_bias = 1 if cfg.qkv_bias else 0
    for s in walk(cfg, plan):
        w, inner, m = s.width, s.heads * hd, s.mlp_hidden
        if s.starts_stage:
            total += torch.where(w != s.prev_width, s.prev_width * w + w, 0)
        total += 2 * w + (w * 3 * inner + 3 * inner * qkv_bias) + (inner * w + w)  # norm1, qkv, proj
        total += 2 * w + (w * m + m) + (m * w + w)  # norm2, fc1, fc2
    w_last = plan.widths[:, -1]
    total += 2 * w_last + w_last * cfg.num_classes + cfg.num_classes
    return total


def count_params(model: MetaViT | ViTConfig, plan: Plan | None = None) -> int:
    """Parameters one sample activates under ``plan``; a multi-row plan gives the mean."""
    return int(round(params_per_sample(model, plan).double().mean().item()))


def token_fractions(config: ViTConfig, plan: Plan, reducer: CostedReducer | None = None) -> torch.Tensor:
    """``[B, S]`` fraction of the original patch tokens each stage ends with (plan and/or reducer)."""
    ends = [s.tokens_out for s in walk(config, plan, _tokens_after(reducer)) if s.ends_stage]
    return torch.stack([(n - 1).double() / config.num_patches for n in ends], dim=1)
