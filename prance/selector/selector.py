"""The selector: state features → actor–critic → raw action → plan entry (DESIGN.md §3).

A :class:`Selector` is a :class:`~prance.policy.StagePolicy`: the execution engine calls it
once per stage with every image's :class:`~prance.policy.StageState` and gets a plan whose
stage entries are each image's own decisions. At inference it acts deterministically (each
part's mode); during training :meth:`Selector.sample` draws actions and returns what PPO
needs to remember.

``knob`` is the deployed selector's one calibration setting, and a larger knob never means
less compute. It shifts each keep ratio's raw action (in ``[0, 1]``) by its value, and tilts
each discrete choice towards the large end before taking its mode: ``KNOB_TILT · knob`` times
the choice's bin centre is added to its log-probability. An image whose choice is close moves
first, one that is sure moves last, so the mean MACs grow smoothly with the knob. Selectors
written before ``knob_mode`` existed shift the discrete choices' raw actions too (``"shift"``):
every image then steps to the next choice at the same knob value, and the mean MACs jump there
(by 0.03–0.04 × dense on Fashion-MNIST, more than the ±2 % a calibration must hit). When
sampling (training), the tilt does not move a drawn choice; keep ratios shift as at inference.
Budget calibration on the holdout sets the knob (:func:`prance.selector.budget.calibrate`).
A selector trained for a budget range instead reads each image's knob off a
:class:`~prance.selector.budget.KnobCurve` at that image's budget (:attr:`Selector.knob_curve`),
so the shift, like every other decision, depends only on the image and its own budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from prance.actions import ActionSpace
from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.plan import Plan
from prance.policy import StageState
from prance.selector.agent import ActorCritic
from prance.selector.budget import KnobCurve, check_budget, check_budget_range
from prance.selector.features import FeatureNorm, check_encoder, num_features, raw_features

KNOB_TILT = 10.0  # log-probability the largest choice gains over the smallest per unit of knob ("tilt")
KNOB_MODES = ("tilt", "shift")


@dataclass
class SelectorConfig:
    """Shape of a selector (plain values, stored with it)."""

    encoder: str = "keys"  # "keys" (the paper's per-token key means) or "cls" (cls features)
    hidden: int = 128  # width of the actor and critic MLPs
    layers: int = 2  # hidden layers of each
    mlp_per_stage: bool = False  # one MLP ratio per stage instead of one per block
    keep_grid: float = 0.0  # keep ratios raised to multiples of this (0: the search space's grid)
    budget: float = 0.5  # budget shown to the policy where an image's budget slot is empty
    budget_range: tuple[float, float] | None = None  # budgets it was trained for (None: `budget` only)
    knob_mode: str = "tilt"  # how the knob moves discrete choices (module doc); "shift" in older files

    def __post_init__(self) -> None:
        check_encoder(self.encoder)
        if self.knob_mode not in KNOB_MODES:
            raise PranceError(f"selector knob_mode {self.knob_mode!r} is not one of {', '.join(KNOB_MODES)}")
        if self.hidden < 1 or self.layers < 1:
            raise PranceError(f"selector hidden={self.hidden} and layers={self.layers} must be at least 1")
        self.budget = check_budget(self.budget)
        if self.budget_range is not None:
            self.budget_range = check_budget_range(self.budget_range)
            if not self.budget_range[0] <= self.budget <= self.budget_range[1]:
                raise PranceError(f"selector budget {self.budget} lies outside its budget range "
                                  f"{self.budget_range[0]},{self.budget_range[1]}; give one inside it")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Sampled:
    """One stage's sampled decisions and what PPO keeps of them (all ``[B, ...]``, detached)."""

    plan: Plan
    features: torch.Tensor
    action: torch.Tensor
    log_prob: torch.Tensor
    value: torch.Tensor


