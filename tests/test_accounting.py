from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prance import MetaViT, Plan, count_macs, count_params, mac_breakdown
from prance.accounting import MATMUL_PARTS, params_per_sample, token_fractions
from prance.model import preset_config


def test_dense_deit_macs_match_published_figures():
    assert round(count_macs(preset_config("deit-small")) / 1e9, 1) == 4.6
    assert round(count_macs(preset_config("deit-tiny")) / 1e9, 1) == 1.3
    assert round(count_macs(preset_config("deit-base")) / 1e9, 1) == 17.6


def _counted_macs(model: MetaViT, plan: Plan) -> int:
    for blk in model.blocks:
        blk.attn.fused_attn = False  # explicit attention: FlopCounterMode sees QK^T and AV
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, *[model.config.in_chans, model.config.img_size, model.config.img_size]), plan)
    return counter.get_total_flops() // 2


def _matmul_macs(model: MetaViT, plan: Plan) -> int:
    parts = mac_breakdown(model, plan)
    return int(sum(parts[k] for k in MATMUL_PARTS))


@pytest.mark.parametrize("seed", range(4))
def test_formula_equals_flop_counter_on_random_plans(tiny, seed):
    g = torch.Generator().manual_seed(seed)
    plan = Plan.random(tiny.config, tiny.space, 1, generator=g, keep_range=(0.2, 1.0))
    assert _matmul_macs(tiny, plan) == _counted_macs(tiny, plan)


def test_formula_equals_flop_counter_dense(tiny):
    plan = Plan.full(tiny.config)
    assert _matmul_macs(tiny, plan) == _counted_macs(tiny, plan)
    # attention is really counted (not silently 0)
    assert mac_breakdown(tiny, plan)["attention"].item() > 0


def test_formula_equals_flop_counter_on_a_12_block_model():
    torch.manual_seed(0)
    model = MetaViT(preset_config("fmnist-micro")).eval()
    plan = Plan.uniform(model.config, [48, 36, 24, 24], [4.0] * 3 + [2.0] * 9, keep=[0.7, 0.5, 0.5])
    assert _matmul_macs(model, plan) == _counted_macs(model, plan)


def test_smaller_plans_cost_less(tiny):
    full = count_macs(tiny)
    small = count_macs(tiny, Plan.smallest(tiny.config, tiny.space))
    pruned = count_macs(tiny, Plan.uniform(tiny.config, [32] * 4, 4.0, keep=0.5))
    assert small < full and pruned < full


def test_params_count_full_model_equals_module_parameters(tiny):
    stage_maps = sum(p.numel() for p in tiny.stage_maps.parameters())
    total = sum(p.numel() for p in tiny.parameters())
    assert count_params(tiny) == total - stage_maps


def test_params_of_reduced_plan_count_sliced_tensors(tiny):
    plan = Plan.uniform(tiny.config, [32, 16, 16, 16], [4.0, 2.0, 2.0, 2.0], heads=[4, 2, 2, 2])
    expected = params_per_sample(tiny).item()
    # Blocks 1-3 at width 16, 2 heads (inner 16), hidden 32 instead of width 32, 4 heads, hidden 128.
    per_block_full = 2 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 2 * 32 + 32 * 128 + 128 + 128 * 32 + 32
    per_block_small = 2 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 2 * 16 + 16 * 32 + 32 + 32 * 16 + 16
    stage_map = 32 * 16 + 16
    head_saving = (2 * 32 + 32 * 7) - (2 * 16 + 16 * 7)
    expected = expected - 3 * (per_block_full - per_block_small) + stage_map - head_saving
    assert count_params(tiny, plan) == expected


def test_token_fractions(tiny):
    plan = Plan.uniform(tiny.config, [32] * 4, 4.0, keep=0.5)
    assert token_fractions(tiny.config, plan).tolist() == [[1.0, 0.5, 0.25, 0.125]]


@pytest.mark.parametrize("spec", ["evit:0.5", "evit-fuse:0.6", "tome:3"])
def test_formula_equals_flop_counter_for_static_baselines(spec):
    """count_macs is exact for EViT and ToMe too (12 blocks, decisions at blocks 3, 6, 9)."""
    from prance.tokens.baselines import parse_reducer

    torch.manual_seed(0)
    model = MetaViT(preset_config("fmnist-micro")).eval()
    reducer = parse_reducer(spec)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, 1, 28, 28), reducer=reducer)
    parts = mac_breakdown(model, None, reducer)
    assert int(sum(parts[k] for k in MATMUL_PARTS)) == counter.get_total_flops() // 2
    assert count_macs(model, reducer=reducer) < count_macs(model)


def test_token_fractions_follow_a_reducer():
    from prance.tokens.baselines import EViTReducer

    cfg = preset_config("fmnist-micro")
    fractions = token_fractions(cfg, Plan.full(cfg), EViTReducer(0.5))
    assert fractions.tolist() == [[1.0, 25 / 49, 13 / 49, 7 / 49]]  # round(12.5) = 13, round(6.5) = 7
