"""Stage-by-stage execution: forkable states, the masked twin, Result-to-Go rollouts, policy states."""

from __future__ import annotations

import pytest
import torch

from prance import MetaViT, Plan, PranceError, macs_per_sample
from prance.engine import DynamicExecutor, MaskedExecutor
from tests.conftest import tiny_config, tiny_space
from tests.engine.test_executor import _RecordingPolicy


def _plans(model: MetaViT, batch: int, seed: int) -> Plan:
    g = torch.Generator().manual_seed(seed)
    return Plan.random(model.config, model.space, batch, generator=g, keep_range=(0.2, 1.0))


def _snapshot(state) -> list[torch.Tensor]:
    return [t.clone() for g in state.groups for t in (g.images, g.counts, g.x, g.size)]


@pytest.mark.parametrize("token_mode", ["prune", "merge", "prune_merge"])
def test_one_state_continued_three_ways_equals_three_fresh_runs(token_mode, one_thread):
    """Run stage 1 once, then stage 2 three different ways from that state: each finished run equals a
    fresh full run of the same plan, and the shared state is left exactly as it was."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = MetaViT(cfg, tiny_space(cfg, token_mode=token_mode)).eval()
    engine = DynamicExecutor(model)
    x = torch.randn(9, 3, 16, 16)
    base = _plans(model, 9, seed=1)
    state = engine.step(engine.start(x, base), base)
    assert state.stage == 2
    before = _snapshot(state)
    for seed in (2, 3, 4):
        plan = base.with_stage(cfg, 2, _plans(model, 9, seed))
        branch = engine.step(state, plan)
        got = engine.finish(branch)
        want, _ = DynamicExecutor(model).run(x, got.plan)
        assert got.plan.key(0) == plan.key(0) and (got.logits - want).abs().max() <= 1e-5
        assert torch.equal(got.macs, macs_per_sample(cfg, plan))
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(state))), "continuing changed the state"


def test_masked_stepwise_agrees_with_the_engine_and_keeps_gradients(tiny):
    torch.manual_seed(1)
    x = torch.randn(8, 3, 16, 16)
    plan = _plans(tiny, 8, seed=5)
    engine, masked = DynamicExecutor(tiny), MaskedExecutor(tiny)
    shared = masked.step(masked.start(x, plan), plan)
    for seed in (6, 7):
        other = plan.with_stage(tiny.config, 2, _plans(tiny, 8, seed))
        out = masked.finish(masked.step(shared, other))
        assert out.logits.requires_grad, "the masked path must keep autograd"
        assert (out.logits - engine.run(x, other)[0]).abs().max() <= 1e-4
    tiny.zero_grad()
    out.logits.square().sum().backward()
    assert tiny.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and tiny.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("executor", [DynamicExecutor, MaskedExecutor])
def test_rollout_outcomes_equal_separate_full_runs(tiny, executor):
    """Step t's outcome is the run with stages <= t as decided and the later ones at full size."""
    torch.manual_seed(2)
    x = torch.randn(7, 3, 16, 16)
    budget = torch.linspace(0.3, 0.9, 7)
    rollout = executor(tiny).rollout(x, _RecordingPolicy(tiny), budget=budget)
    cfg, full = tiny.config, Plan.full(tiny.config)
    assert [s.stage for s in rollout.steps] == list(range(1, cfg.num_stages))
    reference = DynamicExecutor(tiny)
    for step in rollout.steps:
        plan = step.outcome.plan
        for later in range(step.stage + 1, cfg.num_stages):  # undecided stages ran at full size
            assert all(plan.key(i) == plan.with_stage(cfg, later, full).key(i) for i in range(7))
        logits, _ = reference.run(x, plan)
        assert (step.outcome.logits - logits).abs().max() <= 1e-4
        assert torch.equal(step.outcome.macs, macs_per_sample(cfg, plan))
        assert torch.equal(step.state.budget, budget.double()) and step.state.stage == step.stage
    decided, decided_plan = reference.run(x, policy=_RecordingPolicy(tiny))
    assert rollout.final.plan.key(3) == decided_plan.key(3)
    assert (rollout.final.logits - decided).abs().max() <= 1e-4


@pytest.mark.parametrize("executor", [DynamicExecutor, MaskedExecutor])
def test_policy_states_are_ordinary_tensors_with_budget_and_stage(tiny, executor):
    policy = _RecordingPolicy(tiny)
    x = torch.randn(4, 3, 16, 16)
    executor(tiny).run(x, policy=policy, budget=0.5)
    for stage, state in enumerate(policy.states, start=1):
        assert state.stage == stage
        for t in (state.cls, state.key_means, state.tokens, state.widths, state.budget):
            assert not t.is_inference() and not t.requires_grad
        assert state.budget.tolist() == [0.5] * 4
    executor(tiny).run(x, policy=policy)
    assert bool(policy.states[-1].budget.isnan().all()), "no budget given: NaN"
    weight = torch.ones(tiny.config.embed_dim, requires_grad=True)
    (policy.states[0].cls @ weight).sum().backward()  # usable with autograd later
    assert weight.grad is not None


def test_stepwise_misuse_is_a_one_line_error(tiny):
    engine = DynamicExecutor(tiny)
    state = engine.start(torch.randn(2, 3, 16, 16))
    with pytest.raises(PranceError, match="has not run yet"):
        engine.logits(state)
    done = engine.finish(state)
    assert done.logits.shape == (2, tiny.config.num_classes)
    with pytest.raises(PranceError, match="budget has 3 values"):
        engine.start(torch.randn(2, 3, 16, 16), budget=[0.1, 0.2, 0.3])
