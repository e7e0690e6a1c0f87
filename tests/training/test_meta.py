"""Meta-network training with weight sharing (sandwich rule, in-place distillation), on toy shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prance import MetaViT, Plan, PranceError, create_model
from prance.training.checkpoint import atomic_save, load_checkpoint, model_from_checkpoint, save_checkpoint
from prance.training.meta import (
    MetaRunConfig,
    MetaTrainConfig,
    Sandwich,
    distill_loss,
    run_train_meta,
    sample_subnets,
    sandwich_loss,
    space_with,
)
from tests.conftest import tiny_config, tiny_space

MICRO = dict(embed_dim=32, depth=4, stage_depth=1, num_heads=2)
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(fmnist_dir: str, **changes) -> MetaRunConfig:
    base = dict(preset="fmnist-micro", model_overrides=MICRO, data_dir=fmnist_dir, limit=320, holdout=0.2,
                space={"elastic_heads": True})
    return MetaRunConfig(**{**base, **changes})


def _cfg(**changes) -> MetaTrainConfig:
    base = dict(epochs=2, batch_size=64, lr=3e-3, warmup_steps=2, log_every=1)
    return MetaTrainConfig(**{**base, **changes})


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- one sandwich
def test_sandwich_step_trains_both_the_largest_and_the_smallest_subnet():
    torch.manual_seed(0)
    cfg_model = tiny_config()
    model = MetaViT(cfg_model, tiny_space(cfg_model))
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 7, (8,))
    subnets = sample_subnets(model.config, model.space, 0, torch.Generator().manual_seed(0), 8)
    assert [s.role for s in subnets] == ["largest", "smallest"]
    logits = Sandwich(model)(x, subnets)
    loss, parts = sandwich_loss(logits, subnets, y, _cfg())
    loss.backward()
    assert set(parts) == {"largest", "smallest"} and parts["smallest"] > 0
    assert loss.item() == pytest.approx(sum(parts.values()), rel=1e-6)

    small_hidden = int(Plan.smallest(model.config, model.space).mlp_hidden(model.config)[0, -1])
    last_fc1 = model.blocks[-1].mlp.fc1.weight.grad
    # Hidden units beyond the smallest subnet's only learn from the largest subnet ...
    assert last_fc1[small_hidden:].abs().sum() > 0
    # ... and the stage map into the smallest width only from the smallest subnet.
    assert model.stage_maps[0].weight.grad is not None and model.stage_maps[0].weight.grad.abs().sum() > 0
    # The smallest subnet's loss reaches shared weights: its gradient alone is non-zero on them.
    model.zero_grad()
    small_only = sandwich_loss([logits[0].detach(), model(x, subnets[1].plan)], subnets, y, _cfg())[0]
    small_only.backward()
    assert model.blocks[-1].mlp.fc1.weight.grad[:small_hidden].abs().sum() > 0
    assert model.blocks[-1].mlp.fc1.weight.grad[small_hidden:].abs().sum() == 0


def test_random_subnets_cover_the_search_space_and_are_a_function_of_the_seed():
    cfg = tiny_config()
    space = tiny_space(cfg)

    def draw(seed):
        return sample_subnets(cfg, space, 40, torch.Generator().manual_seed(seed), 4, "batch-shared")[2:]

    a, b = draw(1), draw(1)
    assert [s.plan.key(0) for s in a] == [s.plan.key(0) for s in b]
    assert [s.plan.key(0) for s in a] != [s.plan.key(0) for s in draw(2)]
    widths = torch.cat([s.plan.widths[:, 1:] for s in a]).unique().tolist()
    ratios = torch.cat([s.plan.mlp_ratios[:, 1:] for s in a]).unique().tolist()
    heads = torch.cat([s.plan.heads[:, 1:] for s in a]).unique().tolist()
    assert widths == list(space.widths) and ratios == list(space.mlp_ratios) and heads == list(space.heads)
    assert all(s.mode == "physical" and s.plan.batch_size == 1 for s in a)


def test_per_image_random_subnets_run_masked_and_train():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = MetaViT(cfg, tiny_space(cfg, token_mode="prune", min_keep=0.3))
    subnets = sample_subnets(cfg, model.space, 2, torch.Generator().manual_seed(0), 6)
    for s in subnets[2:]:
        assert s.mode == "masked" and s.plan.batch_size == 6
        keep = s.plan.keep[:, 1:]
        assert ((keep >= 0.3) & (keep <= 1.0)).all() and keep.unique().numel() > 1  # per image, per stage
        assert len(s.plan.groups()) > 1  # images really get different plans
    assert subnets[0].plan.keep.eq(1).all() and subnets[1].plan.keep[:, 1:].eq(0.3).all()
    logits = Sandwich(model)(torch.randn(6, 3, 16, 16), subnets)
    loss, parts = sandwich_loss(logits, subnets, torch.randint(0, 7, (6,)), _cfg())
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"largest", "smallest", "random0", "random1"}


def test_distillation_targets_follow_the_chosen_source():
    z = torch.randn(5, 7)
    assert distill_loss(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(z, torch.randn(5, 7), 2.0).item() > 0
    cfg = tiny_config()
    subnets = sample_subnets(cfg, tiny_space(cfg), 0, torch.Generator(), 5)
    largest, teacher = torch.randn(5, 7), torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    # smallest == teacher's logits: zero loss only when distilling from the teacher
    _, from_teacher = sandwich_loss([largest, teacher.clone()], subnets, y, _cfg(distill_from="teacher"), teacher)
    _, in_place = sandwich_loss([largest, teacher.clone()], subnets, y, _cfg(), teacher)
    assert from_teacher["smallest"] == pytest.approx(0.0, abs=1e-6) and in_place["smallest"] > 0
    with pytest.raises(PranceError, match="teacher"):
        sandwich_loss([largest, teacher], subnets, y, _cfg(distill_from="teacher"))


# ----------------------------------------------------------------------------- whole runs on real data
def test_meta_training_lowers_the_loss_and_writes_meta_checkpoints(tmp_path: Path, fmnist_dir: str):
    summary = run_train_meta(_run(fmnist_dir, limit=512), _cfg(epochs=3), tmp_path,
                             progress=False)
    steps = [r for r in _log(tmp_path) if r["event"] == "step"]
    assert summary["complete"] and steps[-1]["step"] == summary["total_steps"] == 24  # 512 train images / 64 × 3
    first, last = sum(r["loss_largest"] for r in steps[:3]) / 3, sum(r["loss_largest"] for r in steps[-3:]) / 3
    assert last < first - 0.05, (first, last)
    assert {"loss_smallest", "loss_random0", "loss_random1"} <= set(steps[0])
    ckpt = load_checkpoint(tmp_path / "last.pt", kind="meta")
    assert ckpt["space"]["elastic_heads"] is True and ckpt["args"]["run"]["holdout"] == 0.2
    assert (tmp_path / "best.pt").is_file() and "val_top1_smallest" in ckpt["metrics"]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path, fmnist_dir: str):
    dense = tmp_path / "dense.pt"
    torch.manual_seed(3)
    save_checkpoint(dense, create_model("fmnist-micro", **MICRO), "dense")
    run = _run(fmnist_dir, preset=None, model_overrides={}, init=str(dense), teacher="init")
    cfg = _cfg(checkpoint_every=3, num_random=1)
    run_train_meta(run, cfg, tmp_path / "straight", progress=False)
    run_train_meta(run, cfg, tmp_path / "resumed", progress=False, stop_after=3)  # mid-epoch (5 steps/epoch)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["train_state"]["step"] == 3
    with pytest.raises(PranceError, match="already holds a run"):
        run_train_meta(run, cfg, tmp_path / "resumed", progress=False)
    with pytest.raises(PranceError, match="lr"):
        run_train_meta(run, _cfg(checkpoint_every=3, num_random=1, lr=1.0),
                       tmp_path / "resumed", resume=True, progress=False)
    run_train_meta(run, cfg, tmp_path / "resumed", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_checkpoint(dense)["model"]
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])  # it did train


def test_without_augmentation_the_loop_reads_plain_training_images_and_resume_keeps_the_choice(
        reads: list, tmp_path: Path, fmnist_dir: str):
    run = _run(fmnist_dir, limit=128, val_limit=32)
    run_train_meta(run, _cfg(epochs=1, augment=False), tmp_path, progress=False, stop_after=1)
    with pytest.raises(PranceError, match="augment=True, but the run used False"):
        run_train_meta(run, _cfg(epochs=1), tmp_path, resume=True, progress=False)
    assert run_train_meta(run, _cfg(epochs=1, augment=False), tmp_path, resume=True, progress=False)["complete"]
    # The run's holdout (0.2, seed 0), independently: the first 20 % of a permutation seeded by 0.
    held_out = set(torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:12_000].tolist())
    assert reads and not any(augmented for _, augmented, _ in reads)
    assert len(set().union(*(rows for _, _, rows in reads)) - held_out) == 128  # every training image, plain

    # A run recorded before the setting existed trained with augmentation: resuming it without is refused.
    last = load_checkpoint(tmp_path / "last.pt")
    del last["args"]["train"]["augment"]
    atomic_save(last, tmp_path / "last.pt")
    with pytest.raises(PranceError, match="augment=False, but the run used True"):
        run_train_meta(run, _cfg(epochs=1, augment=False), tmp_path, resume=True, progress=False)
    assert run_train_meta(run, _cfg(epochs=1), tmp_path, resume=True, progress=False)["complete"]


def test_meta_model_from_dense_keeps_its_weights_and_the_requested_space(tmp_path: Path):
    torch.manual_seed(0)
    dense = create_model("fmnist-micro", **MICRO)
    save_checkpoint(tmp_path / "d.pt", dense, "dense")
    from prance.training.meta import build_meta_model

    model = build_meta_model(MetaRunConfig(init=str(tmp_path / "d.pt"), space={"widths": [16, 32]}), seed=0)
    assert model.space.widths == (16, 32)
    x = torch.randn(2, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(x), dense.eval()(x))
    with pytest.raises(PranceError, match="embed_dim"):
        space_with(model.config, model.space, widths=[16, 24])
    with pytest.raises(PranceError, match="--init PATH"):
        build_meta_model(MetaRunConfig(), seed=0)
    assert model_from_checkpoint(load_checkpoint(tmp_path / "d.pt")).space != model.space
