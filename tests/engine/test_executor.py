from __future__ import annotations

import pytest
import torch

from prance import MetaViT, Plan, PranceError
from prance.engine import DynamicExecutor
from tests.conftest import tiny_config


def _plans(model: MetaViT, batch: int, seed: int, keep=(0.2, 1.0)) -> Plan:
    g = torch.Generator().manual_seed(seed)
    return Plan.random(model.config, model.space, batch, generator=g, keep_range=keep)


@pytest.mark.parametrize("attention", ["grouped", "padded"])
@pytest.mark.parametrize("seed", range(4))
def test_engine_equals_masked_path_per_image(tiny, attention, seed):
    """Mixed widths, MLP widths, heads, prune and merge ratios: engine logits == masked logits."""
    torch.manual_seed(seed)
    x = torch.randn(12, 3, 16, 16)
    plan = _plans(tiny, 12, seed)
    with torch.inference_mode():
        got = DynamicExecutor(tiny, attention)(x, plan)
        want = tiny(x, plan, mode="masked")
    assert (got - want).abs().max() <= 1e-4


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
