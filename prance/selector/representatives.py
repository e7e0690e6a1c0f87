"""Round each image's stage decisions *up* to one of K representatives (DESIGN.md §5, speed levers).

Why: the engine runs images with equal decisions as one group, and many small groups run
slowly on small models. Replacing every stage decision by one of K representative decisions
bounds the distinct decisions of a stage at K, while no image gets less compute than the
selector asked for.

A *stage decision* is a vector of components: the stage's width, the MLP ratio and the heads
of each of its blocks, its prune keep and its merge keep ratio. A representative ``r``
*covers* a decision ``d`` when ``r >= d`` in every component. More of any component never
means fewer MACs — widths, MLP widths, heads and kept tokens only add work; the one term that
can vanish, a stage map when a stage grows to its successor's width, is outweighed by the
wider blocks (tests check it on random plans) — so a covered decision costs at least as much
after rounding. Each stage holds at most K representatives,
tried in a fixed order (the cheapest on the holdout first); a decision becomes the first one
that covers it. The last is always the full-size decision, which covers everything, so every
decision has a cover and K = 1 means "run the stage at full size".

Learning (:func:`fit_stage`, :func:`fit_representatives`). Decisions are sequential — stage
``s``'s decision depends on the state the rounded stages before it left — so stages are fit
in order: the holdout runs with stages ``< s`` rounded, and stage ``s``'s decisions are
collected. Each image is priced by the exact MACs of its executed plan with stage ``s``
replaced by a candidate (the later stages as the selector chose them). The objective is the
mean extra MACs of rounding up. It starts from at most ``candidates`` clusters (one per distinct
decision, or k-means on the scaled components when there are more), each represented by the
element-wise maximum of its members — a valid decision again, as each component is some
member's. Clusters then merge two at a time, the merge that adds the fewest MACs first (merging
into the full size included), down to K - 1. A k-means-like refinement follows: assign each
decision to its first cover, shrink each representative to the maximum of its members, repeat,
keeping the best set seen. On small problems this lands within a few per cent of the optimum
(tests/selector/test_representatives.py compares it with exhaustive search).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from prance.accounting import macs_per_sample
from prance.config import SearchSpace, ViTConfig
from prance.errors import PranceError
from prance.plan import Plan
from prance.policy import StagePolicy, StageState

if TYPE_CHECKING:
    from prance.engine.stepwise import StepwiseExecutor

#: ``price(images, decisions)``: ``[M]`` MACs of holdout images ``images`` ``[M]`` with their
#: stage decision replaced by ``decisions`` ``[M, C]``.
Price = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Holdout decisions tried as seeds per stage (spread over the asked MACs).
DEFAULT_CANDIDATES = 32
#: Rows priced per call of the MACs formula (bounds memory on large holdouts).
PRICE_CHUNK = 65536


# ----------------------------------------------------------------------------- decisions <-> plans
def component_names(config: ViTConfig) -> list[str]:
    """Names of a stage decision's components, in vector order."""
    k = config.stage_depth
    return (["width"] + [f"mlp_ratio[{j}]" for j in range(k)] + [f"heads[{j}]" for j in range(k)]
            + ["prune_keep", "merge_keep"])


def stage_decisions(config: ViTConfig, plan: Plan, stage: int) -> torch.Tensor:
    """``[B, C]`` float64: each plan row's stage-``stage`` decision as a component vector."""
    blocks = slice(stage * config.stage_depth, (stage + 1) * config.stage_depth)
    return torch.cat([plan.widths[:, stage : stage + 1].double(), plan.mlp_ratios[:, blocks],
                      plan.heads[:, blocks].double(), plan.keep[:, stage : stage + 1],
                      plan.merge_keep[:, stage : stage + 1]], 1)


