from __future__ import annotations

import pytest
import torch

from prance import Plan, PranceError
from prance.plan import kept_count
from tests.conftest import tiny_config, tiny_space


@pytest.fixture
def cs():
    cfg = tiny_config()
    return cfg, tiny_space(cfg)


def test_random_plans_are_valid_and_vary(cs):
    cfg, space = cs
    plan = Plan.random(cfg, space, 64, generator=torch.Generator().manual_seed(0), keep_range=(0.2, 1.0))
    plan.validate(cfg, space)
    assert len({plan.key(i) for i in range(64)}) > 32
    assert (plan.widths[:, 0] == cfg.embed_dim).all() and (plan.keep[:, 0] == 1).all()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("widths", [32, 20, 32, 32], "outside the search space"),
        ("widths", [24, 24, 32, 32], "stage 0 always runs at full width"),
        ("mlp_ratios", [4.0, 3.0, 4.0, 4.0], "outside the search space"),
        ("heads", [4, 1, 4, 4], "outside the search space"),
        ("keep", [1.0, 0.0, 1.0, 1.0], r"must be in \(0, 1\]"),
        ("keep", [1.0, 1.5, 1.0, 1.0], r"must be in \(0, 1\]"),
        ("keep", [0.5, 1.0, 1.0, 1.0], "stage 0 keeps every token"),
    ],
)
def test_invalid_plans_are_rejected(cs, field, value, message):
    cfg, space = cs
    full = Plan.full(cfg)
    bad = Plan(**{**full.__dict__, field: torch.tensor([value], dtype=getattr(full, field).dtype)})
    with pytest.raises(PranceError, match=message):
        bad.validate(cfg, space)


def test_heads_fixed_unless_elastic(cs):
    cfg, space = cs
    fixed = tiny_space(cfg, elastic_heads=False)
    plan = Plan.uniform(cfg, [32] * 4, 4.0, heads=[4, 2, 4, 4])
    plan.validate(cfg, space)
    with pytest.raises(PranceError, match="enable elastic_heads"):
        plan.validate(cfg, fixed)


def test_token_mode_restricts_ratios(cs):
    cfg, _ = cs
    plan = Plan.uniform(cfg, [32] * 4, 4.0, merge_keep=0.5)
    with pytest.raises(PranceError, match="takes no merge_keep"):
        plan.validate(cfg, tiny_space(cfg, token_mode="prune"))


def test_dict_round_trip(cs):
    cfg, space = cs
    plan = Plan.random(cfg, space, 1, generator=torch.Generator().manual_seed(4), keep_range=(0.3, 0.9))
    again = Plan.from_dict(cfg, plan.to_dict())
    assert again.key(0) == plan.key(0)


def test_mlp_hidden_keeps_float_ratios():
    cfg = tiny_config()
    plan = Plan.uniform(cfg, [32, 24, 16, 16], [4.0, 3.5, 3.5, 2.0])
    assert plan.mlp_hidden(cfg).tolist() == [[128, 84, 56, 32]]


def test_kept_count_rounds_and_keeps_one():
    assert kept_count(196, 1.0).item() == 196
    assert kept_count(196, 0.5).item() == 98
    assert kept_count(10, 0.01).item() == 1
    assert kept_count(torch.tensor([49, 7]), torch.tensor([0.7, 0.5], dtype=torch.float64)).tolist() == [34, 4]
