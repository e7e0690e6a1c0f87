from __future__ import annotations

import pytest
import torch

from prance import MetaViT, Plan, PranceError
from prance.engine import DynamicExecutor
from prance.engine.grid import buckets
from prance.engine.groups import _Group
from tests.conftest import tiny_config, tiny_space


def _plans(model: MetaViT, batch: int, seed: int, keep=(0.2, 1.0)) -> Plan:
    g = torch.Generator().manual_seed(seed)
    return Plan.random(model.config, model.space, batch, generator=g, keep_range=keep)


@pytest.mark.parametrize("attention", ["auto", "exact", "padded"])
@pytest.mark.parametrize("group_call_macs", [0.0, None, float("inf")], ids=["own-width", "cost-model", "one-group"])
@pytest.mark.parametrize("seed", range(3))
def test_engine_equals_masked_path_per_image(tiny, attention, group_call_macs, seed):
    """Mixed widths, MLP widths, heads, prune and merge ratios: engine logits == masked logits,
    whether every width runs in its own group, narrower images join wider groups zero-padded,
    or all share one."""
    torch.manual_seed(seed)
    x = torch.randn(12, 3, 16, 16)
    plan = _plans(tiny, 12, seed)
    kwargs = {} if group_call_macs is None else {"group_call_macs": group_call_macs}
    with torch.inference_mode():
        got = DynamicExecutor(tiny, attention, **kwargs)(x, plan)
        want = tiny(x, plan, mode="masked")
    assert (got - want).abs().max() <= 1e-4


def test_attention_buckets_trade_padding_against_calls():
    counts = [5, 5, 7, 9, 30, 31, 50, 50]
    assert buckets(counts, 192, 0.0) == [(0, 2, 5), (2, 3, 7), (3, 4, 9), (4, 5, 30), (5, 6, 31), (6, 8, 50)]
    assert buckets(counts, 192, float("inf")) == [(0, 8, 50)]
    cut = buckets(counts, 192, 2.5e5)
    assert cut == [(0, 4, 9), (4, 6, 31), (6, 8, 50)], "near counts share a call, far ones do not"
    assert [a for a, _, _ in cut] == sorted(a for a, _, _ in cut) and cut[-1][1] == len(counts)


def test_width_groups_merge_only_when_cheaper(tiny):
    engine = DynamicExecutor(tiny)
    groups = [_Group(torch.arange(4), torch.tensor([5, 5, 5, 5]), torch.zeros(20, 32), torch.ones(20))]
    few_rows = engine._group_widths(groups, [16, 24, 32, 32])
    assert set(few_rows.values()) == {32}, "a handful of tokens: one padded group beats three calls"
    many = [_Group(torch.arange(4), torch.tensor([100_000] * 4), torch.zeros(1, 32), torch.ones(1))]
    assert engine._group_widths(many, [16, 24, 32, 32]) == {16: 16, 24: 24, 32: 32}
    assert DynamicExecutor(tiny, group_call_macs=0)._group_widths(groups, [16, 24, 32, 32]) == {16: 16, 24: 24, 32: 32}


@pytest.mark.parametrize("token_mode", ["prune", "merge"])
def test_engine_equals_masked_path_for_each_token_mode(token_mode):
    """Prune-only stages take the engine's batch-wide pruning path; merge-only ones the masked reduction."""
    torch.manual_seed(5)
    cfg = tiny_config()
    model = MetaViT(cfg, tiny_space(cfg, token_mode=token_mode)).eval()
    x = torch.randn(16, 3, 16, 16)
    plan = _plans(model, 16, seed=11, keep=(0.1, 1.0))
    with torch.inference_mode():
        assert (DynamicExecutor(model)(x, plan) - model(x, plan, mode="masked")).abs().max() <= 1e-4


def test_engine_batch_of_one_and_shared_plan(tiny):
    x = torch.randn(5, 3, 16, 16)
    plan = Plan.uniform(tiny.config, [32, 24, 16, 24], [4.0, 2.0, 3.5, 2.0], heads=[4, 3, 2, 4], keep=0.6,
                        merge_keep=0.7)
    engine = DynamicExecutor(tiny)
    with torch.inference_mode():
        shared = engine(x, plan)
        single = torch.cat([engine(x[i : i + 1], plan) for i in range(5)])
        assert (shared - tiny(x, plan)).abs().max() <= 1e-5
    assert (shared - single).abs().max() <= 1e-5


def test_engine_on_deit_stage_layout():
    torch.manual_seed(0)
    model = MetaViT(tiny_config(depth=12, stage_depth=3, embed_dim=24, num_heads=3)).eval()
    x = torch.randn(9, 3, 16, 16)
    plan = _plans(model, 9, seed=7, keep=(0.25, 1.0))
    with torch.inference_mode():
        assert (DynamicExecutor(model)(x, plan) - model(x, plan, mode="masked")).abs().max() <= 1e-4


def test_engine_snapped_keep_ratios_form_larger_groups(tiny):
    """Plans on a keep grid still match; the grid is what makes equal token counts common."""
    from dataclasses import replace

    space = replace(tiny.space, keep_grid=0.25)
    g = torch.Generator().manual_seed(3)
    plan = Plan.random(tiny.config, space, 16, generator=g, keep_range=(0.25, 1.0))
    assert set(plan.keep[:, 1:].flatten().tolist()) <= {0.25, 0.5, 0.75, 1.0}
    x = torch.randn(16, 3, 16, 16)
    with torch.inference_mode():
        assert (DynamicExecutor(tiny)(x, plan) - tiny(x, plan, mode="masked")).abs().max() <= 1e-4