def with_stage_decisions(config: ViTConfig, plan: Plan, stage: int, decisions: torch.Tensor) -> Plan:
    """``plan`` (``[B]`` rows, or one that broadcasts) with stage ``stage`` set to ``decisions`` ``[B, C]``."""
    k = config.stage_depth
    plan = plan.expand(decisions.shape[0])
    blocks = slice(stage * k, (stage + 1) * k)
    widths, ratios, heads = plan.widths.clone(), plan.mlp_ratios.clone(), plan.heads.clone()
    keep, merge_keep = plan.keep.clone(), plan.merge_keep.clone()
    widths[:, stage] = decisions[:, 0].round().to(torch.int64)
    ratios[:, blocks] = decisions[:, 1 : 1 + k]
    heads[:, blocks] = decisions[:, 1 + k : 1 + 2 * k].round().to(torch.int64)
    keep[:, stage], merge_keep[:, stage] = decisions[:, 1 + 2 * k], decisions[:, 2 + 2 * k]
    return Plan(widths, ratios, heads, keep, merge_keep)


def full_decision(config: ViTConfig) -> torch.Tensor:
    """``[C]`` the full-size stage decision (covers every decision)."""
    return stage_decisions(config, Plan.full(config), 1)[0]


def first_cover(table: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the first row of ``table`` ``[K, C]`` that is ``>=`` each decision ``[B, C]``
    in every component (``-1`` where none is)."""
    covers = (table[None] >= decisions[:, None]).all(-1)
    first = covers.to(torch.int8).argmax(1)
    return torch.where(covers.any(1), first, -1)


# ----------------------------------------------------------------------------- the representatives
@dataclass(frozen=True)
class Representatives:
    """At most ``k`` representative decisions per decided stage, in the order they are tried.

    ``stages[s]`` is ``[K_s, C]`` float64, its last row the full-size decision. Stages absent
    from ``stages`` are not rounded (while fitting, the later stages).
    """

    k: int
    stages: Mapping[int, torch.Tensor]

    def round_up(self, config: ViTConfig, plan: Plan, stage: int) -> Plan:
        """``plan`` with its stage-``stage`` decisions replaced by their first covers."""
        table = self.stages.get(stage)
        if table is None:
            return plan
        decisions = stage_decisions(config, plan, stage)
        index = first_cover(table, decisions)
        if bool((index < 0).any()):  # cannot happen with the full-size row last; a corrupt table would do it
            raise PranceError(f"stage {stage}'s representatives cover not every decision; refit them")
        return with_stage_decisions(config, plan, stage, table[index])

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores (plain values and tensors)."""
        return {"k": self.k, "stages": {str(s): t.clone() for s, t in self.stages.items()}}

    @classmethod
    def from_record(cls, record: Any, config: ViTConfig, space: SearchSpace, where: str = "checkpoint"
                    ) -> "Representatives":
        """The representatives a checkpoint's record describes; checked against the model."""
        try:
            k, stages = int(record["k"]), {int(s): torch.as_tensor(t, dtype=torch.float64)
                                           for s, t in dict(record["stages"]).items()}
        except (TypeError, KeyError, ValueError):
            raise PranceError(f"{where}: its representative decisions are unreadable; the file is corrupt or from "
                              "another version") from None
        full = full_decision(config)
        for s, table in stages.items():
            if (not 1 <= s < config.num_stages or table.dim() != 2 or table.shape[1] != len(full)
                    or not 1 <= len(table) <= k or not torch.equal(table[-1], full)):
                raise PranceError(f"{where}: its representative decisions do not fit its model (stage {s}); "
                                  "refit them with `prance round-up`")
            with_stage_decisions(config, Plan.full(config), s, table).validate(config, space)
        return cls(k, stages)


class RoundUp:
    """A policy whose every stage decision is ``policy``'s, rounded up to its first representative."""

    def __init__(self, policy: StagePolicy, representatives: Representatives, config: ViTConfig) -> None:
        self.policy, self.representatives, self.config = policy, representatives, config

    def __call__(self, state: StageState) -> Plan:
        return self.representatives.round_up(self.config, self.policy(state), state.stage)


# ----------------------------------------------------------------------------- learning one stage
def fit_stage(decisions: torch.Tensor, k: int, price: Price, full: torch.Tensor,
              candidates: int = DEFAULT_CANDIDATES, iterations: int = 20) -> torch.Tensor:
    """At most ``k`` representatives ``[K', C]`` for one stage's holdout ``decisions`` ``[N, C]``,
    ordered by mean holdout MACs, the full-size decision ``full`` last (see the module doc)."""
    if k < 1:
        raise PranceError(f"K = {k} representatives: give at least 1 (1 runs every stage at full size)")
    n = decisions.shape[0]
    if k == 1 or n == 0:
        return full[None].clone()
    asked = price(torch.arange(n), decisions).double()
    learned = _agglomerate(decisions, _partition(decisions, asked, candidates), k - 1, price, full)
    table = _ordered(learned, full, decisions, price)
    best_table, best_extra = table, _extra(table, decisions, asked, price)
    for _ in range(iterations):  # refinement: shrink each representative to its members' element-wise maximum
        owner = first_cover(table, decisions)
        learned = torch.stack([decisions[owner == j].amax(0) for j in range(len(table) - 1)
                               if bool((owner == j).any())] + [full])[:-1]
        new = _ordered(learned, full, decisions, price)
        if new.shape == table.shape and torch.equal(new, table):
            break
        table = new
        extra = _extra(table, decisions, asked, price)
        if extra < best_extra:
            best_table, best_extra = table, extra
    return best_table


def _partition(decisions: torch.Tensor, asked: torch.Tensor, clusters: int, steps: int = 10) -> torch.Tensor:
    """``[N]`` cluster index of each decision, at most ``clusters`` clusters: one per distinct
    decision if there are few, else k-means on the components scaled to [0, 1], started from
    decisions spread evenly over the asked MACs."""
    distinct, inverse = decisions.unique(dim=0, return_inverse=True)
    if len(distinct) <= clusters:
        return inverse
    low, high = decisions.amin(0), decisions.amax(0)
    x = (decisions - low) / (high - low).clamp_min(1e-12)
    spread = ((torch.arange(clusters, dtype=torch.float64) + 0.5) * len(x) / clusters).long()
    centres = x[asked.argsort(stable=True)[spread]]
    owner = torch.cdist(x, centres).argmin(1)
    for _ in range(steps):
        centres = torch.stack([x[owner == j].mean(0) if bool((owner == j).any()) else centres[j]
                               for j in range(clusters)])
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, owner):
            break
        owner = new
    return owner.unique(return_inverse=True)[1]


