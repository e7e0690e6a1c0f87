"""What meta-training samples: the sandwich covers exactly the choices the selector can make."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from prance import MetaViT, Plan, PranceError, create_model
from prance.accounting import macs_per_sample, token_fractions
from prance.cli import main
from prance.config import TOKEN_MODES, SearchSpace
from prance.model.presets import preset_config
from prance.training.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from prance.training.meta import MetaTrainConfig
from prance.training.subnets import require_trained_for, sample_subnets, smallest_subnet

MICRO = dict(embed_dim=32, depth=4, stage_depth=1, num_heads=2)
RATIOS = {"prune": ("keep",), "merge": ("merge_keep",), "prune_merge": ("keep", "merge_keep")}
pytestmark = pytest.mark.usefixtures("one_thread")


def _space(mode: str, **changes) -> SearchSpace:
    """fmnist-tiny's default space (96 channels, 49 patches, 4 stages of 3 blocks) in ``mode``."""
    return SearchSpace.default_for(preset_config("fmnist-tiny"), token_mode=mode, elastic_heads=True, **changes)


def _random_rows(mode: str, rows: int, seed: int = 0, **changes) -> Plan:
    cfg = preset_config("fmnist-tiny")
    subnets = sample_subnets(cfg, _space(mode, **changes), 1, torch.Generator().manual_seed(seed), rows)
    return subnets[2].plan


# ----------------------------------------------------------------------------- the sandwich's ends
@pytest.mark.parametrize("mode", TOKEN_MODES)
def test_smallest_subnet_costs_least_and_keeps_fewest_tokens(mode: str):
    cfg, space = preset_config("fmnist-tiny"), _space(mode)
    smallest = smallest_subnet(cfg, space)
    draws = _random_rows(mode, 3000)
    small_macs, draw_macs = macs_per_sample(cfg, smallest), macs_per_sample(cfg, draws)
    assert bool((draw_macs >= small_macs).all()) and float(draw_macs.min()) < 1.3 * float(small_macs)
    assert bool((token_fractions(cfg, draws) >= token_fractions(cfg, smallest)).all())
    # min_keep 0.1 of 49 patches keeps round(4.9) = 5, then 1 (never fewer than one patch token);
    # prune-then-merge applies it twice in stage 1 already.
    surviving = {"prune": [49, 5, 1, 1], "merge": [49, 5, 1, 1], "prune_merge": [49, 1, 1, 1]}[mode]
    torch.testing.assert_close(token_fractions(cfg, smallest)[0], torch.tensor(surviving, dtype=torch.float64) / 49)
    assert smallest.widths[0, 1:].tolist() == [48] * 3 and smallest.heads[0, 3:].eq(1).all()
    assert smallest.mlp_ratios[0, 3:].eq(2.0).all()


def test_smallest_subnet_respects_the_keep_grid_and_min_keep_1_means_no_token_reduction():
    cfg = preset_config("fmnist-tiny")
    assert smallest_subnet(cfg, _space("merge", min_keep=0.15, keep_grid=0.1)).merge_keep[0, 1:].tolist() == \
        pytest.approx([0.2] * 3)
    plan = smallest_subnet(cfg, _space("prune_merge", min_keep=1.0))
    assert plan.keep.eq(1).all() and plan.merge_keep.eq(1).all()


# ----------------------------------------------------------------------------- random subnets
@pytest.mark.parametrize("mode", TOKEN_MODES)
@pytest.mark.parametrize("grid", [0.0, 0.1, 0.25])
def test_sampled_plans_are_valid_and_use_only_the_token_modes_ratios(mode: str, grid: float):
    cfg, space = preset_config("fmnist-tiny"), _space(mode, min_keep=0.15, keep_grid=grid)
    g = torch.Generator().manual_seed(1)
    for sampling in ("per-image", "batch-shared"):
        for s in sample_subnets(cfg, space, 3, g, 64, sampling):
            s.plan.validate(cfg, space)
            for name in ("keep", "merge_keep"):
                ratios = getattr(s.plan, name)
                assert ratios[:, 0].eq(1).all()
                if name not in RATIOS[mode]:
                    assert ratios.eq(1).all(), (s.role, name)
                    continue
                assert bool(((ratios >= 0.15) & (ratios <= 1)).all()), (s.role, name)
                if grid:
                    steps = ratios / grid
                    assert bool((torch.isclose(steps, steps.round()) | ratios.eq(1)).all())


