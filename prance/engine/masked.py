"""The masked path, stage by stage: full-size tensors and masks, autograd kept (joint fine-tuning).

Same API as the physical engine (:class:`~prance.engine.stepwise.StepwiseExecutor`), so a
selector, a Result-to-Go rollout or a fine-tuning loop can run either; for every image the
two agree (up to float rounding). Nothing here runs under ``inference_mode``: gradients
flow from the logits into the meta-network's weights through any continued state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prance.engine.stepwise import StepwiseExecutor, budget_slot
from prance.errors import PranceError
from prance.model.metavit import MaskedState, MetaViT
from prance.plan import Plan
from prance.policy import StageState
from prance.tokens import ops as token_ops
from prance.tokens.state import TokenState


@dataclass(frozen=True)
class MaskedExecutionState:
    """A :class:`~prance.model.metavit.MaskedState` and each image's budget slot (``[B]``, NaN: none)."""

    inner: MaskedState
    budget: torch.Tensor

    @property
    def stage(self) -> int:
        return self.inner.stage

    @property
    def plan(self) -> Plan:
        return self.inner.plan

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size


class MaskedExecutor(StepwiseExecutor):
    """Runs :meth:`MetaViT.run_stage_masked` behind the stepwise API (see the module doc)."""

    def __init__(self, model: MetaViT) -> None:
        self.model = model

    def start(self, x: torch.Tensor, plan: Plan | None = None, budget: torch.Tensor | float | None = None,
              observed: bool = True) -> MaskedExecutionState:
        return MaskedExecutionState(self.model.start_masked(x, plan), budget_slot(budget, x.shape[0]))

    def advance(self, state: MaskedExecutionState, plan: Plan) -> MaskedExecutionState:
        return MaskedExecutionState(self.model.run_stage_masked(state.inner, plan), state.budget)

    def logits(self, state: MaskedExecutionState) -> torch.Tensor:
        return self.model.logits_masked(state.inner)

    def observe(self, state: MaskedExecutionState) -> StageState:
        """The policy's view; key means of the surviving tokens moved to the front, in token order."""
        inner = state.inner
        if inner.key_means is None:
            raise PranceError(f"no decision is taken before stage {inner.stage}; observe states before stages 1.."
                              f"{self.model.config.num_stages - 1}")
        alive = inner.tokens.alive
        tokens = alive.sum(1)
        means = token_ops.compact(inner.key_means.detach(), alive)
        widths = inner.plan.widths[:, inner.stage - 1].to(alive.device)
        return StageState(inner.stage, inner.tokens.x[:, 0].detach().clone(), means, tokens, widths,
                          state.budget.clone())

    def cat(self, states: Sequence[MaskedExecutionState]) -> MaskedExecutionState:
        inners = [st.inner for st in states]
        if len({s.stage for s in inners}) != 1:
            raise PranceError("only states at the same stage can be joined")
        t = [s.tokens for s in inners]
        source = None if t[0].source is None else torch.cat([s.source for s in t])
        tokens = TokenState(torch.cat([s.x for s in t]), torch.cat([s.size for s in t]), source,
                            torch.cat([s.alive for s in t]))
        key_means = None if inners[0].key_means is None else torch.cat([s.key_means for s in inners])
        inner = MaskedState(inners[0].stage, tokens, Plan.cat([s.plan for s in inners]), key_means)
        return MaskedExecutionState(inner, torch.cat([st.budget for st in states]))

    def select(self, state: MaskedExecutionState, images: torch.Tensor) -> MaskedExecutionState:
        inner, t = state.inner, state.inner.tokens
        images = torch.as_tensor(images, dtype=torch.int64)
        i = images.to(t.x.device)
        tokens = TokenState(t.x[i], t.size[i], None if t.source is None else t.source[i], t.alive[i])
        key_means = None if inner.key_means is None else inner.key_means[i]
        return MaskedExecutionState(MaskedState(inner.stage, tokens, inner.plan.select(images), key_means),
                                    state.budget[images])


__all__ = ["MaskedExecutionState", "MaskedExecutor"]