def _agglomerate(decisions: torch.Tensor, owner: torch.Tensor, keep: int, price: Price,
                 full: torch.Tensor) -> torch.Tensor:
    """``[<= keep, C]``: the clusters of ``owner``, each represented by its members' element-wise
    maximum, merged two at a time — the merge that adds the fewest MACs first, merging into the
    full-size decision included — until at most ``keep`` remain besides the full size."""
    members = [torch.nonzero(owner == j).flatten() for j in range(int(owner.max()) + 1)]
    reps = [decisions[m].amax(0) for m in members]
    cost = torch.zeros(len(members), dtype=torch.float64).index_add_(
        0, owner, _chunked(price, torch.arange(len(owner)), torch.stack(reps)[owner])).tolist()
    added: dict[tuple[int, int], float] = {}  # (a, b) -> extra MACs of merging them; b = -1: into the full size

    def price_merges(pairs: list[tuple[int, int]]) -> None:
        """Fill ``added`` for ``pairs`` with one call of ``price`` (the rows of every merge in one batch)."""
        rows, reps_of_rows, segment = [], [], []
        for i, (a, b) in enumerate(pairs):
            m = members[a] if b < 0 else torch.cat([members[a], members[b]])
            rows.append(m)
            reps_of_rows.append((full if b < 0 else torch.maximum(reps[a], reps[b])).expand(len(m), -1))
            segment.append(torch.full((len(m),), i))
        priced = _chunked(price, torch.cat(rows), torch.cat(reps_of_rows))
        sums = torch.zeros(len(pairs), dtype=torch.float64).index_add_(0, torch.cat(segment), priced)
        for (a, b), total in zip(pairs, sums.tolist()):
            added[(a, b)] = total - cost[a] - (cost[b] if b >= 0 else 0.0)

    alive = list(range(len(reps)))
    while len(alive) > keep:
        pairs = [(a, b) for i, a in enumerate(alive) for b in alive[i + 1 :]] + [(a, -1) for a in alive]
        missing = [p for p in pairs if p not in added]
        if missing:
            price_merges(missing)
        a, b = min(pairs, key=added.__getitem__)
        alive.remove(a)
        if b >= 0:
            alive.remove(b)
            members.append(torch.cat([members[a], members[b]]))
            reps.append(torch.maximum(reps[a], reps[b]))
            cost.append(cost[a] + cost[b] + added[(a, b)])
            alive.append(len(reps) - 1)
    return torch.stack([reps[j] for j in alive] + [full])[:-1]