class Selector(nn.Module):
    """Per-image decisions for a meta-network of shape ``config`` and search space ``space``."""

    def __init__(self, config: ViTConfig, space: SearchSpace, cfg: SelectorConfig | None = None) -> None:
        super().__init__()
        self.config, self.space = config, space
        self.cfg = cfg or SelectorConfig()
        self.actions = ActionSpace(config, space, self.cfg.mlp_per_stage, self.cfg.keep_grid)
        size = num_features(self.cfg.encoder, config)
        self.norm = FeatureNorm(size)
        choices = [len(d.choices) if d.categorical else 0 for d in self.actions.dims]
        self.agent = ActorCritic(size, choices, self.cfg.hidden, self.cfg.layers)
        self.register_buffer("knob", torch.zeros((), dtype=torch.float64))
        # [A] 1 for the parts the knob shifts (every part with "shift", the keep ratios with "tilt")
        self._shifted = torch.tensor([1.0 if self.cfg.knob_mode == "shift" or not n else 0.0 for n in choices],
                                     dtype=torch.float64)
        self.knob_curve: KnobCurve | None = None  # set by range calibration; stored in the calibration record

    # ------------------------------------------------------------------ features
    def features(self, state: StageState) -> torch.Tensor:
        """``[B, F]`` standardised features on the selector's device."""
        dev = self.knob.device
        raw = raw_features(state, self.cfg.encoder, self.config, self.cfg.budget).to(dev)
        return self.norm(raw)

    def fit_features(self, states: list[StageState]) -> None:
        """Fit the feature standardisation to some training states (once, before training).

        The budget (the last feature) is standardised by the budget distribution itself, not
        by one batch's sample of it: a fixed budget maps to 0, a range drawn uniformly to zero
        mean and unit variance (its centre and ``(high − low) / √12``).
        """
        dev = self.knob.device
        self.norm.fit(torch.cat([raw_features(s, self.cfg.encoder, self.config, self.cfg.budget).to(dev)
                                 for s in states]))
        low, high = self.cfg.budget_range or (self.cfg.budget, self.cfg.budget)
        self.norm.mean[-1] = 0.5 * (low + high)
        self.norm.std[-1] = (high - low) / 12**0.5 if high > low else 1.0

    # ------------------------------------------------------------------ deciding
    def knob_for(self, budget: torch.Tensor) -> torch.Tensor:
        """``[B, 1]`` float64 knob of each image: the knob curve at its budget if calibrated so, else the knob."""
        if self.knob_curve is None:
            return self.knob.detach().cpu().expand(len(budget), 1)
        budget = torch.where(torch.isnan(budget), torch.full_like(budget, self.cfg.budget), budget)
        return self.knob_curve(budget)[:, None]

    def decode(self, action: torch.Tensor, state: StageState) -> Plan:
        """The plan whose stage entries are the agent's ``action`` ``[B, A]``, shifted by each image's
        knob: the keep ratios, and with ``knob_mode="shift"`` the discrete choices too."""
        shift = self.knob_for(state.budget) * self._shifted
        unit = (self.agent.to_unit(action).double().cpu() + shift).clamp(0.0, 1.0)
        return self.actions.decode(unit, state.stage)

    def forward(self, state: StageState) -> Plan:
        """Deterministic decisions (each action part's mode, discrete ones tilted by the knob): the
        selector at inference."""
        with torch.inference_mode(False), torch.no_grad():
            features = self.features(state)
            tilt = None
            if self.cfg.knob_mode == "tilt":
                tilt = (KNOB_TILT * self.knob_for(state.budget)).to(features.device, features.dtype)
            return self.decode(self.agent.act_deterministic(features, tilt), state)

    def sample(self, state: StageState, generator: torch.Generator | None = None) -> Sampled:
        """Stochastic decisions for training, with their features, log-probabilities and values."""
        with torch.inference_mode(False), torch.no_grad():
            feats = self.features(state)
            action, log_prob, _, value = self.agent.get_action_and_value(feats, generator=generator)
            return Sampled(self.decode(action, state), feats, action, log_prob, value)

    # ------------------------------------------------------------------ cost
    def macs_per_decision(self) -> int:
        """MACs of one image's decision: the actor's matrix products (the critic only trains)."""
        return sum(m.in_features * m.out_features for m in self.agent.actor if isinstance(m, nn.Linear))

    def macs_per_image(self) -> int:
        """MACs the selector adds to one image: one decision per stage after the first."""
        return self.macs_per_decision() * (self.config.num_stages - 1)


__all__ = ["KNOB_MODES", "KNOB_TILT", "Sampled", "Selector", "SelectorConfig"]
