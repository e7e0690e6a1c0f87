from __future__ import annotations

import pytest
import torch

from prance import MetaViT, Plan, PranceError
from tests.conftest import tiny_config


def _random_plans(model: MetaViT, batch: int, seed: int, keep=(0.3, 1.0)) -> Plan:
    g = torch.Generator().manual_seed(seed)
    return Plan.random(model.config, model.space, batch, generator=g, keep_range=keep)


def test_full_plan_equals_no_plan(tiny):
    x = torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(tiny(x), tiny(x, Plan.full(tiny.config)))


def test_physical_groups_equal_each_image_alone(tiny):
    """Grouping images by plan must not change any image's logits."""
    x = torch.randn(6, 3, 16, 16)
    plan = _random_plans(tiny, 3, seed=1)
    plan = Plan.cat([plan, plan])  # images i and i+3 share a plan → groups of two
    with torch.inference_mode():
        batched = tiny(x, plan)
        alone = torch.cat([tiny(x[i : i + 1], plan.select(i)) for i in range(6)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_masked_equals_physical_for_mixed_batches(tiny, seed):
    """Per-sample widths, ratios, heads and keep ratios: both paths agree to 1e-4."""
    torch.manual_seed(seed)
    x = torch.randn(8, 3, 16, 16)
    plan = _random_plans(tiny, 8, seed=seed, keep=(0.2, 1.0))
    with torch.inference_mode():
        physical = tiny(x, plan, mode="physical")
        masked = tiny(x, plan, mode="masked")
    assert (physical - masked).abs().max() <= 1e-4


def test_masked_equals_physical_on_a_deit_stage_layout():
    """Same check with 3-block stages and heads fixed (the paper's default space)."""
    torch.manual_seed(0)
    cfg = tiny_config(depth=12, stage_depth=3, embed_dim=24, num_heads=3)
    model = MetaViT(cfg).eval()
    x = torch.randn(5, 3, 16, 16)
    plan = _random_plans(model, 5, seed=3, keep=(0.25, 1.0))
    with torch.inference_mode():
        assert (model(x, plan) - model(x, plan, mode="masked")).abs().max() <= 1e-4


def test_smaller_plans_really_run_smaller_tensors(tiny):
    """Physical execution slices: a reduced block really sees fewer channels and tokens."""
    shapes = []
    hook = tiny.blocks[2].norm2.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    plan = Plan.uniform(tiny.config, [32, 24, 16, 16], [4.0, 2.0, 2.0, 2.0], keep=0.5)
    with torch.inference_mode():
        tiny(torch.randn(2, 3, 16, 16), plan)
    hook.remove()
    # 16 patches → 8 kept at stage 1 → 4 kept at stage 2, which runs at width 16.
    assert shapes == [(2, 5, 16)]


def test_stage_map_identity_init_makes_width_changes_pure_truncation(tiny):
    """Identity maps: running stage 1 at width 24 equals truncating the residual to 24 channels."""
    x = torch.randn(2, 3, 16, 16)
    tokens = tiny.embed(x)
    mapped = tiny.stage_maps[0](tokens, 24)
    torch.testing.assert_close(mapped, tokens[..., :24])


def test_wrong_image_size_is_a_clear_error(tiny):
    with pytest.raises(PranceError, match=r"expected images of shape \[B, 3, 16, 16\]"):
        tiny(torch.randn(1, 1, 16, 16))


def test_unknown_mode_is_rejected(tiny):
    with pytest.raises(PranceError, match="unknown mode"):
        tiny(torch.randn(1, 3, 16, 16), mode="fast")


def test_trace_records_sources_per_stage(tiny):
    trace = []
    plan = Plan.uniform(tiny.config, [32, 32, 32, 32], 4.0, keep=0.5, merge_keep=1.0)
    with torch.inference_mode():
        tiny(torch.randn(1, 3, 16, 16), plan, trace=trace)
    assert len(trace) == tiny.config.num_stages
    assert [t.x.shape[1] - 1 for t in trace] == [16, 8, 4, 2]
    assert trace[-1].source is not None and trace[-1].source.shape == (1, 3, 16)
