"""Stage-by-stage execution with forkable states, and the Result-to-Go rollout (DESIGN.md §3).

A selector decides before every stage ``s >= 1``; Result-to-Go rewards step ``t`` with the
outcome of finishing the network from stage ``t`` with the stages not yet decided at full
size. Both need the network run stage by stage, from states that can be continued several
ways. :class:`StepwiseExecutor` is that API, shared by the physical engine
(:class:`~prance.engine.DynamicExecutor`) and the masked path
(:class:`~prance.engine.MaskedExecutor`, which keeps autograd for joint fine-tuning):

* ``start(x, plan, budget)`` embeds the batch and runs stage 0;
* ``step(state, decision)`` decides stage ``state.stage`` (a :class:`~prance.plan.Plan` or a
  policy, called with :meth:`observe`'s :class:`~prance.policy.StageState`) and runs it;
* ``finish(state, plan)`` runs the remaining stages under ``plan`` (default: the state's).

A state is never changed by continuing it. :meth:`rollout` is the Result-to-Go primitive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from prance.accounting import macs_per_sample
from prance.errors import PranceError
from prance.model.metavit import MetaViT
from prance.plan import Plan
from prance.policy import StagePolicy, StageState


@dataclass(frozen=True)
class Outcome:
    """A completed run: logits ``[B, classes]``, the plan that ran and its per-image MACs ``[B]``."""

    logits: torch.Tensor
    plan: Plan
    macs: torch.Tensor


@dataclass(frozen=True)
class RolloutStep:
    """One decision of a rollout and its Result-to-Go outcome.

    state:    what the policy saw before deciding stage ``stage``.
    decision: the plan the policy returned (its stage-``stage`` entries are the decision).
    outcome:  finishing from stage ``stage`` with the later stages at full size; for the last
              stage this is the decided run itself.
    """

    stage: int
    state: StageState
    decision: Plan
    outcome: Outcome


@dataclass(frozen=True)
class Rollout:
    """Every step of a batch's trajectories, and the outcome of the decided run."""

    steps: list[RolloutStep]
    final: Outcome


def budget_slot(budget: torch.Tensor | float | None, b: int) -> torch.Tensor:
    """``[B]`` float64 per-image budgets (NaN where none was given); one number broadcasts."""
    if budget is None:
        return torch.full((b,), float("nan"), dtype=torch.float64)
    budget = torch.as_tensor(budget, dtype=torch.float64).detach().cpu().reshape(-1)
    if budget.numel() == 1:
        return budget.expand(b).clone()
    if budget.numel() != b:
        raise PranceError(f"budget has {budget.numel()} values for {b} images; give one per image or one for all")
    return budget