def _chunked(price: Price, images: torch.Tensor, decisions: torch.Tensor) -> torch.Tensor:
    """``price`` of many rows, in chunks of :data:`PRICE_CHUNK` (bounds memory on large holdouts)."""
    return torch.cat([price(images[i : i + PRICE_CHUNK], decisions[i : i + PRICE_CHUNK]).double()
                      for i in range(0, len(images), PRICE_CHUNK)])


def _price_table(table: torch.Tensor, decisions: torch.Tensor, price: Price) -> torch.Tensor:
    """``[K, N]`` MACs of every image under every row of ``table``."""
    n = decisions.shape[0]
    return _chunked(price, torch.arange(n).repeat(len(table)), table.repeat_interleave(n, 0)).view(len(table), n)


def _ordered(learned: torch.Tensor, full: torch.Tensor, decisions: torch.Tensor, price: Price) -> torch.Tensor:
    """The learned representatives (duplicates and copies of the full size dropped) ordered by
    mean holdout MACs, then the full-size decision."""
    learned = learned.unique(dim=0)
    learned = learned[~(learned == full).all(1)]
    if len(learned) > 1:
        learned = learned[_price_table(learned, decisions, price).mean(1).argsort(stable=True)]
    return torch.cat([learned, full[None]])


def _extra(table: torch.Tensor, decisions: torch.Tensor, asked: torch.Tensor, price: Price) -> float:
    """Mean extra MACs of rounding every decision up to its first cover in ``table``."""
    rounded = table[first_cover(table, decisions)]
    return float((price(torch.arange(len(decisions)), rounded).double() - asked).mean())


# ----------------------------------------------------------------------------- learning on the holdout
@torch.no_grad()
def fit_representatives(executor: "StepwiseExecutor", policy: StagePolicy, images: Sequence[torch.Tensor], k: int,
                        budget: torch.Tensor | float | None = None,
                        candidates: int = DEFAULT_CANDIDATES) -> Representatives:
    """Learn ``k`` representatives per stage from ``policy``'s decisions on holdout ``images``
    (batches), stage after stage, each stage's holdout run with the earlier stages rounded."""
    cfg = executor.model.config
    full = full_decision(cfg)
    reps = Representatives(k, {})
    for stage in range(1, cfg.num_stages):
        rounded = RoundUp(policy, reps, cfg)
        plan = Plan.cat([executor.run(x, policy=rounded, budget=budget)[1] for x in images])

        def price(rows: torch.Tensor, decisions: torch.Tensor, plan: Plan = plan, stage: int = stage) -> torch.Tensor:
            return macs_per_sample(cfg, with_stage_decisions(cfg, plan.select(rows), stage, decisions))

        table = fit_stage(stage_decisions(cfg, plan, stage), k, price, full, candidates)
        reps = Representatives(k, {**reps.stages, stage: table})
    return reps


__all__ = ["DEFAULT_CANDIDATES", "Representatives", "RoundUp", "component_names", "first_cover", "fit_representatives",
           "fit_stage", "full_decision", "stage_decisions", "with_stage_decisions"]
