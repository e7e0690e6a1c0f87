"""Representative decisions: every decision rounds *up* to one of at most K per stage, learned on a holdout."""

from __future__ import annotations

import itertools

import pytest
import torch

from prance.accounting import macs_per_sample
from prance.config import SearchSpace
from prance.engine import DynamicExecutor
from prance.errors import PranceError
from prance.model.presets import preset_config
from prance.plan import Plan
from prance.selector.representatives import (
    Representatives,
    RoundUp,
    first_cover,
    fit_representatives,
    fit_stage,
    full_decision,
    stage_decisions,
    with_stage_decisions,
)
from tests.conftest import tiny_config, tiny_space
from tests.selector.test_adaptive import _adaptive

CFG = tiny_config()
SPACE = tiny_space(CFG)


def _random_plans(cfg, space, n: int, seed: int) -> Plan:
    return Plan.random(cfg, space, n, generator=torch.Generator().manual_seed(seed), keep_range=(space.min_keep, 1.0))


def _stagewise_fit(cfg, plan: Plan, k: int) -> Representatives:
    """Each stage fit on ``plan``'s decisions, priced by the exact MACs of the plan with that stage replaced."""
    stages = {}
    for s in range(1, cfg.num_stages):
        def price(rows, decisions, s=s):
            return macs_per_sample(cfg, with_stage_decisions(cfg, plan.select(rows), s, decisions))

        stages[s] = fit_stage(stage_decisions(cfg, plan, s), k, price, full_decision(cfg))
    return Representatives(k, stages)


def _round_all(cfg, reps: Representatives, plan: Plan) -> Plan:
    for s in range(1, cfg.num_stages):
        plan = reps.round_up(cfg, plan, s)
    return plan


# ----------------------------------------------------------------------------- pure
@pytest.mark.parametrize("k", [2, 3, 5])
def test_rounded_decisions_cover_the_asked_ones_come_from_the_table_and_never_cost_less(k):
    plan = _random_plans(CFG, SPACE, 300, seed=k)
    reps = _stagewise_fit(CFG, plan, k)
    rounded = _round_all(CFG, reps, plan).validate(CFG, SPACE)
    for s in range(1, CFG.num_stages):
        table, asked, got = reps.stages[s], stage_decisions(CFG, plan, s), stage_decisions(CFG, rounded, s)
        assert len(table) <= k and torch.equal(table[-1], full_decision(CFG))
        assert bool((got >= asked).all())
        assert all(any(torch.equal(row, t) for t in table) for row in got)
        assert len(got.unique(dim=0)) <= k
    assert bool((macs_per_sample(CFG, rounded) >= macs_per_sample(CFG, plan)).all())
    # More representatives buy back compute: K = 5 costs no more than full size everywhere (K = 1).
    assert float(macs_per_sample(CFG, rounded).double().mean()) < float(macs_per_sample(CFG, Plan.full(CFG))[0])


def test_one_representative_runs_every_decided_stage_at_full_size():
    plan = _random_plans(CFG, SPACE, 50, seed=0)
    rounded = _round_all(CFG, _stagewise_fit(CFG, plan, 1), plan)
    assert bool((macs_per_sample(CFG, rounded) == macs_per_sample(CFG, Plan.full(CFG))[0]).all())


def test_enough_representatives_keep_a_few_distinct_decisions_as_they_are():
    distinct = _random_plans(CFG, SPACE, 4, seed=3)
    plan = distinct.select(torch.randint(4, (60,), generator=torch.Generator().manual_seed(0)))
    for k in (5, 9):
        rounded = _round_all(CFG, _stagewise_fit(CFG, plan, k), plan)
        assert all(rounded.key(i) == plan.key(i) for i in range(60))


def test_more_of_every_component_never_costs_fewer_macs():
    """Element-wise larger stage decisions on random plans, on shapes where a vanishing stage map could win."""
    narrow = tiny_config(depth=6, stage_depth=2)
    for cfg, space in [(CFG, SPACE), (narrow, tiny_space(narrow, widths=(4, 8, 16, 32), heads=(1, 4), mlp_ratios=(0.5, 4.0))),
                       (preset_config("fmnist-tiny"), SearchSpace.default_for(preset_config("fmnist-tiny"),
                                                                               token_mode="prune_merge"))]:
        small, other = _random_plans(cfg, space, 3000, 1), _random_plans(cfg, space, 3000, 2)
        large = small
        for s in range(1, cfg.num_stages):
            both = torch.maximum(stage_decisions(cfg, small, s), stage_decisions(cfg, other, s))
            large = with_stage_decisions(cfg, large, s, both)
        assert bool((macs_per_sample(cfg, large) >= macs_per_sample(cfg, small)).all())