def test_engine_validates_inputs(tiny):
    with pytest.raises(PranceError, match="unknown attention mode"):
        DynamicExecutor(tiny, "sparse")
    with pytest.raises(PranceError, match="expected images"):
        DynamicExecutor(tiny)(torch.randn(1, 3, 8, 8))


class _RecordingPolicy:
    """A deterministic stand-in selector: decisions from the sign of cls features and the token count."""

    def __init__(self, model: MetaViT) -> None:
        self.model, self.states = model, []

    def __call__(self, state):
        self.states.append(state)
        cfg, space = self.model.config, self.model.space
        b, k = state.cls.shape[0], cfg.stage_depth
        pick = (state.cls[:, :4] > 0).long().sum(1) + state.tokens  # per image, exact integers
        plan = Plan.full(cfg).expand(b)
        widths = plan.widths.clone()
        widths[:, state.stage] = torch.tensor(space.widths)[pick % len(space.widths)]
        ratios = plan.mlp_ratios.clone()
        for j in range(k):
            ratios[:, state.stage * k + j] = torch.tensor(space.mlp_ratios)[(pick + j) % len(space.mlp_ratios)]
        keep = plan.keep.clone()
        keep[:, state.stage] = 0.3 + 0.7 * ((pick % 5) / 4)
        return Plan(widths, ratios, plan.heads, keep, plan.merge_keep)


def test_policy_is_called_once_per_stage_and_its_plan_is_what_runs(tiny):
    """One batched call per stage; the returned executed plan reproduces the logits on the masked path."""
    torch.manual_seed(0)
    x = torch.randn(10, 3, 16, 16)
    policy = _RecordingPolicy(tiny)
    logits, plan = DynamicExecutor(tiny).run(x, policy=policy)
    assert [s.stage for s in policy.states] == list(range(1, tiny.config.num_stages))
    assert all(s.cls.shape == (10, tiny.config.embed_dim) and s.key_means.shape == (10, 17) for s in policy.states)
    assert len(plan.groups()) > 1, "the stand-in policy should give a mixed batch"
    with torch.inference_mode():
        assert (logits - tiny(x, plan, mode="masked")).abs().max() <= 1e-4


def test_policy_state_of_an_image_does_not_depend_on_its_batch(tiny):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 16, 16)
    engine = DynamicExecutor(tiny)
    together = _RecordingPolicy(tiny)
    _, plan = engine.run(x, policy=together)
    for i in range(6):
        alone = _RecordingPolicy(tiny)
        _, plan_i = engine.run(x[i : i + 1], policy=alone)
        assert plan_i.key(0) == plan.key(i)
        for s_all, s_one in zip(together.states, alone.states):
            assert int(s_all.tokens[i]) == int(s_one.tokens[0]) and int(s_all.widths[i]) == int(s_one.widths[0])
            assert (s_all.cls[i] - s_one.cls[0]).abs().max() <= 1e-5
            assert (s_all.key_means[i] - s_one.key_means[0]).abs().max() <= 1e-5
            n = int(s_one.tokens[0])
            assert bool((s_one.key_means[0, n:] == 0).all()) and bool((s_one.key_means[0, :n] != 0).any())


def test_plan_with_stage_replaces_only_that_stage(tiny):
    cfg = tiny.config
    base = Plan.full(cfg)
    other = Plan.smallest(cfg, tiny.space)
    mixed = base.with_stage(cfg, 2, other)
    k = cfg.stage_depth
    assert mixed.widths[0].tolist() == [cfg.embed_dim, cfg.embed_dim, other.widths[0, 2].item(), cfg.embed_dim]
    assert mixed.mlp_ratios[0, 2 * k : 3 * k].tolist() == other.mlp_ratios[0, 2 * k : 3 * k].tolist()
    assert mixed.mlp_ratios[0, k : 2 * k].tolist() == base.mlp_ratios[0, k : 2 * k].tolist()


def test_engine_group_untouched_by_a_reduction_finds_its_new_grid_rows():
    """Regression: one width group keeps all its tokens while another merges; the next block's
    attention grid re-sorts the images, so rows cached for the old grid must not be reused
    (they sent tokens to other images' slots, or past the grid's end)."""
    torch.manual_seed(2)
    cfg = tiny_config(depth=8, stage_depth=2)
    model = MetaViT(cfg, tiny_space(cfg, token_mode="merge", elastic_heads=False)).eval()
    b = 8
    wide = torch.arange(b) % 2 == 0  # wide images keep every token, narrow ones merge to a quarter
    rows = [Plan.uniform(cfg, [32] + [32 if w else 16] * 3, [4.0] * 8, merge_keep=1.0 if w else 0.25) for w in wide]
    plan = Plan(*(torch.cat([getattr(p, f) for p in rows]) for f in ("widths", "mlp_ratios", "heads", "keep",
                                                                       "merge_keep")))
    x = torch.randn(b, 3, 16, 16)
    with torch.inference_mode():
        got = DynamicExecutor(model, group_call_macs=0.0)(x, plan)
        want = model(x, plan, mode="masked")
    assert (got - want).abs().max() <= 1e-4
