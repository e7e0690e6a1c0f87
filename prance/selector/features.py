"""What the selector's networks read: a :class:`~prance.policy.StageState` as one feature vector.

Two encoders (DESIGN.md §3), each followed by the same scalars:

* ``"keys"`` — the paper's state: the previous block's keys averaged over their channels, one
  number per token, zero-padded to the initial token count;
* ``"cls"`` — the cls token's features entering the stage (zero beyond its width).

Scalars: which stage is being decided (one-hot), the surviving tokens and the residual width
as fractions of their maxima, and the image's budget (its slot in the state, or the
selector's default budget where the slot is empty).

Features are standardised with a mean and deviation fitted once, on the first training
rollout's states, then frozen and saved with the selector — so the policy's input never
drifts under it during PPO, and a loaded selector sees exactly what it was trained on.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from prance.config import ViTConfig
from prance.errors import PranceError
from prance.policy import StageState

ENCODERS = ("keys", "cls")


def num_features(encoder: str, config: ViTConfig) -> int:
    """Length of the feature vector of ``encoder`` for a network of shape ``config``."""
    check_encoder(encoder)
    signal = config.num_patches + 1 if encoder == "keys" else config.embed_dim
    return signal + (config.num_stages - 1) + 3


def check_encoder(encoder: str) -> str:
    if encoder not in ENCODERS:
        raise PranceError(f"unknown state encoder {encoder!r}; use one of {', '.join(ENCODERS)}")
    return encoder


def raw_features(state: StageState, encoder: str, config: ViTConfig, default_budget: float) -> torch.Tensor:
    """``[B, F]`` float32 features of every image of ``state`` (before standardisation)."""
    signal = state.key_means if check_encoder(encoder) == "keys" else state.cls
    signal = signal.detach().float()
    b, dev = signal.shape[0], signal.device
    stage = signal.new_zeros(b, config.num_stages - 1)
    stage[:, state.stage - 1] = 1.0  # one-hot
    tokens = state.tokens.to(dev, torch.float32)[:, None] / (config.num_patches + 1)
    widths = state.widths.to(dev, torch.float32)[:, None] / config.embed_dim
    budget = state.budget.to(dev, torch.float32)
    budget = torch.where(budget.isnan(), default_budget, budget)[:, None]
    return torch.cat([signal, stage, tokens, widths, budget], 1)


class FeatureNorm(nn.Module):
    """Per-feature standardisation, fitted once and frozen (see the module docstring)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        """Fit to ``[N, F]`` sample features; constant features keep unit scale."""
        self.mean.copy_(features.mean(0))
        std = features.std(0)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        self.fitted.fill_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


__all__ = ["ENCODERS", "FeatureNorm", "check_encoder", "num_features", "raw_features"]
