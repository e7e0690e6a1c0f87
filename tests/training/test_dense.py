"""Dense training on a small real Fashion-MNIST slice with a toy model shape (seconds per run)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from prance import PranceError
from prance.training import dense
from prance.training.checkpoint import load_checkpoint, model_from_checkpoint
from prance.training.dense import DenseTrainConfig, cosine_lr, resume_config, train_dense
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(fmnist_dir: str, **changes) -> DenseTrainConfig:
    base = dict(data_dir=fmnist_dir, model_overrides=TINY, limit=256, val_limit=128, batch_size=64, epochs=2,
                lr=3e-3, warmup_epochs=0.5, log_every=2)
    return DenseTrainConfig(**{**base, **changes})


def _weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return load_checkpoint(run / name)["model"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _log(run: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == event]


def test_cosine_schedule_warms_up_then_decays():
    lrs = [cosine_lr(s, total_steps=100, warmup_steps=10, base_lr=1.0, min_lr=0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from prance import create_model

    model = create_model("fmnist-tiny", **TINY)
    decay, no_decay = dense.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"pos_embed", "cls_token", "norm.weight", "head.bias"}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_loss_goes_down_on_real_images(fmnist_dir: str, tmp_path: Path):
    run = tmp_path / "run"
    summary = train_dense(_cfg(fmnist_dir, limit=512, val_limit=256, epochs=4), run, verbose=False)
    epochs = _log(run, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    # Seeds 0-2 drop it by 0.20-0.23 from epoch 1 to 4 (random at epoch 1 would stay near ln 10 = 2.30).
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] - 0.15
    assert summary["best_top1"] > 20.0  # chance is 10 %; a toy ViT learns slowly from 512 images
    assert _log(run, "step") and {"loss", "lr", "img_per_s"} <= _log(run, "step")[0].keys()
    for key in ("train_loss", "train_acc", "holdout_top1", "lr", "seconds", "img_per_s"):
        assert key in epochs[-1]
    best = load_checkpoint(run / "best.pt", kind="dense")
    assert best["metrics"]["holdout_top1"] == summary["best_top1"]
    assert model_from_checkpoint(best).config.embed_dim == 32


def test_same_seed_same_weights_other_seed_other_weights(fmnist_dir: str, tmp_path: Path):
    train_dense(_cfg(fmnist_dir), tmp_path / "a", verbose=False)
    train_dense(_cfg(fmnist_dir), tmp_path / "b", verbose=False)
    train_dense(_cfg(fmnist_dir, seed=1), tmp_path / "c", verbose=False)
    _assert_same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert not torch.equal(_weights(tmp_path / "a")["head.weight"], _weights(tmp_path / "c")["head.weight"])


def test_interrupted_then_resumed_run_ends_with_identical_weights(
    fmnist_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    straight = tmp_path / "straight"
    train_dense(_cfg(fmnist_dir), straight, verbose=False)

    # Interrupt the second run during epoch 2 (after its training steps, before its checkpoint).
    run = tmp_path / "interrupted"
    real_evaluate, calls = dense.evaluate, []

    def evaluate_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(dense, "evaluate", evaluate_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_dense(_cfg(fmnist_dir), run, verbose=False)
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pt")["train_state"]["epoch"] == 1  # the previous checkpoint is intact

    summary = train_dense(resume_config(run), run, resume=True, verbose=False)
    assert summary["epochs"] == 2 and summary["complete"]
    _assert_same_weights(_weights(straight), _weights(run))
    _assert_same_weights(_weights(straight, "best.pt"), _weights(run, "best.pt"))


def test_paused_mid_epoch_then_resumed_equals_straight_run(fmnist_dir: str, tmp_path: Path):
    train_dense(_cfg(fmnist_dir), tmp_path / "straight", verbose=False)
    # 256 images in batches of 64: 4 steps per epoch; pause in the middle of epoch 2, twice.
    paused = train_dense(_cfg(fmnist_dir), tmp_path / "twice", stop_after=6, verbose=False)
    assert paused["step"] == 6 and paused["epochs"] == 1 and not paused["complete"]
    state = load_checkpoint(tmp_path / "twice" / "last.pt")["train_state"]
    assert (state["step"], state["epoch"], state["in_epoch"]) == (6, 1, 2)
    train_dense(_cfg(fmnist_dir), tmp_path / "twice", resume=True, stop_after=1, verbose=False)
    train_dense(_cfg(fmnist_dir), tmp_path / "twice", resume=True, verbose=False)
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "twice"))
    _assert_same_weights(_weights(tmp_path / "straight", "best.pt"), _weights(tmp_path / "twice", "best.pt"))
    assert [r["resumed_at_step"] for r in _log(tmp_path / "twice", "start")] == [None, 6, 7]
    # The holdout that chose best.pt is recorded next to the run and in every checkpoint.
    split = json.loads((tmp_path / "twice" / "split.json").read_text())
    assert split["holdout"] == {"fraction": 0.1, "seed": 0} and split["train_images"] == 256
    assert load_checkpoint(tmp_path / "twice" / "best.pt")["split"] == split


def test_existing_run_is_not_overwritten_without_asking(fmnist_dir: str, tmp_path: Path):
    run = tmp_path / "run"
    train_dense(_cfg(fmnist_dir, epochs=1), run, verbose=False)
    before = (run / "last.pt").read_bytes()
    with pytest.raises(PranceError, match="--resume .* --overwrite"):
        train_dense(_cfg(fmnist_dir, epochs=1), run, verbose=False)
    assert (run / "last.pt").read_bytes() == before
    # Resuming a finished run changes nothing; overwriting starts over.
    assert train_dense(_cfg(fmnist_dir, epochs=1), run, resume=True, verbose=False)["complete"]
    assert (run / "last.pt").read_bytes() == before
    train_dense(_cfg(fmnist_dir, epochs=1, seed=5), run, overwrite=True, verbose=False)
    assert load_checkpoint(run / "last.pt")["args"]["seed"] == 5


def test_resume_refuses_changed_settings_and_missing_runs(fmnist_dir: str, tmp_path: Path):
    with pytest.raises(PranceError, match="nothing to resume"):
        train_dense(_cfg(fmnist_dir), tmp_path / "empty", resume=True, verbose=False)
    run = tmp_path / "run"
    train_dense(_cfg(fmnist_dir, epochs=1), run, verbose=False)
    with pytest.raises(PranceError, match="lr=0.01"):
        train_dense(_cfg(fmnist_dir, epochs=2, lr=0.01), run, resume=True, verbose=False)
    with pytest.raises(PranceError, match="contradict"):
        train_dense(_cfg(fmnist_dir), run, resume=True, overwrite=True, verbose=False)


def test_without_augmentation_the_loop_reads_the_plain_images_and_resume_keeps_the_choice(
        fmnist_dir: str, tmp_path: Path):
    from prance.data import build_dataset
    from prance.training.run import DistContext

    plain = build_dataset("fashion-mnist", "train", img_size=28, in_chans=1, train_augment=False, root=fmnist_dir)
    for augment in (False, True):
        train_set = dense.build_dense_task(_cfg(fmnist_dir, augment=augment), None, DistContext())[1]
        reads = [torch.stack([train_set[i][0] for i in range(16)]) for _ in range(2)]
        stored = torch.stack([plain[int(i)][0] for i in train_set.indices[:16]])
        # Crops and flips are drawn per read: two reads of 16 augmented images cannot all agree.
        assert torch.equal(reads[0], stored) == torch.equal(reads[1], stored) == (not augment)
    run = tmp_path / "run"
    train_dense(_cfg(fmnist_dir, epochs=1), run, verbose=False)
    with pytest.raises(PranceError, match="augment=False"):
        train_dense(_cfg(fmnist_dir, epochs=2, augment=False), run, resume=True, verbose=False)


@pytest.mark.parametrize(
    "changes, fragment",
    [(dict(epochs=0), "epochs"), (dict(batch_size=0), "batch size"), (dict(lr=0.0), "learning rate"),
     (dict(limit=0), "limit")],
)
def test_bad_settings_are_refused_up_front(changes: dict, fragment: str):
    with pytest.raises(PranceError, match=fragment):
        DenseTrainConfig(**changes)


def test_init_from_timm_file_keeps_backbone_and_starts_a_new_head(fmnist_dir: str, tmp_path: Path):
    from prance import create_model, to_timm_state_dict

    torch.manual_seed(3)
    # A bare state dict does not tell the head count; 192 is DeiT-tiny's width (3 heads).
    source = to_timm_state_dict(create_model("fmnist-tiny", embed_dim=192, num_heads=3, depth=3, num_classes=7))
    torch.save(source, tmp_path / "vit.pth")
    cfg = DenseTrainConfig(data_dir=fmnist_dir, init=f"timm:{tmp_path / 'vit.pth'}", limit=64, val_limit=32,
                           batch_size=32, epochs=1, lr=1e-9, min_lr=0.0)
    train_dense(cfg, tmp_path / "run", verbose=False)
    trained = _weights(tmp_path / "run")
    assert trained["head.weight"].shape == (10, 192)  # Fashion-MNIST has 10 classes, the file 7
    torch.testing.assert_close(trained["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"],
                               atol=1e-6, rtol=0)
    with pytest.raises(PranceError, match="--img-size"):
        train_dense(replace(cfg, img_size=32), tmp_path / "other", verbose=False)


def test_a_run_saved_by_the_honest_splits_commit_resumes_to_the_same_weights(fmnist_dir: str, tmp_path: Path):
    """Dense checkpoints of c65f9bc (epoch-end train_state with best_top1, args without checkpoint_every)."""
    from prance.training.checkpoint import atomic_save

    train_dense(_cfg(fmnist_dir), tmp_path / "straight", verbose=False)
    run = tmp_path / "old"
    train_dense(_cfg(fmnist_dir), run, stop_after=4, verbose=False)  # one whole epoch
    ckpt = load_checkpoint(run / "last.pt")
    state = ckpt["train_state"]
    ckpt["train_state"] = dict(optimizer=state["optimizer"], epoch=1, step=4, best_top1=state["best_score"],
                               best_epoch=1, rng={}, schedule=state["schedule"])
    ckpt["args"] = {k: v for k, v in ckpt["args"].items() if k != "checkpoint_every"}
    atomic_save(ckpt, run / "last.pt")
    train_dense(resume_config(run), run, resume=True, verbose=False)
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(run))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a visible GPU would make --device cuda valid")
def test_asking_for_cuda_without_a_gpu_is_a_one_line_error_and_creates_nothing(fmnist_dir: str, tmp_path: Path):
    with pytest.raises(PranceError, match="no CUDA device.*--device cpu"):
        train_dense(_cfg(fmnist_dir), tmp_path / "run", device="cuda", verbose=False)
    assert not (tmp_path / "run").exists()
