"""Raw selector actions <-> plan entries: every decoded action is a valid plan, and round trips hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prance import Plan, PranceError
from prance.actions import ActionSpace
from tests.conftest import tiny_config, tiny_space

MODES = ["prune", "merge", "prune_merge"]
SPACES = [(mode, heads, grid, per_stage) for mode in MODES for heads in (False, True) for grid in (0.0, 0.05, 0.3)
          for per_stage in (False, True)]
CFG = tiny_config(depth=6, stage_depth=2)


def _space(mode: str, heads: bool, grid: float):
    return tiny_space(CFG, token_mode=mode, elastic_heads=heads, keep_grid=grid, min_keep=0.15)


@pytest.mark.parametrize("mode, heads, grid, per_stage", SPACES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_every_decoded_action_is_a_valid_plan_and_encodes_back(mode, heads, grid, per_stage, data):
    space = _space(mode, heads, grid)
    actions = ActionSpace(CFG, space, mlp_per_stage=per_stage)
    b = data.draw(st.integers(1, 6))
    raw = torch.tensor(data.draw(st.lists(st.lists(st.floats(0, 1), min_size=actions.size, max_size=actions.size),
                                          min_size=b, max_size=b)), dtype=torch.float64)
    stage = data.draw(st.integers(1, CFG.num_stages - 1))
    plan = actions.decode(raw, stage).validate(CFG, space)
    assert plan.batch_size == b
    _assert_same(actions.decode(actions.encode(plan, stage), stage), plan)


@pytest.mark.parametrize("mode, heads, grid, per_stage", SPACES)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_valid_plan_entries_round_trip(mode, heads, grid, per_stage, data):
    """An entry drawn from the search space directly (not via decode) comes back from decode(encode(.))."""
    space = _space(mode, heads, grid)
    actions = ActionSpace(CFG, space, mlp_per_stage=per_stage)
    k, stage = CFG.stage_depth, data.draw(st.integers(1, CFG.num_stages - 1))
    if grid > 0:
        keeps = [m * grid for m in range(1, int(1 / grid) + 1) if m * grid >= space.min_keep and m * grid <= 1] + [1.0]
        keep = st.sampled_from(keeps)
    else:
        keep = st.one_of(st.floats(space.min_keep, 1.0), st.just(1.0))
    ratio = data.draw(st.sampled_from(space.mlp_ratios))
    ratios = [ratio] * k if per_stage else [data.draw(st.sampled_from(space.mlp_ratios)) for _ in range(k)]
    head_list = [data.draw(st.sampled_from(space.heads)) if heads else CFG.num_heads for _ in range(k)]
    entry = Plan.uniform(CFG, [CFG.embed_dim] * CFG.num_stages, CFG.mlp_ratio)
    plan = entry.with_stage(CFG, stage, Plan.uniform(
        CFG, [data.draw(st.sampled_from(space.widths))] * CFG.num_stages, ratios * CFG.num_stages,
        heads=head_list * CFG.num_stages,
        keep=data.draw(keep) if mode != "merge" else 1.0, merge_keep=data.draw(keep) if mode != "prune" else 1.0))
    plan.validate(CFG, space)
    _assert_same(actions.decode(actions.encode(plan, stage), stage), plan)


def _assert_same(got: Plan, want: Plan) -> None:
    """Discrete choices exactly, keep ratios to float rounding (exact on a grid)."""
    for name in ("widths", "mlp_ratios", "heads"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("keep", "merge_keep"):
        assert (getattr(got, name) - getattr(want, name)).abs().max() <= 1e-9, name


def test_layout_sizes_and_bins():
    space = _space("prune_merge", True, 0.0)
    actions = ActionSpace(CFG, space)
    assert [d.name for d in actions.dims] == ["width", "mlp_ratio[0]", "mlp_ratio[1]", "heads[0]", "heads[1]",
                                              "prune_keep", "merge_keep"]
    assert actions.categorical_sizes == [3, 3, 3, 3, 3] and actions.continuous == [False] * 5 + [True] * 2
    assert [d.name for d in ActionSpace(CFG, _space("merge", False, 0.0), mlp_per_stage=True).dims] == [
        "width", "mlp_ratio", "merge_keep"]
    # equal-width bins, keep ratios linear onto [min_keep, 1]
    plan = actions.decode(torch.tensor([[0.0, 0.34, 1.0, 0.5, 0.99, 0.0, 1.0]]), 1)
    assert plan.widths[0, 1] == 16 and plan.mlp_ratios[0, 2:4].tolist() == [3.5, 4.0]
    assert plan.heads[0, 2:4].tolist() == [3, 4]
    assert plan.keep[0, 1].item() == pytest.approx(0.15) and plan.merge_keep[0, 1].item() == 1.0
    with pytest.raises(PranceError, match="lie in"):
        actions.decode(torch.full((1, actions.size), 1.5), 1)
    with pytest.raises(PranceError, match="expected"):
        actions.decode(torch.zeros(1, 3), 1)
    with pytest.raises(PranceError, match="stages 1"):
        actions.decode(torch.zeros(1, actions.size), 0)


def test_plans_obey_min_keep_and_keep_grid():
    space = _space("prune_merge", False, 0.1)
    ok = Plan.uniform(CFG, [32] * 3, 4.0, keep=[0.2, 1.0], merge_keep=[0.5, 0.3])
    ok.validate(CFG, space)
    with pytest.raises(PranceError, match="below the search space's min_keep"):
        Plan.uniform(CFG, [32] * 3, 4.0, keep=[0.1, 1.0]).validate(CFG, space)
    with pytest.raises(PranceError, match="keep_grid"):
        Plan.uniform(CFG, [32] * 3, 4.0, merge_keep=[0.25, 1.0]).validate(CFG, space)
    Plan.uniform(CFG, [32] * 3, 4.0, keep=[0.25, 1.0]).validate(CFG, _space("prune", False, 0.0))


@pytest.mark.parametrize("space_grid", [0.0, 0.025])
def test_a_selectors_coarser_keep_grid_raises_its_ratios_onto_that_grid(space_grid):
    space = tiny_space(CFG, token_mode="prune_merge", keep_grid=space_grid, min_keep=0.3)
    fine, coarse = ActionSpace(CFG, space), ActionSpace(CFG, space, keep_grid=0.125)
    raw = torch.rand(500, fine.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    raw[:5, -2:] = torch.tensor([0.0, 1.0])  # both ends
    for stage in (1, 2):
        want, got = fine.decode(raw, stage), coarse.decode(raw, stage).validate(CFG, space)
        for name in ("keep", "merge_keep"):
            w, g = getattr(want, name)[:, stage], getattr(got, name)[:, stage]
            assert set(torch.unique(torch.round(g * 8)).tolist()) <= set(range(3, 9))  # 0.375 .. 1 in steps of 1/8
            assert bool(((g * 8 - torch.round(g * 8)).abs() <= 1e-9).all())
            # raised, never lowered, never past the next grid step (from the space's own decoding)
            assert bool((g >= w - space_grid / 2 - 1e-12).all() and (g < w + 0.125 + space_grid / 2).all())
            assert float(g.min()) == pytest.approx(0.375)  # the first multiple of 1/8 at or above min_keep 0.3
        _assert_same(coarse.decode(coarse.encode(got, stage), stage), got)
    assert int(torch.unique(coarse.decode(raw, 1).merge_keep[:, 1]).numel()) <= 6


def test_a_selector_grid_off_the_meta_networks_grid_is_refused():
    space = tiny_space(CFG, token_mode="merge", keep_grid=0.1)
    ActionSpace(CFG, space, keep_grid=0.2)
    with pytest.raises(PranceError, match="multiple of the meta-network's keep_grid 0.1"):
        ActionSpace(CFG, space, keep_grid=0.125)
    with pytest.raises(PranceError, match=r"must be in \(0, 1\]"):
        ActionSpace(CFG, space, keep_grid=1.5)


def _decode_dim_by_dim(actions: ActionSpace, raw: torch.Tensor, stage: int) -> Plan:
    """Reference decoder: one action dimension at a time, straight from the module docstring's rules."""
    from prance.plan import snap_keep, snap_keep_up

    cfg, space, k = actions.config, actions.space, actions.config.stage_depth
    value = {}
    for j, d in enumerate(actions.dims):
        u = raw[:, j]
        if d.categorical:
            n = len(d.choices)
            value[d.name] = torch.tensor(d.choices, dtype=torch.float64)[(u * n).floor().clamp(0, n - 1).long()]
            continue
        keep = (d.low + u * (1 - d.low)).clamp(d.low, 1.0)
        if actions.keep_grid > 0:
            keep = snap_keep_up(keep, actions.keep_grid)
        elif space.keep_grid > 0:
            keep = snap_keep(keep, space.keep_grid, d.low)
        value[d.name] = torch.where(u >= 1, 1.0, keep)
    rows = []
    for i in range(len(raw)):
        ratios = [value["mlp_ratio" if actions.mlp_per_stage else f"mlp_ratio[{j}]"][i].item() for j in range(k)]
        heads = [int(value[f"heads[{j}]"][i]) if space.elastic_heads else cfg.num_heads for j in range(k)]
        entry = Plan.uniform(cfg, [int(value["width"][i])] * cfg.num_stages, ratios * cfg.num_stages,
                             heads=heads * cfg.num_stages,
                             keep=value["prune_keep"][i].item() if "prune_keep" in value else 1.0,
                             merge_keep=value["merge_keep"][i].item() if "merge_keep" in value else 1.0)
        rows.append(Plan.full(cfg).with_stage(cfg, stage, entry))
    return Plan.cat(rows)


@pytest.mark.parametrize("mode, heads, grid, per_stage", SPACES)
@pytest.mark.parametrize("selector_grid", [0.0, 0.6])
def test_decoding_all_columns_at_once_equals_decoding_dimension_by_dimension(mode, heads, grid, per_stage,
                                                                              selector_grid):
    """Bit for bit, including bin edges, 0, 1 and values a hair below them."""
    space = _space(mode, heads, grid)
    if selector_grid and grid and abs(selector_grid / grid - round(selector_grid / grid)) > 1e-9:
        selector_grid = 0.0
    actions = ActionSpace(CFG, space, mlp_per_stage=per_stage, keep_grid=selector_grid)
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([0.0, 1.0, 1 - 1e-12, 0.2, 0.4, 1 / 3, 2 / 3, 0.5, 0.15, 1e-12], dtype=torch.float64)
    raw = torch.cat([torch.rand(40, actions.size, generator=g, dtype=torch.float64),
                     edges[torch.randint(len(edges), (40, actions.size), generator=g)]])
    for stage in range(1, CFG.num_stages):
        got, want = actions.decode(raw, stage), _decode_dim_by_dim(actions, raw, stage)
        for name in ("widths", "mlp_ratios", "heads", "keep", "merge_keep"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
