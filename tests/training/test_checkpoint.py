from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

import prance
from prance import PranceError, create_model
from prance.training import checkpoint as ck
from prance.training.checkpoint import (
    atomic_save,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tests.conftest import TINY


def _model(seed: int = 0) -> prance.MetaViT:
    torch.manual_seed(seed)
    return create_model("fmnist-tiny", **TINY)


def _one_line_error(fn, *fragments: str) -> str:
    with pytest.raises(PranceError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_round_trip_restores_model_config_and_state(tmp_path: Path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "a.pt", model, "dense", train_state={"optimizer": optimizer.state_dict(),
                           "epoch": 3}, metrics={"val_top1": 50.0}, args={"out": tmp_path, "lr": 1e-3})
    ckpt = load_checkpoint(path, kind="dense")
    assert ckpt["format"] == "prance-checkpoint" and ckpt["format_version"] == 1
    assert ckpt["prance_version"] == prance.__version__
    assert ckpt["config"] == model.config.to_dict() and ckpt["space"] == model.space.to_dict()
    assert ckpt["train_state"]["epoch"] == 3 and ckpt["metrics"]["val_top1"] == 50.0
    assert ckpt["args"]["out"] == str(tmp_path)  # paths are stored as plain strings
    restored = model_from_checkpoint(ckpt)
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(restored(x), model.eval()(x), rtol=0, atol=0)
    opt2 = torch.optim.AdamW(restored.parameters())
    opt2.load_state_dict(ckpt["train_state"]["optimizer"])


def test_rng_state_round_trip_through_a_file(tmp_path: Path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


def test_failed_write_leaves_old_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _model(0), "dense", metrics={"epoch": 1})
    before = path.read_bytes()

    def crash_midway(obj, f):
        f.write(b"PK\x03\x04 half a zip file")  # something is already on disk when the failure hits
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(ck.torch, "save", crash_midway)
    with pytest.raises(RuntimeError, match="simulated"):
        save_checkpoint(path, _model(1), "dense", metrics={"epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["metrics"]["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_interrupt_during_write_leaves_old_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _model(0), "dense")
    before = path.read_bytes()

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _model(1), "dense")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_write_error_is_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def disk_full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    _one_line_error(lambda: save_checkpoint(tmp_path / "x.pt", _model(), "dense"), "x.pt", "No space left")


def test_missing_file_and_folder(tmp_path: Path):
    _one_line_error(lambda: load_checkpoint(tmp_path / "nope.pt"), "nope.pt", "does not exist")
    _one_line_error(lambda: load_checkpoint(tmp_path), "is a folder")


@pytest.mark.parametrize("keep", [0, 100, 0.5])
def test_truncated_checkpoint_is_reported(tmp_path: Path, keep: float):
    path = save_checkpoint(tmp_path / "last.pt", _model(), "dense")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    _one_line_error(lambda: load_checkpoint(path), str(path))


def test_garbage_file_is_reported(tmp_path: Path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 10)
    _one_line_error(lambda: load_checkpoint(path), "corrupt")


def test_raw_state_dict_points_to_from_timm(tmp_path: Path):
    path = tmp_path / "deit.pth"
    torch.save(prance.to_timm_state_dict(_model()), path)
    _one_line_error(lambda: load_checkpoint(path), "not a prance checkpoint", "from_timm", "--init timm:")
    torch.save({"model": prance.to_timm_state_dict(_model()), "epoch": 3}, path)  # DeiT's own layout
    _one_line_error(lambda: load_checkpoint(path), "from_timm")


def test_other_objects_are_not_prance_checkpoints(tmp_path: Path):
    path = tmp_path / "other.pt"
    torch.save({"hello": "world"}, path)
    _one_line_error(lambda: load_checkpoint(path), "not a prance checkpoint")


def test_newer_format_version_asks_to_upgrade(tmp_path: Path):
    ckpt = make_checkpoint(_model(), "dense")
    ckpt["format_version"] = ck.FORMAT_VERSION + 1
    path = atomic_save(ckpt, tmp_path / "future.pt")
    _one_line_error(lambda: load_checkpoint(path), "format version 2", "upgrade prance")


def test_wrong_kind_is_reported(tmp_path: Path):
    path = save_checkpoint(tmp_path / "dense.pt", _model(), "dense")
    _one_line_error(lambda: load_checkpoint(path, kind="selector"), "'dense'", "'selector'")
    assert load_checkpoint(path, kind=("meta", "dense"))["kind"] == "dense"


def test_unknown_kind_cannot_be_written(tmp_path: Path):
    _one_line_error(lambda: save_checkpoint(tmp_path / "x.pt", _model(), "teacher"), "unknown checkpoint kind")


def test_weights_that_do_not_match_the_config_are_reported(tmp_path: Path):
    ckpt = make_checkpoint(_model(), "dense")
    ckpt["model"]["head.weight"] = torch.zeros(10, 48)
    _one_line_error(lambda: model_from_checkpoint(ckpt), "head.weight", "(10, 48)")
    ckpt = make_checkpoint(_model(), "dense")
    del ckpt["model"]["norm.weight"]
    _one_line_error(lambda: model_from_checkpoint(ckpt), "norm.weight")
    ckpt = make_checkpoint(_model(), "dense")
    ckpt["config"]["colour"] = "blue"
    _one_line_error(lambda: model_from_checkpoint(ckpt), "colour")


def test_leftover_temporary_files_are_removed_by_the_next_save(tmp_path: Path):
    """A process killed mid-write leaves a hidden .tmp; the next successful save clears it."""
    from prance.training.checkpoint import atomic_save

    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"partial")
    other = tmp_path / ".best.pt.abc123.tmp"
    other.write_bytes(b"partial")
    atomic_save({"x": 1}, tmp_path / "last.pt")
    assert not stale.exists() and other.exists()