def _optimum(decisions: torch.Tensor, k: int, weights: torch.Tensor, full: torch.Tensor) -> float:
    """Exhaustive search: the best k - 1 element-wise maxima of subsets (plus full size), cheapest cover each."""
    distinct = decisions.unique(dim=0)
    maxima = {tuple(distinct[list(sub)].amax(0).tolist()) for r in range(1, len(distinct) + 1)
              for sub in itertools.combinations(range(len(distinct)), r)}
    asked = decisions @ weights
    best = float("inf")
    for pick in itertools.combinations([torch.tensor(m) for m in maxima], k - 1):
        table = torch.stack([*pick, full])
        covers = (table[None] >= decisions[:, None]).all(-1)
        cost = torch.where(covers, (table @ weights)[None], torch.tensor(float("inf"))).amin(1)
        best = min(best, float((cost - asked).mean()))
    return best


def test_learning_lands_near_the_exhaustive_optimum():
    gen = torch.Generator().manual_seed(0)
    weights, full = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64), torch.full((3,), 4.0, dtype=torch.float64)
    ratios = []
    for _ in range(12):
        distinct = torch.randint(0, 5, (6, 3), generator=gen).double()
        decisions = distinct.repeat_interleave(torch.randint(1, 20, (6,), generator=gen), 0)
        table = fit_stage(decisions, 3, lambda rows, d: d @ weights, full)
        got = float((table[first_cover(table, decisions)] @ weights - decisions @ weights).mean())
        best = _optimum(decisions, 3, weights, full)
        ratios.append(got / best if best > 0 else 1.0 + got)
    assert max(ratios) <= 1.4 and sum(ratios) / len(ratios) <= 1.1, ratios


def test_a_record_round_trips_and_a_bad_one_is_refused():
    reps = _stagewise_fit(CFG, _random_plans(CFG, SPACE, 40, 0), 3)
    back = Representatives.from_record(reps.record(), CFG, SPACE)
    assert back.k == 3 and all(torch.equal(back.stages[s], reps.stages[s]) for s in reps.stages)
    bad = reps.record()
    bad["stages"]["1"] = bad["stages"]["1"][:-1]  # the full-size cover missing
    with pytest.raises(PranceError, match="do not fit"):
        Representatives.from_record(bad, CFG, SPACE)
    with pytest.raises(PranceError, match="at least 1"):
        fit_stage(torch.zeros(3, 4, dtype=torch.float64), 0, lambda r, d: d.sum(1), torch.ones(4))


# ----------------------------------------------------------------------------- with the engine and a selector
def _model_and_selector():
    """A tiny meta-network, a selector whose decisions depend on the image, and 64 holdout images."""
    net, holdout = _adaptive()
    return net.model, net.selector, holdout


def test_learned_on_a_holdout_every_stage_rounds_up_what_the_selector_asks():
    model, selector, holdout = _model_and_selector()
    engine = DynamicExecutor(model)
    reps = fit_representatives(engine, selector, list(holdout.split(32)), k=3)
    asked = []

    def spy(state):
        asked.append((state.stage, selector(state)))
        return asked[-1][1]

    x = torch.randn(40, CFG.in_chans, CFG.img_size, CFG.img_size)
    logits, plan = engine.run(x, policy=RoundUp(spy, reps, CFG))
    assert sorted(reps.stages) == list(range(1, CFG.num_stages))
    for stage, decision in asked:
        got, want = stage_decisions(CFG, plan, stage), stage_decisions(CFG, decision, stage)
        assert bool((got >= want).all())
        assert len(got.unique(dim=0)) <= 3
        assert all(any(torch.equal(row, t) for t in reps.stages[stage]) for row in got)
    assert any(len(reps.stages[s]) > 1 for s in reps.stages)  # something learned besides the full size
    # The engine runs the rounded plans as the masked path does.
    assert (logits - model(x, plan, mode="masked")).abs().max() <= 1e-4


def test_a_policy_with_few_decisions_is_reproduced_when_k_is_large():
    model, selector, holdout = _model_and_selector()
    engine = DynamicExecutor(model)
    menu = _random_plans(CFG, SPACE, 3, seed=5)

    def coarse(state):  # three decisions, chosen by the image
        return menu.select((state.cls[:, 0] > 0).long() + (state.cls[:, 1] > 0).long())

    reps = fit_representatives(engine, coarse, list(holdout.split(32)), k=8)
    x = torch.randn(30, CFG.in_chans, CFG.img_size, CFG.img_size)
    want = engine.run(x, policy=coarse)[1]
    got = engine.run(x, policy=RoundUp(coarse, reps, CFG))[1]
    assert all(got.key(i) == want.key(i) for i in range(len(x)))
