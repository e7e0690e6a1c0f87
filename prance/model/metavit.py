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

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.model.layers import Block, ElasticLayerNorm, StageMap
from prance.plan import Plan
from prance.schedule import stage_steps
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
        plan = (self.full_plan if plan is None else plan).validate(self.config, self.space)
        if mode == "masked":
            if reducer is not None:
                raise PranceError("static token reducers run in physical mode only; use mode='physical'")
            return self._forward_masked(x, plan.expand(x.shape[0]), trace)
        if plan.batch_size == 1:  # one plan for the batch: nothing to group
            return self.forward_shared_plan(x, plan, reducer, trace)
        groups = plan.expand(x.shape[0]).groups()
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
        state = TokenState.start(self.embed(x), track_source=trace is not None)
        sized = False  # True once merging made token sizes differ from 1
        for stage in range(self.config.num_stages):
            for s in stage_steps(self.config, plan, stage, torch.tensor([state.x.shape[1]])):
                blk = self.blocks[s.block]
                width = int(s.width[0])
                if s.starts_stage and width != int(s.prev_width[0]):
                    state = state.with_x(self.stage_maps[stage - 1](state.x, width))
                bias = state.attn_bias() if sized else None
                need_attn = reducer is not None and reducer.needs_attn(s.block)
                h, attn, q, keys = blk.attn(blk.norm1(state.x), int(s.heads[0]), bias, need_attn)
                state = state.with_x(state.x + h)
                if s.reduces_tokens:
                    importance = token_ops.attention_importance(q, keys, blk.attn.scale, _key_mask(bias))
                    prune_k, merge_k = int(s.prune_k[0]), int(s.merge_k[0])
                    state = token_ops.reduce(state, importance, prune_k, merge_k)
                    sized = sized or merge_k < prune_k
                if reducer is not None:
                    state = reducer(s.block, state, attn, keys)
                    sized = True
                state = state.with_x(state.x + blk.mlp(blk.norm2(state.x), int(s.mlp_hidden[0])))
            if trace is not None:
                trace.append(state)
        return self.classify(self.norm(state.x[:, 0]))

    def classify(self, cls: torch.Tensor) -> torch.Tensor:
        """Logits from normalised cls features of any active width (the head's first columns)."""
        return F.linear(cls, self.head.weight[:, : cls.shape[-1]], self.head.bias)

    # ------------------------------------------------------------------ masked path
    def _forward_masked(self, x: torch.Tensor, plan: Plan, trace: list[TokenState] | None) -> torch.Tensor:
        state = self.start_masked(x, plan, track_source=trace is not None, trace=trace)
        while state.stage < self.config.num_stages:
            state = self.run_stage_masked(state, trace=trace)
        return self.logits_masked(state)

    def start_masked(self, x: torch.Tensor, plan: Plan | None = None, track_source: bool = False,
                     trace: list[TokenState] | None = None) -> MaskedState:
        """Masked path, stepwise: embed ``x`` and run stage 0 (``plan`` — default full size —
        holds the stages to come until they are replaced). Autograd flows through every step."""
        self.check_input(x)
        plan = (self.full_plan if plan is None else plan).validate(self.config, self.space).expand(x.shape[0])
        tokens = TokenState.start(self.embed(x), track_source=track_source, masked=True)
        return self.run_stage_masked(MaskedState(0, tokens, plan, None), trace=trace)

    def run_stage_masked(self, state: MaskedState, plan: Plan | None = None,
                         trace: list[TokenState] | None = None) -> MaskedState:
        """Stage ``state.stage`` of every image under ``plan`` (default: the state's plan) in
        masked execution; a new state (``state`` itself is never changed, so it can be continued
        several ways). The new state's plan is ``plan``."""
        cfg, t = self.config, state.tokens
        if state.stage >= cfg.num_stages:
            raise PranceError("every stage has run; read the logits with logits_masked")
        plan = state.plan if plan is None else plan.validate(cfg, self.space).expand(t.x.shape[0])
        dev, dtype = t.x.device, t.x.dtype
        steps = stage_steps(cfg, plan, state.stage, t.num_patches().cpu() + 1)
        first = steps[0]
        width = first.width.to(dev)
        cm = (torch.arange(cfg.embed_dim, device=dev) < width[:, None]).to(dtype)[:, None, :]
        wf = width.to(dtype)[:, None, None]
        if first.starts_stage:
            changed = (first.width != first.prev_width).to(dev)
            if bool(changed.any()):
                mapped = self.stage_maps[state.stage - 1].forward_masked(t.x, cm)
                t = t.with_x(torch.where(changed[:, None, None], mapped, t.x))
        key_means = None
        for s in steps:
            blk = self.blocks[s.block]
            heads = s.heads.to(dev)
            head_mask = torch.arange(cfg.num_heads, device=dev) < heads[:, None]
            bias = t.attn_bias()
            h, _, q, k = blk.attn.forward_masked(blk.norm1.forward_masked(t.x, cm, wf), cm, head_mask, bias)
            t = t.with_x(t.x + h)
            if s.reduces_tokens:
                importance = token_ops.attention_importance(q, k, blk.attn.scale, _key_mask(bias), heads)
                t = token_ops.reduce_masked(t, importance, s.prune_k.to(dev), s.merge_k.to(dev))
            hidden_dim = blk.mlp.fc1.out_features
            hm = (torch.arange(hidden_dim, device=dev) < s.mlp_hidden.to(dev)[:, None]).to(dtype)[:, None, :]
            t = t.with_x(t.x + blk.mlp.forward_masked(blk.norm2.forward_masked(t.x, cm, wf), cm, hm))
            if s.ends_stage and s.stage < cfg.num_stages - 1:
                # Keys averaged over the active heads' channels (inactive heads' keys are zero).
                key_means = k.sum((1, 3)) / (heads * blk.attn.head_dim).to(dtype)[:, None]
        if trace is not None:
            trace.append(t)
        return MaskedState(state.stage + 1, t, plan, key_means)

    def logits_masked(self, state: MaskedState) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of a masked state that has run every stage."""
        if state.stage != self.config.num_stages:
            raise PranceError(f"stage {state.stage} has not run yet; run every stage before reading the logits")
        x, d = state.tokens.x, self.config.embed_dim
        width = state.plan.widths[:, -1].to(x.device)
        cm = (torch.arange(d, device=x.device) < width[:, None]).to(x.dtype)[:, None, :]
        cls = self.norm.forward_masked(x[:, :1], cm, width.to(x.dtype)[:, None, None])
        return self.head(cls[:, 0])


@dataclass(frozen=True)
class MaskedState:
    """A batch partway through the masked path: every image has run the stages before ``stage``.

    tokens:    the masked token state after stage ``stage - 1``.
    plan:      ``[B]`` rows; the stages that ran, and the defaults of those to come.
    key_means: ``[B, N]`` the last block's keys averaged over the channels of its active heads,
               at every token position (removed tokens included); None after the last stage.
    """

    stage: int
    tokens: TokenState
    plan: Plan
    key_means: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return self.tokens.x.shape[0]


def _key_mask(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A ``[B, N]`` key bias as an attention mask ``[B, 1, 1, N]``."""
    return None if bias is None else bias[:, None, None, :]
