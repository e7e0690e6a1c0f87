"""Proximal Policy Optimisation over short trajectories (DESIGN.md §3), in CleanRL's shape.

A trajectory is one image's decisions, one per stage after the first (3 for a 12-block ViT);
a rollout is a batch of images, so the buffer is ``[T, B]``: no trajectory crosses another,
GAE runs along each one and stops at its end, and the buffer is rebuilt for every update.
The update reads top to bottom: advantages → epochs of shuffled minibatches → clipped
surrogate + (clipped) value loss − entropy bonus → one global gradient-norm clip per step.

What we deliberately do not copy from the released code: a buffer that keeps every past
transition, GAE running across images, one ratio per action dimension, and the log-prob of
a clamped action (here the action stored is the one whose log-prob was taken).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from prance.errors import PranceError
from prance.selector.agent import ActorCritic


@dataclass
class PPOConfig:
    """PPO hyper-parameters (CleanRL's defaults where they fit; comments say why where they differ)."""

    lr: float = 3e-4  # Adam learning rate of actor and critic
    gamma: float = 1.0  # trajectories are 3 steps long and every step is rewarded at once: no discount needed
    gae_lambda: float = 0.95  # GAE's bias/variance trade-off
    update_epochs: int = 4  # passes over each rollout
    num_minibatches: int = 4  # minibatches per pass
    clip_coef: float = 0.2  # surrogate clipping range
    clip_vloss: bool = False  # value clipping would let V move 0.2 per update while λ moves the returns faster
    ent_coef: float = 0.01  # entropy bonus at the start (exploration) ...
    ent_coef_final: float = 0.0  # ... decayed linearly to this over the run (the exploration schedule)
    vf_coef: float = 0.5  # weight of the value loss
    max_grad_norm: float = 0.5  # global gradient-norm clip
    norm_adv: bool = True  # normalise advantages per minibatch
    target_kl: float | None = None  # stop an update's epochs early once approx-KL exceeds this

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"PPO learning rate must be positive, got {self.lr}"),
            (0 <= self.gamma <= 1, f"gamma must be in [0, 1], got {self.gamma}"),
            (0 <= self.gae_lambda <= 1, f"gae_lambda must be in [0, 1], got {self.gae_lambda}"),
            (self.update_epochs >= 1 and self.num_minibatches >= 1, "update_epochs and num_minibatches must be >= 1"),
            (self.clip_coef > 0, f"clip_coef must be positive, got {self.clip_coef}"),
            (self.ent_coef >= 0 and self.ent_coef_final >= 0, "entropy coefficients must be >= 0"),
            (self.max_grad_norm > 0, f"max_grad_norm must be positive, got {self.max_grad_norm}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PranceError(message + "; fix the PPO settings")

    def entropy_coef(self, progress: float) -> float:
        """The exploration schedule: entropy weight at ``progress`` ∈ [0, 1] of the run."""
        p = min(max(progress, 0.0), 1.0)
        return self.ent_coef + (self.ent_coef_final - self.ent_coef) * p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Rollout:
    """One update's experience, step-major: ``[T, B, ...]`` (T decisions of B images)."""

    features: torch.Tensor  # [T, B, F] state features the policy saw
    actions: torch.Tensor  # [T, B, A] actions taken (indices / values, see ActorCritic)
    log_probs: torch.Tensor  # [T, B] their log-probabilities under the acting policy
    values: torch.Tensor  # [T, B] critic's values of the states
    rewards: torch.Tensor  # [T, B] each step's reward

    def __post_init__(self) -> None:
        t, b = self.rewards.shape
        for name in ("features", "actions", "log_probs", "values"):
            got = tuple(getattr(self, name).shape[:2])
            if got != (t, b):
                raise PranceError(f"rollout {name} has leading shape {got}, expected {(t, b)} like the rewards")


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns ``[T, B]`` of trajectories that end after step ``T - 1`` (value 0 beyond)."""
    t_max = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(t_max)):
        next_value = values[t + 1] if t + 1 < t_max else torch.zeros_like(values[t])
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages, advantages + values


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 − Var(target − pred) / Var(target): 1 is a perfect critic, 0 no better than a constant."""
    var = float(target.var())
    return float("nan") if var == 0 else 1.0 - float((target - pred).var()) / var


def ppo_update(
    agent: ActorCritic,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    cfg: PPOConfig,
    progress: float = 0.0,
    generator: torch.Generator | None = None,
    after_backward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One PPO update on ``rollout``; returns the logged statistics (CleanRL's names).

    ``progress`` ∈ [0, 1] places the update in the run for the entropy schedule;
    ``generator`` seeds the minibatch shuffling; ``after_backward`` runs after every
    backward pass, before clipping (e.g. averaging gradients across processes).
    """
    with torch.no_grad():
        advantages, returns = gae(rollout.rewards, rollout.values, cfg.gamma, cfg.gae_lambda)
    feats = rollout.features.flatten(0, 1)
    acts = rollout.actions.flatten(0, 1)
    old_logp, old_v = rollout.log_probs.flatten(), rollout.values.flatten()
    adv_all, ret_all = advantages.flatten(), returns.flatten()
    n = len(adv_all)
    ent_coef = cfg.entropy_coef(progress)
    clipfracs, approx_kl = [], torch.zeros(())
    pg_loss = v_loss = entropy_loss = torch.zeros(())
    epochs_run = 0
    for _ in range(cfg.update_epochs):
        epochs_run += 1
        order = torch.randperm(n, generator=generator, device=torch.device("cpu")).to(feats.device)
        # num_minibatches near-equal parts: no tiny leftover minibatch when n is not a multiple of it
        for idx in torch.tensor_split(order, min(cfg.num_minibatches, n)):
            _, logp, entropy, value = agent.get_action_and_value(feats[idx], acts[idx])
            log_ratio = logp - old_logp[idx]
            ratio = log_ratio.exp()
            with torch.no_grad():
                approx_kl = ((ratio - 1) - log_ratio).mean()
                clipfracs.append(float(((ratio - 1.0).abs() > cfg.clip_coef).float().mean()))
            adv = adv_all[idx]
            if cfg.norm_adv and len(idx) > 1:
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
            if cfg.clip_vloss:
                v_clipped = old_v[idx] + (value - old_v[idx]).clamp(-cfg.clip_coef, cfg.clip_coef)
                v_loss = 0.5 * torch.max((value - ret_all[idx]) ** 2, (v_clipped - ret_all[idx]) ** 2).mean()
            else:
                v_loss = 0.5 * ((value - ret_all[idx]) ** 2).mean()
            entropy_loss = entropy.mean()
            loss = pg_loss - ent_coef * entropy_loss + cfg.vf_coef * v_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()
        if cfg.target_kl is not None:
            kl = approx_kl.detach().reshape(1).clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(kl)  # every process stops after the same epoch
                kl /= torch.distributed.get_world_size()
            if float(kl) > cfg.target_kl:
                break
    return {
        "losses/policy_loss": float(pg_loss.detach()),
        "losses/value_loss": float(v_loss.detach()),
        "losses/entropy": float(entropy_loss.detach()),
        "losses/approx_kl": float(approx_kl),
        "losses/clipfrac": sum(clipfracs) / max(1, len(clipfracs)),
        "losses/explained_variance": explained_variance(old_v, ret_all),
        "charts/entropy_coef": ent_coef,
        "charts/update_epochs": float(epochs_run),
    }


__all__ = ["PPOConfig", "Rollout", "explained_variance", "gae", "ppo_update"]
