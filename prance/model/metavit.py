"""The channel-elastic meta-network (DESIGN.md §1) and its two execution paths (§2, §5).

``MetaViT(x)`` is a plain pre-norm ViT. ``MetaViT(x, plan)`` runs each image with its own
plan: per-stage residual widths, per-block MLP widths and heads, and per-stage token keep
ratios applied in the first block of stages 1.. after attention and before the MLP.

* ``mode="physical"`` slices weights and gathers tokens, so fewer channels and tokens are
  really computed; images sharing an identical plan run together as one dense sub-batch.
* ``mode="masked"`` keeps full-size tensors and masks channels, heads and removed tokens per
  sample (for training with per-image decisions); it gives the same logits per sample.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.model.layers import Block, ElasticLayerNorm, StageMap
from prance.plan import Plan, kept_count
from prance.tokens import ops as token_ops
from prance.tokens.state import TokenState

MODES = ("physical", "masked")


class TokenReducer(Protocol):
    """A static token-reduction policy (EViT- or ToMe-style baselines) applied after attention."""

    def needs_attn(self, block: int) -> bool: ...

    def __call__(self, block: int, state: TokenState, attn: torch.Tensor | None, keys: torch.Tensor) -> TokenState: ...


class MetaViT(nn.Module):
    """Weight-sharing Vision Transformer able to execute any plan of its search space."""

    def __init__(self, config: ViTConfig, space: SearchSpace | None = None) -> None:
        super().__init__()
        self.config = config
        self.space = space if space is not None else SearchSpace.default_for(config)
        self.space.check_fits(config)
        d = config.embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(config.in_chans, d, config.patch_size, config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, d))
        self.blocks = nn.ModuleList(
            Block(d, config.num_heads, config.mlp_ratio, config.qkv_bias, config.layer_norm_eps)
            for _ in range(config.depth)
        )
        self.stage_maps = nn.ModuleList(StageMap(d) for _ in range(config.num_stages - 1))
        self.norm = ElasticLayerNorm(d, eps=config.layer_norm_eps)
        self.head = nn.Linear(d, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ public API
    def forward(
        self,
        x: torch.Tensor,
        plan: Plan | None = None,
        mode: str = "physical",
        reducer: TokenReducer | None = None,
        trace: list[TokenState] | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, num_classes]``.

        ``plan`` — one row for the whole batch or one row per image (default: full size).
        ``reducer`` — a static token-reduction baseline (physical mode only).
        ``trace`` — if a list is given, the token state after every stage is appended to it
        (with source tracking), for visualisation; a mixed batch needs ``mode="masked"``.
        """
        self.check_input(x)
        if mode not in MODES:
            raise PranceError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        plan = self.full_plan if plan is None else plan
        plan = plan.validate(self.config, self.space).expand(x.shape[0])
        if mode == "masked":
            if reducer is not None:
                raise PranceError("static token reducers run in physical mode only; use mode='physical'")
            return self._forward_masked(x, plan, trace)
        groups = plan.groups()
        if len(groups) == 1:
            return self.forward_shared_plan(x, plan.select(0), reducer, trace)
        if trace is not None:
            raise PranceError("tracing a batch with mixed plans needs mode='masked'")
        logits = x.new_empty(x.shape[0], self.config.num_classes)
        for index in groups:
            logits[index] = self.forward_shared_plan(x[index], plan.select(index[:1]), reducer, None)
        return logits

    @property
    def full_plan(self) -> Plan:
        """The full-size plan, built (and validated) once per model."""
        if "_full" not in self.__dict__:
            self.__dict__["_full"] = Plan.full(self.config)
        return self.__dict__["_full"]

    def check_input(self, x: torch.Tensor) -> None:
        c = self.config
        want = (c.in_chans, c.img_size, c.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise PranceError(
                f"expected images of shape [B, {c.in_chans}, {c.img_size}, {c.img_size}], got {list(x.shape)}; "
                f"resize to {c.img_size}x{c.img_size} with {c.in_chans} channel(s) or build a model for this size"
            )
        if not x.is_floating_point():
            raise PranceError(f"images have dtype {x.dtype}, expected a float tensor; convert and normalise them "
                              "(build_dataset does this)")
        if not bool(torch.isfinite(x).all()):
            raise PranceError(f"images contain {int((~torch.isfinite(x)).sum())} NaN/Inf pixel value(s); check the "
                              "source images and the normalisation (std must be non-zero)")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + cls token + position embedding: ``[B, 1 + P, D]``."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    # ------------------------------------------------------------------ physical path
    def forward_shared_plan(
        self, x: torch.Tensor, plan: Plan, reducer: TokenReducer | None, trace: list[TokenState] | None
    ) -> torch.Tensor:
        """Physical execution of a batch whose images all share the single-row ``plan``."""
        cfg = self.config
        widths = plan.widths[0].tolist()
        heads = plan.heads[0].tolist()
        hidden = plan.mlp_hidden(cfg)[0].tolist()
        keep, merge_keep = plan.keep[0].tolist(), plan.merge_keep[0].tolist()
        state = TokenState.start(self.embed(x), track_source=trace is not None)
        sized = False  # True once merging made token sizes differ from 1
        for i, blk in enumerate(self.blocks):
            stage, first = divmod(i, cfg.stage_depth)
            reduce_here = first == 0 and stage > 0 and (keep[stage] < 1 or merge_keep[stage] < 1)
            if first == 0 and stage > 0 and widths[stage] != widths[stage - 1]:
                state = state.with_x(self.stage_maps[stage - 1](state.x, widths[stage]))
            need_attn = reduce_here or (reducer is not None and reducer.needs_attn(i))
            bias = state.attn_bias() if sized else None
            h, attn, keys = blk.attn(blk.norm1(state.x), heads[i], bias, need_attn)
            state = state.with_x(state.x + h)
            if reduce_here:
                n = state.x.shape[1] - 1
                keep_k = int(kept_count(n, keep[stage]))
                merge_k = int(kept_count(keep_k, merge_keep[stage]))
                state = token_ops.reduce(state, token_ops.cls_importance(attn), keep_k, merge_k)
                sized = sized or merge_k < keep_k
            if reducer is not None:
                state = reducer(i, state, attn, keys)
                sized = True
            state = state.with_x(state.x + blk.mlp(blk.norm2(state.x), hidden[i]))
            if trace is not None and first == cfg.stage_depth - 1:
                trace.append(state)
        return self.classify(self.norm(state.x[:, 0]))

    def classify(self, cls: torch.Tensor) -> torch.Tensor:
        """Logits from normalised cls features of any active width (the head's first columns)."""
        return F.linear(cls, self.head.weight[:, : cls.shape[-1]], self.head.bias)

    # ------------------------------------------------------------------ masked path
    def _forward_masked(self, x: torch.Tensor, plan: Plan, trace: list[TokenState] | None) -> torch.Tensor:
        cfg = self.config
        dev, dtype = x.device, x.dtype
        d = cfg.embed_dim
        widths = plan.widths.to(dev)
        channel_masks = (torch.arange(d, device=dev) < widths[:, :, None]).to(dtype)  # [B, S, D]
        width_f = widths.to(dtype)
        hidden = plan.mlp_hidden(cfg).to(dev)
        hidden_dim = self.blocks[0].mlp.fc1.out_features
        head_masks = torch.arange(cfg.num_heads, device=dev) < plan.heads.to(dev)[:, :, None]  # [B, depth, H]
        keep, merge_keep = plan.keep.to(dev), plan.merge_keep.to(dev)

        state = TokenState.start(self.embed(x), track_source=trace is not None, masked=True)
        for i, blk in enumerate(self.blocks):
            stage, first = divmod(i, cfg.stage_depth)
            cm = channel_masks[:, stage, None, :]
            wf = width_f[:, stage, None, None]
            reduce_here = first == 0 and stage > 0 and bool(((keep[:, stage] < 1) | (merge_keep[:, stage] < 1)).any())
            if first == 0 and stage > 0:
                changed = widths[:, stage] != widths[:, stage - 1]
                if bool(changed.any()):
                    mapped = self.stage_maps[stage - 1].forward_masked(state.x, cm)
                    state = state.with_x(torch.where(changed[:, None, None], mapped, state.x))
            h, attn, _ = blk.attn.forward_masked(
                blk.norm1.forward_masked(state.x, cm, wf), cm, head_masks[:, i], state.attn_bias(), reduce_here
            )
            state = state.with_x(state.x + h)
            if reduce_here:
                keep_k = kept_count(state.num_patches(), keep[:, stage])
                merge_k = kept_count(keep_k, merge_keep[:, stage])
                importance = token_ops.cls_importance(attn, head_masks[:, i])
                state = token_ops.reduce_masked(state, importance, keep_k.to(dev), merge_k.to(dev))
            hm = (torch.arange(hidden_dim, device=dev) < hidden[:, i, None]).to(dtype)[:, None, :]
            mlp_out = blk.mlp.forward_masked(blk.norm2.forward_masked(state.x, cm, wf), cm, hm)
            state = state.with_x(state.x + mlp_out)
            if trace is not None and first == cfg.stage_depth - 1:
                trace.append(state)
        last = cfg.num_stages - 1
        cls = self.norm.forward_masked(state.x[:, :1], channel_masks[:, last, None, :], width_f[:, last, None, None])
        return self.head(cls[:, 0])