def test_keep_ratios_are_uniform_over_min_keep_to_one():
    keep = _random_rows("prune_merge", 4000, min_keep=0.2)
    values = torch.cat([keep.keep[:, 1:], keep.merge_keep[:, 1:]]).flatten()
    assert float(values.min()) < 0.21 and float(values.max()) > 0.99
    quarters = torch.histc(values.float(), bins=4, min=0.2, max=1.0) / values.numel()
    torch.testing.assert_close(quarters, torch.full((4,), 0.25), atol=0.02, rtol=0)
    on_grid = _random_rows("merge", 4000, min_keep=0.3, keep_grid=0.25).merge_keep[:, 1:].flatten()
    points, counts = on_grid.unique(return_counts=True)
    assert points.tolist() == [0.5, 0.75, 1.0]  # multiples of the grid at or above min_keep
    torch.testing.assert_close(counts / on_grid.numel(), torch.full((3,), 1 / 3), atol=0.02,
                               rtol=0)


def test_per_image_plans_differ_across_images_and_batch_shared_is_one_physical_plan():
    cfg, space = preset_config("fmnist-tiny"), _space("merge")
    per_image = sample_subnets(cfg, space, 2, torch.Generator().manual_seed(0), 32)
    for s in per_image[2:]:
        assert s.mode == "masked" and s.plan.batch_size == 32 and len(s.plan.groups()) == 32
        for field in ("widths", "mlp_ratios", "heads", "merge_keep"):
            column = getattr(s.plan, field)[:, -1]
            assert column.unique().numel() > 1, field  # each image its own choice, keep ratios included
    assert [s.plan.batch_size for s in per_image[:2]] == [1, 1] and {s.mode for s in per_image[:2]} == {"physical"}
    shared = sample_subnets(cfg, space, 2, torch.Generator().manual_seed(0), 32, "batch-shared")
    assert all(s.mode == "physical" and s.plan.batch_size == 1 for s in shared)
    assert shared[2].plan.merge_keep[0, 1:].lt(1).all()  # token reduction in the fast mode too
    again = sample_subnets(cfg, space, 2, torch.Generator().manual_seed(0), 32)
    assert all(a.plan.key(i) == b.plan.key(i) for a, b in zip(per_image, again) for i in range(a.plan.batch_size))
    with pytest.raises(PranceError, match="per-image or batch-shared"):
        sample_subnets(cfg, space, 1, torch.Generator(), 4, "per-batch")


def test_per_image_random_subnet_gives_each_image_its_own_plans_logits():
    torch.manual_seed(0)
    model = MetaViT(preset_config("fmnist-micro", **MICRO), _micro_space("prune_merge")).eval()
    [*_, s] = sample_subnets(model.config, model.space, 1, torch.Generator().manual_seed(3), 4)
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        batch = model(x, s.plan, mode=s.mode)
        alone = torch.cat([model(x[i:i + 1], s.plan.select(i)) for i in range(4)])  # physical, one at a time
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)


def _micro_space(mode: str, **changes) -> SearchSpace:
    return SearchSpace.default_for(preset_config("fmnist-micro", **MICRO), token_mode=mode, **changes)


# ----------------------------------------------------------------------------- what a checkpoint was trained for
def _meta_ckpt(mode: str, **changes) -> dict:
    return make_checkpoint(MetaViT(preset_config("fmnist-micro", **MICRO), _micro_space(mode, **changes)), "meta")


def test_a_checkpoint_trained_for_another_token_mode_or_space_is_refused_in_one_line():
    ckpt, path = _meta_ckpt("merge"), "runs/meta/best.pt"
    with pytest.raises(PranceError, match=r"^runs/meta/best.pt was trained for token mode 'merge', not 'prune'; "
                                          r"train a meta-network with --token-mode prune"):
        require_trained_for(ckpt, path, token_mode="prune")
    trained = _micro_space("merge")
    require_trained_for(ckpt, path, token_mode="merge", space=trained)
    require_trained_for(ckpt, path, space=replace(trained, widths=trained.widths[1:], min_keep=0.3, keep_grid=0.1))
    refusals = {
        "token mode 'merge', not 'prune_merge'": replace(trained, token_mode="prune_merge"),
        r"widths \[16, 20, 24, 28, 32\], not \[40\]": replace(trained, widths=(*trained.widths, 40)),
        "min_keep 0.1, not 0.05": replace(trained, min_keep=0.05),
        "--elastic-heads": replace(trained, elastic_heads=True),
    }
    for message, space in refusals.items():
        with pytest.raises(PranceError, match=message):
            require_trained_for(ckpt, path, space=space)
    on_grid = _meta_ckpt("merge", keep_grid=0.25)
    with pytest.raises(PranceError, match="0.25 grid"):
        require_trained_for(on_grid, path, space=trained)
    require_trained_for(on_grid, path, space=replace(trained, keep_grid=0.5))
    # A dense checkpoint was trained for no subnet: its slices may be evaluated in any mode.
    dense = make_checkpoint(create_model("fmnist-micro", **MICRO), "dense")
    require_trained_for(dense, "dense.pt", token_mode="prune_merge")


