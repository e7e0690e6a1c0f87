"""Elastic layers: one full-size weight tensor, executed at any smaller size by first-k slicing.

Every layer has two paths that compute the same thing:

* physical — weights sliced to the active size, inputs really smaller (real savings);
* masked — full-size tensors, inactive channels zeroed by per-sample masks (so one batch can
  mix sizes during training).

State-dict keys follow timm (``qkv``, ``proj``, ``fc1``, ``fc2``, ``norm1``…).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ElasticLayerNorm(nn.LayerNorm):
    """LayerNorm over the active channels only, in both paths (DESIGN.md §1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # physical: x has the active width
        w = x.shape[-1]
        return F.layer_norm(x, (w,), self.weight[:w], self.bias[:w], self.eps)

    def forward_masked(self, x: torch.Tensor, channel_mask: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        """``x`` [B, N, D] is zero beyond each sample's width; ``channel_mask`` [B, 1, D]; ``width`` [B, 1, 1]."""
        mean = x.sum(-1, keepdim=True) / width
        centred = (x - mean) * channel_mask
        var = (centred * centred).sum(-1, keepdim=True) / width
        return (centred * torch.rsqrt(var + self.eps) * self.weight + self.bias) * channel_mask


class Attention(nn.Module):
    """Multi-head self-attention with elastic input width and (optionally) elastic heads.

    The head dimension is fixed; ``heads`` selects the first heads of q, k and v. A key bias
    carries proportional attention (log token size) and, in masked mode, -inf for removed tokens.
    ``fused_attn = False`` forces the explicit softmax path everywhere (FLOP counters see it;
    PyTorch's CPU SDPA kernel is invisible to them).
    """

    fused_attn: bool = True

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_params(self, width: int, heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """QKV weight and bias sliced to input ``width`` and the first ``heads`` heads."""
        h, hd = self.num_heads, self.head_dim
        weight = self.qkv.weight.view(3, h, hd, -1)[:, :heads, :, :width].reshape(3 * heads * hd, width)
        bias = None if self.qkv.bias is None else self.qkv.bias.view(3, h, hd)[:, :heads].reshape(-1)
        return weight, bias

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None, need_attn: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
        if self.fused_attn and not need_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            logits = logits + mask
        attn = logits.softmax(dim=-1)
        return attn @ v, attn

    def forward(
        self, x: torch.Tensor, heads: int, key_bias: torch.Tensor | None = None, need_attn: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Physical path. Returns (output, attention probs if ``need_attn``, queries, keys)."""
        b, n, w = x.shape
        weight, bias = self.qkv_params(w, heads)
        q, k, v = F.linear(x, weight, bias).view(b, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, attn = self._attend(q, k, v, key_bias, need_attn)
        out = out.transpose(1, 2).reshape(b, n, heads * self.head_dim)
        out = F.linear(out, self.proj.weight[:w, : heads * self.head_dim], self.proj.bias[:w])
        return out, attn, q, k

    def forward_masked(
        self,
        x: torch.Tensor,
        channel_mask: torch.Tensor,
        head_mask: torch.Tensor,
        key_bias: torch.Tensor | None,
        need_attn: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Masked path: ``head_mask`` [B, H] zeroes q, k, v of inactive heads (their output is 0).
        Returns (output, attention probs if ``need_attn``, queries, keys)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        hm = head_mask[:, :, None, None].to(x.dtype)
        q, k, v = qkv[0] * hm, qkv[1] * hm, qkv[2] * hm
        out, attn = self._attend(q, k, v, key_bias, need_attn)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(out) * channel_mask, attn, q, k


class Mlp(nn.Module):
    """Two-layer GELU MLP with elastic input width and hidden width."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hidden: int) -> torch.Tensor:
        w = x.shape[-1]
        h = self.act(F.linear(x, self.fc1.weight[:hidden, :w], self.fc1.bias[:hidden]))
        return F.linear(h, self.fc2.weight[:w, :hidden], self.fc2.bias[:w])

    def forward_masked(self, x: torch.Tensor, channel_mask: torch.Tensor, hidden_mask: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)) * hidden_mask) * channel_mask


class Block(nn.Module):
    """Pre-norm transformer block; the orchestration (and token reduction) lives in MetaViT."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = ElasticLayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = ElasticLayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)))


class StageMap(nn.Module):
    """Learned map carrying the residual stream from one stage's width to the next's.

    Identity-initialised, so a meta-network built from a dense ViT starts out equal to it.
    Runs only where the width changes; the full-size network never uses it.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, width_out: int) -> torch.Tensor:
        return F.linear(x, self.weight[:width_out, : x.shape[-1]], self.bias[:width_out])

    def forward_masked(self, x: torch.Tensor, channel_mask_out: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * channel_mask_out
