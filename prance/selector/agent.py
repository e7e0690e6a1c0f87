"""The selector's actor–critic: a factored stochastic policy over one stage's decisions (DESIGN.md §3).

A stage's action has several parts: discrete choices (the stage's width, each block's MLP
ratio, heads when elastic), each from a categorical head, and continuous keep ratios, each
from a Beta distribution on (0, 1). The parts are sampled independently given the state, so
an action's log-probability and entropy are the sums over its parts (one PPO ratio per
action, not one per dimension).

An action is one float tensor ``[B, A]``: a discrete part holds the chosen index, a
continuous part its value in (0, 1). :meth:`ActorCritic.to_unit` turns it into the raw
action in ``[0, 1]^A`` that :class:`~prance.selector.actions.ActionSpace`-style decoders map
onto a plan (index ``i`` of ``n`` choices → the centre of bin ``i``).

Actor and critic are separate MLPs with orthogonal initialisation (small gain on the output
layers, so the first policy is close to uniform), as in CleanRL's PPO.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.distributions import Beta, Categorical

from prance.errors import PranceError

#: Beta samples are kept this far from 0 and 1, where their log-density is unbounded.
BETA_EPS = 1e-4


def layer_init(layer: nn.Linear, gain: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    """Orthogonal weights with ``gain``, constant bias (CleanRL's initialisation)."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(sizes: Sequence[int], out_gain: float) -> nn.Sequential:
    """Tanh MLP ``sizes[0] → … → sizes[-1]``, last layer initialised with ``out_gain``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        layers.append(layer_init(nn.Linear(a, b), out_gain if last else math.sqrt(2)))
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """Policy and value function over state features ``[B, F]``.

    ``choices[j]`` is the number of options of action part ``j``; 0 marks a continuous part
    (a keep ratio). Parts with a single option are allowed and always choose it.
    """

    def __init__(self, num_features: int, choices: Sequence[int], hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        if num_features < 1 or not choices:
            raise PranceError("a selector needs at least one state feature and one action part")
        if any(n < 0 for n in choices):
            raise PranceError(f"action parts need a positive number of choices (0 = continuous), got {list(choices)}")
        self.num_features = num_features
        self.choices = tuple(int(n) for n in choices)
        self.discrete = [j for j, n in enumerate(self.choices) if n > 0]
        self.continuous = [j for j, n in enumerate(self.choices) if n == 0]
        outputs = sum(self.choices) + 2 * len(self.continuous)
        trunk = [num_features] + [hidden] * layers
        self.actor = mlp([*trunk, outputs], out_gain=0.01)
        self.critic = mlp([*trunk, 1], out_gain=1.0)

    @property
    def action_dim(self) -> int:
        return len(self.choices)

    def value(self, features: torch.Tensor) -> torch.Tensor:
        """``[B]`` state values."""
        return self.critic(features).squeeze(-1)

    def distributions(self, features: torch.Tensor) -> tuple[list[Categorical], Beta | None]:
        """One categorical per discrete part and one (batched) Beta over the continuous parts."""
        out = self.actor(features)
        cats, at = [], 0
        for j in self.discrete:
            n = self.choices[j]
            cats.append(Categorical(logits=out[:, at : at + n]))
            at += n
        beta = None
        if self.continuous:
            conc = self._concentrations(out)
            beta = Beta(conc[:, 0], conc[:, 1])
        return cats, beta

    def _concentrations(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, 2, K]`` Beta concentrations (α; β) of the continuous parts from the actor output.
        Concentrations > 1 keep the density unimodal (a mode exists) and bounded at 0 and 1."""
        at, k = sum(self.choices), len(self.continuous)
        return 1.0 + nn.functional.softplus(out[:, at : at + 2 * k]).view(-1, 2, k)

    def get_action_and_value(
        self, features: torch.Tensor, action: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(action [B, A], log_prob [B], entropy [B], value [B])``; samples an action if none is given.

        Log-probabilities and entropies are summed over the action's parts.
        """
        cats, beta = self.distributions(features)
        b = features.shape[0]
        if action is None:
            action = features.new_empty(b, self.action_dim)
            for j, cat in zip(self.discrete, cats):
                probs = cat.probs
                action[:, j] = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(features.dtype)
            if beta is not None:
                action[:, self.continuous] = _sample_beta(beta, generator).clamp(BETA_EPS, 1 - BETA_EPS)
        log_prob = features.new_zeros(b)
        entropy = features.new_zeros(b)
        for j, cat in zip(self.discrete, cats):
            log_prob = log_prob + cat.log_prob(action[:, j].long())
            entropy = entropy + cat.entropy()
        if beta is not None:
            log_prob = log_prob + beta.log_prob(action[:, self.continuous]).sum(-1)
            entropy = entropy + beta.entropy().sum(-1)
        return action, log_prob, entropy, self.value(features)

    @torch.no_grad()
    def act_deterministic(self, features: torch.Tensor, tilt: torch.Tensor | None = None) -> torch.Tensor:
        """The most likely action ``[B, A]``: each categorical's mode and each Beta's mode.

        The same arithmetic as :meth:`distributions` (a categorical's probabilities are the
        softmax of its logsumexp-normalised logits), without building distribution objects:
        at inference their construction and argument checks cost more than the actor itself.
        Parts with equally many choices are reduced together. ``tilt`` ``[B, 1]`` adds
        ``tilt · (i + 0.5) / n`` to choice ``i``'s log-probability first: a larger tilt never
        picks a smaller choice.
        """
        out = self.actor(features)
        action = features.new_empty(features.shape[0], self.action_dim)
        for parts, columns, n in self._categorical_layout(out.device):
            logits = out.index_select(1, columns).view(-1, len(parts), n)
            if tilt is None:
                scores = (logits - logits.logsumexp(-1, keepdim=True)).softmax(-1)
            else:
                centres = (torch.arange(n, device=out.device, dtype=out.dtype) + 0.5) / n
                scores = logits.log_softmax(-1) + tilt.view(-1, 1, 1) * centres
            action[:, parts] = scores.argmax(-1).to(features.dtype)
        if self.continuous:
            conc = self._concentrations(out)
            a, b = conc[:, 0], conc[:, 1]
            action[:, self.continuous] = ((a - 1) / (a + b - 2).clamp_min(1e-6)).clamp(BETA_EPS, 1 - BETA_EPS)
        return action

    def _categorical_layout(self, device: torch.device) -> list[tuple[list[int], torch.Tensor, int]]:
        """Per distinct number of choices ``n``: its action parts and their logits' columns in the actor output."""
        layout = self.__dict__.get("_layout")
        if layout is None or layout[0] != device:
            starts = torch.tensor([0, *self.choices]).cumsum(0).tolist()
            by_n: dict[int, list[int]] = {}
            for j in self.discrete:
                by_n.setdefault(self.choices[j], []).append(j)
            groups = [(parts, torch.tensor([starts[j] + c for j in parts for c in range(n)], device=device), n)
                      for n, parts in by_n.items()]
            layout = self.__dict__["_layout"] = (device, groups)
        return layout[1]

    def to_unit(self, action: torch.Tensor) -> torch.Tensor:
        """The raw action in ``[0, 1]^A``: index ``i`` of ``n`` choices → ``(i + 0.5) / n``; values stay."""
        offset, divisor = self._unit_map(action)
        return (action + offset) / divisor  # a value part: + 0 and / 1, exactly itself

    def _unit_map(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[A]`` offsets (0.5 for a choice) and divisors (its number of choices) of :meth:`to_unit`, cached."""
        cached = self.__dict__.get("_unit")
        if cached is None or cached[0].dtype != like.dtype or cached[0].device != like.device:
            offset = like.new_tensor([0.5 if n else 0.0 for n in self.choices])
            cached = self.__dict__["_unit"] = (offset, like.new_tensor([float(n or 1) for n in self.choices]))
        return cached


def _sample_beta(beta: Beta, generator: torch.Generator | None) -> torch.Tensor:
    """Beta samples from two Gamma draws; seeded through ``generator`` when given (torch's Beta.sample takes none)."""
    if generator is None:
        return beta.sample()
    x = _gamma(beta.concentration1.detach(), generator)
    y = _gamma(beta.concentration0.detach(), generator)
    return x / (x + y)


def _gamma(alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gamma(alpha, 1) samples for alpha ≥ 1 by Marsaglia–Tsang, with an explicit generator."""
    d = alpha - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(alpha)
    todo = torch.ones_like(alpha, dtype=torch.bool)
    while bool(todo.any()):
        z = torch.randn(alpha.shape, generator=generator, device=alpha.device, dtype=alpha.dtype)
        u = torch.rand(alpha.shape, generator=generator, device=alpha.device, dtype=alpha.dtype)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = todo & ok
        out = torch.where(take, d * v, out)
        todo = todo & ~ok
    return out


__all__ = ["ActorCritic", "BETA_EPS", "layer_init", "mlp"]