def test_static_plans_must_fit_the_trained_token_mode_and_min_keep():
    cfg = preset_config("fmnist-micro", **MICRO)
    widths = [32] * cfg.num_stages
    pruning = Plan.uniform(cfg, widths, 4.0, keep=0.5)
    merging = Plan.uniform(cfg, widths, 4.0, merge_keep=0.5)
    with pytest.raises(PranceError, match="trained for token mode 'merge', but the plan needs 'prune'"):
        require_trained_for(_meta_ckpt("merge"), "m.pt", plans=[merging, pruning])
    require_trained_for(_meta_ckpt("prune_merge"), "m.pt", plans=[merging, pruning])  # either alone fits both
    require_trained_for(_meta_ckpt("prune"), "m.pt", plans=[Plan.full(cfg), pruning])
    with pytest.raises(PranceError, match="down to min_keep 0.6, but the plan keeps 0.5"):
        require_trained_for(_meta_ckpt("prune", min_keep=0.6), "m.pt", plans=[pruning])


def test_evaluate_refuses_a_plan_the_meta_network_was_not_trained_for(
    tmp_path: Path, fmnist_dir: str, capsys: pytest.CaptureFixture[str]
):
    save_checkpoint(tmp_path / "meta.pt", MetaViT(preset_config("fmnist-micro", **MICRO), _micro_space("merge")),
                    "meta")
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump({"widths": [32] * 4, "mlp_ratios": [4.0] * 4, "keep": [0.5] * 3}))
    code = main(["evaluate", "--checkpoint", str(tmp_path / "meta.pt"), "--plan", str(plan_file), "--data-dir",
                 fmnist_dir, "--limit", "8", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{tmp_path / 'meta.pt'} was trained for token mode 'merge', but the plan needs 'prune'" in err


# ----------------------------------------------------------------------------- train-meta end to end
@pytest.mark.parametrize("mode", TOKEN_MODES)
def test_train_meta_trains_for_the_chosen_token_mode_and_records_it(tmp_path: Path, fmnist_dir: str, mode: str):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "dense.pt", create_model("fmnist-micro", **MICRO), "dense")
    out = tmp_path / "meta"
    assert main(["train-meta", "--init", str(tmp_path / "dense.pt"), "--teacher", "init", "--token-mode", mode,
                 "--min-keep", "0.3", "--keep-grid", "0.1", "--data-dir", fmnist_dir, "--limit", "160", "--holdout",
                 "0.2", "--val-limit", "16", "--batch-size", "32", "--max-steps", "2", "--warmup-steps", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out / "last.pt", kind="meta")
    assert ckpt["space"]["token_mode"] == mode
    assert ckpt["space"]["min_keep"] == 0.3 and ckpt["space"]["keep_grid"] == 0.1
    assert ckpt["args"]["train"]["random_subnets"] == "per-image"
    require_trained_for(ckpt, out / "last.pt", token_mode=mode)
    # The smallest subnet validated (and kept for best.pt) is the one trained: fewest tokens.
    fewest = smallest_subnet(preset_config("fmnist-micro", **MICRO), SearchSpace.from_dict(ckpt["space"]))
    assert ckpt["metrics"]["val_gmacs_smallest"] == pytest.approx(float(macs_per_sample(
        preset_config("fmnist-micro", **MICRO), fewest)[0]) / 1e9)


def test_train_meta_defaults_to_merge_from_a_dense_model_and_keeps_a_meta_models_mode(tmp_path: Path):
    from prance.training.meta import MetaRunConfig, build_meta_model

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "dense.pt", create_model("fmnist-micro", **MICRO), "dense")
    assert build_meta_model(MetaRunConfig(init=str(tmp_path / "dense.pt")), 0).space.token_mode == "merge"
    assert build_meta_model(MetaRunConfig(preset="fmnist-micro", model_overrides=MICRO), 0).space.token_mode == "merge"
    save_checkpoint(tmp_path / "meta.pt", MetaViT(preset_config("fmnist-micro", **MICRO), _micro_space("prune")),
                    "meta")
    assert build_meta_model(MetaRunConfig(init=str(tmp_path / "meta.pt")), 0).space.token_mode == "prune"
    run = MetaRunConfig(init=str(tmp_path / "meta.pt"), space={"token_mode": "prune_merge"})
    assert build_meta_model(run, 0).space.token_mode == "prune_merge"  # an explicit --token-mode wins
    with pytest.raises(PranceError, match="older prance"):  # a run written before --token-mode cannot resume
        MetaTrainConfig.from_dict({**MetaTrainConfig().to_dict(), "token_keep": [0.5, 1.0]})
