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
from prance.plan import Plan, kept_count

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
    zeros = lambda: torch.zeros(b, dtype=torch.int64)  # noqa: E731
    parts = {k: zeros() for k in (*MATMUL_PARTS, "norm")}
    hd = cfg.head_dim
    widths, heads, hidden = plan.widths, plan.heads, plan.mlp_hidden(cfg)

    parts["patch_embed"] += cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim
    n = torch.full((b,), cfg.num_patches + 1, dtype=torch.int64)  # tokens incl. cls
    for i in range(cfg.depth):
        stage, first = divmod(i, cfg.stage_depth)
        w, h, m = widths[:, stage], heads[:, i], hidden[:, i]
        if first == 0 and stage > 0:
            w_prev = widths[:, stage - 1]
            parts["stage_map"] += torch.where(w != w_prev, n * w_prev * w, 0)
        inner = h * hd
        parts["norm"] += n * w
        parts["qkv"] += n * w * 3 * inner
        parts["attention"] += 2 * h * n * n * hd
        parts["proj"] += n * inner * w
        if first == 0 and stage > 0:
            keep_k = kept_count(n - 1, plan.keep[:, stage])
            merge_k = kept_count(keep_k, plan.merge_keep[:, stage])
            parts["token_merge"] += (keep_k - merge_k) * merge_k * w
            n = merge_k + 1
        if reducer is not None:
            n_before = n
            n = torch.tensor([reducer.tokens_after(i, int(t)) for t in n_before], dtype=torch.int64)
            parts["token_merge"] += torch.tensor(
                [reducer.extra_macs(i, int(t), int(wi), hd) for t, wi in zip(n_before, w)], dtype=torch.int64
            )
        parts["norm"] += n * w
        parts["fc1"] += n * w * m
        parts["fc2"] += n * m * w
    w_last = widths[:, -1]
    parts["norm"] += w_last
    parts["head"] += w_last * cfg.num_classes
    return parts


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
    widths, heads, hidden = plan.widths, plan.heads, plan.mlp_hidden(cfg)
    qkv_bias = 1 if cfg.qkv_bias else 0
    for i in range(cfg.depth):
        stage, first = divmod(i, cfg.stage_depth)
        w, inner, m = widths[:, stage], heads[:, i] * hd, hidden[:, i]
        if first == 0 and stage > 0:
            w_prev = widths[:, stage - 1]
            total += torch.where(w != w_prev, w_prev * w + w, 0)
        total += 2 * w + (w * 3 * inner + 3 * inner * qkv_bias) + (inner * w + w)  # norm1, qkv, proj
        total += 2 * w + (w * m + m) + (m * w + w)  # norm2, fc1, fc2
    w_last = widths[:, -1]
    total += 2 * w_last + w_last * cfg.num_classes + cfg.num_classes
    return total


def count_params(model: MetaViT | ViTConfig, plan: Plan | None = None) -> int:
    """Parameters one sample activates under ``plan``; a multi-row plan gives the mean."""
    return int(round(params_per_sample(model, plan).double().mean().item()))


def token_fractions(config: ViTConfig, plan: Plan, reducer: CostedReducer | None = None) -> torch.Tensor:
    """``[B, S]`` fraction of the original patch tokens each stage ends with (plan and/or reducer)."""
    n = torch.full((plan.batch_size,), config.num_patches + 1, dtype=torch.int64)  # incl. cls
    fractions = []
    for i in range(config.depth):
        stage, first = divmod(i, config.stage_depth)
        if first == 0 and stage > 0:
            n = kept_count(kept_count(n - 1, plan.keep[:, stage]), plan.merge_keep[:, stage]) + 1
        if reducer is not None:
            n = torch.tensor([reducer.tokens_after(i, int(t)) for t in n], dtype=torch.int64)
        if first == config.stage_depth - 1:
            fractions.append((n - 1).double() / config.num_patches)
    return torch.stack(fractions, dim=1)