class StepwiseExecutor(ABC):
    """Stage-by-stage execution of a :class:`MetaViT` under per-image plans (see module doc)."""

    model: MetaViT

    # ------------------------------------------------------------------ what a path implements
    @abstractmethod
    def start(self, x: torch.Tensor, plan: Plan | None = None, budget: torch.Tensor | float | None = None,
              observed: bool = True) -> Any:
        """Embed ``x`` and run stage 0; ``plan`` (default: full size) holds the stages to come.
        ``budget`` — per-image budgets for the policy; ``observed=False`` when no policy will look."""

    @abstractmethod
    def observe(self, state: Any) -> StageState:
        """What a policy sees of ``state`` (ordinary tensors, detached, usable with autograd later)."""

    @abstractmethod
    def advance(self, state: Any, plan: Plan) -> Any:
        """Run stage ``state.stage`` under ``plan`` (``[B]`` rows, validated); a new state."""

    @abstractmethod
    def logits(self, state: Any) -> torch.Tensor:
        """Logits of a state that has run every stage."""

    @abstractmethod
    def cat(self, states: Sequence[Any]) -> Any:
        """One state holding the images of ``states``, in order (states at the same stage)."""

    @abstractmethod
    def select(self, state: Any, images: torch.Tensor) -> Any:
        """The state of batch images ``images`` (in that order)."""

    # ------------------------------------------------------------------ shared
    def step(self, state: Any, decision: Plan | StagePolicy) -> Any:
        """Decide stage ``state.stage`` — a plan, or a policy called with :meth:`observe` — and run it."""
        cfg = self.model.config
        if not 1 <= state.stage < cfg.num_stages:
            raise PranceError(f"stage {state.stage} is not decided: decisions are taken before stages 1.."
                              f"{cfg.num_stages - 1}; use finish() after the last")
        if not isinstance(decision, Plan):
            decision = decision(self.observe(state))
        plan = state.plan.with_stage(cfg, state.stage, decision).validate(cfg, self.model.space)
        return self.advance(state, plan)

    def finish(self, state: Any, plan: Plan | None = None) -> Outcome:
        """Run the stages not run yet under ``plan`` (its entries for those stages; default: the
        state's plan) and return the outcome with its exact per-image MACs."""
        logits, plan = self._finish(state, plan)
        return Outcome(logits, plan, macs_per_sample(self.model.config, plan))

    def _finish(self, state: Any, plan: Plan | None) -> tuple[torch.Tensor, Plan]:
        cfg = self.model.config
        if plan is not None:
            full = state.plan
            for s in range(state.stage, cfg.num_stages):
                full = full.with_stage(cfg, s, plan)
            plan = full.validate(cfg, self.model.space)
        while state.stage < cfg.num_stages:
            state = self.advance(state, state.plan if plan is None else plan)
        return self.logits(state), state.plan

    def run(self, x: torch.Tensor, plan: Plan | None = None, policy: StagePolicy | None = None,
            budget: torch.Tensor | float | None = None) -> tuple[torch.Tensor, Plan]:
        """Logits and the plan that was executed.

        ``plan`` — one row for the batch or one per image (default: full size). ``policy`` —
        a selector called once per stage ``s >= 1`` with the whole batch's
        :class:`~prance.policy.StageState`; its stage-``s`` decisions replace the plan's.
        ``budget`` — per-image budgets shown to the policy.
        """
        state = self.start(x, plan, budget, observed=policy is not None)
        if policy is not None:
            while state.stage < self.model.config.num_stages:
                state = self.step(state, policy)
        return self._finish(state, None)

    def __call__(self, x: torch.Tensor, plan: Plan | None = None, policy: StagePolicy | None = None) -> torch.Tensor:
        """Logits ``[B, num_classes]``; see :meth:`run`."""
        return self.run(x, plan, policy)[0]

    def rollout(self, x: torch.Tensor, policy: StagePolicy, budget: torch.Tensor | float | None = None) -> Rollout:
        """Result-to-Go rollout: the policy decides every stage, and each step's outcome is the
        run finished from its stage with the stages after it at full size.

        Cheapest exact schedule: the prefix (stage 0) runs once; stage ``t`` runs once for the
        decided images, the completion of step ``t - 1`` (the decided images once more, at full
        size) and the completions still in flight — one batched call, as per-image plans are
        what the engine runs anyway. The last step's outcome is the decided run itself.
        """
        cfg, space = self.model.config, self.model.space
        state = self.start(x, None, budget)
        b = state.batch_size
        first = torch.arange(b)
        seen: list[tuple[int, StageState, Plan]] = []
        for t in range(1, cfg.num_stages):
            decided = state if t == 1 else self.select(state, first)
            observed = self.observe(decided)
            decision = policy(observed)
            seen.append((t, observed, decision))
            plan = decided.plan.with_stage(cfg, t, decision).validate(cfg, space)
            if t > 1:  # rows: decided, completions of steps 1..t-2, then step t-1's (full size from here)
                plan = Plan.cat([plan, state.plan.select(torch.arange(b, state.batch_size)), decided.plan])
                state = self.cat([state, decided])
            state = self.advance(state, plan)
        logits, plan = self.logits(state), state.plan
        outcomes = []
        for k in range(len(seen)):
            rows = torch.arange(k * b, (k + 1) * b)
            part = plan.select(rows)
            outcomes.append(Outcome(logits[rows.to(logits.device)], part, macs_per_sample(cfg, part)))
        final = outcomes[0]
        steps = [RolloutStep(t, observed, decision, outcomes[t] if t < len(seen) else final)
                 for t, observed, decision in seen]
        return Rollout(steps, final)


__all__ = ["Outcome", "Rollout", "RolloutStep", "StepwiseExecutor", "budget_slot"]
