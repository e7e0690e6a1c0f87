"""The settings of ``prance run``: schedules, YAML and flags, what follows from them, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from prance.cli import build_parser
from prance.cli.run import config_from_args
from prance.errors import PranceError
from prance.pipeline.config import RunConfig, stage_settings, to_yaml
from prance.pipeline.resolve import resolve_config
from prance.pipeline.schedules import DEMO
from tests.conftest import cli_error


def _from_flags(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", *argv]))


def test_the_default_is_the_full_recipe_of_the_headline_runs() -> None:
    cfg = _from_flags()
    assert (cfg.data, cfg.mode, cfg.budget, cfg.schedule, cfg.device) == ("fashion-mnist", "merge", 0.5, "full", "cpu")
    assert (cfg.dense.preset, cfg.dense.epochs, cfg.dense.lr, cfg.dense.warmup_epochs, cfg.dense.batch_size) == (
        "fmnist-tiny", 40, 1e-3, 2.0, 64)
    assert (cfg.meta.epochs, cfg.meta.min_keep, cfg.sweep.count, cfg.selector.updates) == (2, 0.25, 12, 300)
    assert cfg.finetune.epochs == cfg.static_finetune.epochs == 1 and cfg.bench.batch_sizes == [1, 64]


def test_a_yaml_config_equals_the_same_flags(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "mode": "prune_merge", "budget": 0.4, "schedule": "demo", "limit": 300, "seed": 3, "threads": 2,
        "dense": {"epochs": 4}, "meta": {"epochs": 2}, "selector": {"updates": 50}, "finetune": {"epochs": 2}}))
    by_file = _from_flags("--config", str(config))
    by_flags = _from_flags("--mode", "prune_merge", "--budget", "0.4", "--schedule", "demo", "--limit", "300",
                           "--seed", "3", "--threads", "2", "--dense-epochs", "4", "--meta-epochs", "2",
                           "--selector-updates", "50", "--finetune-epochs", "2")
    assert by_file == by_flags
    assert (by_file.dense.epochs, by_file.selector.updates, by_file.budget) == (4, 50, 0.4)
    # The written config.yaml is a config file that gives the same settings again.
    written = tmp_path / "config.yaml"
    written.write_text(to_yaml(by_flags))
    assert resolve_config(written) == by_flags


def test_flags_override_the_file_which_overrides_the_schedule(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"schedule": "demo", "selector": {"updates": 40}, "meta": {"lr": 1e-4}}))
    cfg = _from_flags("--config", str(config), "--selector-updates", "60")
    assert cfg.schedule == "demo" and cfg.selector.updates == 60 and cfg.meta.lr == 1e-4
    assert cfg.meta.max_steps == DEMO["meta"]["max_steps"] and cfg.dense.epochs == DEMO["dense"]["epochs"]
    assert _from_flags("--config", str(config), "--schedule", "full").meta.max_steps is None


def test_set_takes_any_setting_after_the_file_and_before_the_named_flags(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"selector": {"encoder": "keys", "updates": 50}, "budget": 0.4}))
    cfg = _from_flags("--config", str(config), "--set", "selector.encoder=cls", "--set", "bench.batch_sizes=[1, 8]",
                      "--set", "selector.mlp_per_stage=true", "--set", "budget=0.3", "--budget", "0.35")
    assert (cfg.selector.encoder, cfg.selector.updates, cfg.bench.batch_sizes) == ("cls", 50, [1, 8])
    assert cfg.selector.mlp_per_stage is True and cfg.budget == 0.35  # --budget is applied last
    assert cfg == resolve_config(config, {"selector": {"encoder": "cls", "mlp_per_stage": True},
                                          "bench.batch_sizes": [1, 8], "budget": 0.35})
    # --set can unset what the file set, and takes numbers as YAML 1.1 writes them.
    config.write_text(yaml.safe_dump({"meta": {"max_steps": 10}}))
    cfg = _from_flags("--config", str(config), "--set", "meta.max_steps=null", "--set", "dense.lr=1e-3")
    assert cfg.meta.max_steps is None and cfg.dense.lr == 0.001


def test_the_static_plan_fine_tune_follows_the_joint_one_unless_set(tmp_path: Path) -> None:
    cfg = _from_flags("--schedule", "demo", "--finetune-epochs", "3")
    joint, static = cfg.finetune, cfg.static_finetune
    assert (static.epochs, static.max_steps, static.batch_size, static.lr) == (3, joint.max_steps, joint.batch_size,
                                                                               joint.lr)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"static_finetune": {"epochs": 5}}))
    assert _from_flags("--config", str(config), "--finetune-epochs", "3").static_finetune.epochs == 5


def test_limit_caps_every_stages_image_counts() -> None:
    cfg = _from_flags("--schedule", "demo", "--limit", "500")
    assert cfg.dense.limit == cfg.meta.limit == cfg.selector.limit == cfg.finetune.limit == 500
    assert cfg.dense.val_limit == cfg.selector.holdout_limit == cfg.sweep.test_limit == cfg.evaluate.limit == 500
    assert _from_flags("--schedule", "demo", "--limit", "5000").selector.holdout_limit == DEMO["selector"][
        "holdout_limit"]  # already smaller


def test_settings_that_cannot_change_results_are_not_compared() -> None:
    from prance.pipeline.config import compared

    a, b = _from_flags(), _from_flags("--threads", "2", "--device", "cpu", "--data-dir", "/elsewhere")
    changed = {k for s in ("dense", "selector") for k, v in stage_settings(a, s).items()
               if stage_settings(b, s).get(k) != v}
    assert not {k for k in changed if compared(k)}
    assert not compared("dense.checkpoint_every") and compared("dense.epochs") and compared("budget")


@pytest.mark.parametrize("stage", ["dense", "meta", "finetune", "static_finetune"])
def test_a_stage_recorded_before_a_setting_existed_runs_with_the_value_it_had_then(stage: str, tmp_path: Path) -> None:
    """Runs recorded before the training stages' ``augment`` existed trained with augmentation: resuming them is
    no change, resuming them without it is."""
    from prance.pipeline.ledger import Ledger

    name = f"{stage}.augment"
    ledger = Ledger.read(tmp_path)
    ledger.start(stage, {k: v for k, v in stage_settings(_from_flags(), stage).items() if k != name})
    unaugmented = stage_settings(_from_flags("--set", f"{name}=false"), stage)
    assert ledger.changed(stage, stage_settings(_from_flags(), stage)) is None
    assert ledger.changed(stage, unaugmented) == name
    with pytest.raises(PranceError, match=f"{name}=true, now {name}=false"):
        ledger.check_unchanged({stage: unaugmented}, tmp_path / "config.yaml", stages=(stage,))


def test_a_static_finetune_recorded_before_the_slack_existed_chose_among_every_fitting_subnet(tmp_path: Path) -> None:
    """Its plan was chosen with no lower bound on its MACs (slack 1): today's default is a change, slack 1 is not."""
    from prance.pipeline.ledger import Ledger

    name = "static_finetune.static_slack"
    ledger = Ledger.read(tmp_path)
    ledger.start("static_finetune", {k: v for k, v in stage_settings(_from_flags(), "static_finetune").items()
                                     if k != name})
    assert ledger.changed("static_finetune", stage_settings(_from_flags(), "static_finetune")) == name
    assert ledger.changed("static_finetune",
                          stage_settings(_from_flags("--set", f"{name}=1.0"), "static_finetune")) is None


def test_a_folders_images_set_the_input_of_a_model_trained_from_scratch(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for name, size, mode in (("a", (24, 20), "L"), ("b", (24, 20), "L")):
            (tmp_path / "grey" / split / name).mkdir(parents=True)
            Image.new(mode, size).save(tmp_path / "grey" / split / name / "x.png")
            (tmp_path / "big" / split / name).mkdir(parents=True)
            Image.new("RGB", (300, 200)).save(tmp_path / "big" / split / name / "x.jpg")
    grey = _from_flags("--data", str(tmp_path / "grey"))
    assert (grey.data, grey.data_dir, grey.dense.img_size, grey.dense.model_overrides["in_chans"]) == (
        "folder", str(tmp_path / "grey"), 20, 1)
    big = _from_flags("--data", str(tmp_path / "big"))
    assert (big.dense.img_size, big.dense.model_overrides["in_chans"]) == (32, 3)  # capped: trained from scratch
    # A folder given as a setting (--set, or a config file's data: PATH) is read the same way as --data.
    assert _from_flags("--set", f"data={tmp_path / 'grey'}") == grey
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": str(tmp_path / "grey")}))
    assert _from_flags("--config", str(config)) == grey


@pytest.mark.parametrize("argv, fragments", [
    (["--restart-from", "nope"], ["argument --restart-from: invalid choice: 'nope'"]),
    (["--budget", "1.5"], ["budget 1.5 must be a fraction of the dense MACs in (0, 1]"]),
    (["--budget", "0"], ["budget 0.0 must be a fraction"]),
    (["--dense-epochs", "0"], ["dense.epochs must be at least 1, got 0"]),
    (["--data", "/no/such/folder"], ["data /no/such/folder", "ImageNet-layout folder"]),
    (["--set", "data=/no/such/folder"], ["data /no/such/folder", "ImageNet-layout folder", "no such folder"]),
    (["--init", "/no/such/deit.pth"], ["init /no/such/deit.pth: file not found"]),
    (["--schedule", "fast"], ["argument --schedule: invalid choice: 'fast'"]),
    (["--config", "/no/such.yaml"], ["--config /no/such.yaml: file not found"]),
    (["--set", "selector.encoder"], ["--set selector.encoder: give NAME=VALUE"]),
    (["--set", "selector.bogus=1"], ["unknown setting selector.bogus", "selector takes updates"]),
    (["--set", "dense.epochs=[1"], ["--set dense.epochs=[1: '[1' is not a YAML value"]),
    (["--set", "dense.epochs=two"], ["dense.epochs must be a whole number, got 'two'"]),
])
def test_bad_flags_are_one_line_errors_and_write_nothing(argv: list[str], fragments: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    cli_error(capsys, ["run", "--out", out, *argv], *fragments)
    assert not out.exists()


@pytest.mark.parametrize("text, fragments", [
    ("dense: {epoch: 3}", ["unknown setting dense.epoch", "dense takes preset, model_overrides"]),
    ("budgte: 0.5", ["unknown setting 'budgte'", "settings are data, data_dir"]),
    ("dense: {epochs: three}", ["dense.epochs must be a whole number, got 'three'"]),
    ("selector: {mlp_per_stage: 1}", ["selector.mlp_per_stage must be true or false, got 1"]),
    ("bench: {batch_sizes: 1}", ["bench.batch_sizes must be a list, got 1"]),
    ("dense: 3", ["dense must be a mapping of its settings"]),
    ("- a list", ["must be a mapping of settings"]),
    ("dense: {epochs: [", ["is not valid YAML"]),
    ("mode: fold", ["unknown mode 'fold'"]),
    ("selector: {encoder: pixels}", ["unknown selector.encoder 'pixels'"]),
    ("finetune: {distill_weight: 2}", ["--distill-weight 2.0 must be in [0, 1]"]),
])
def test_bad_config_files_are_one_line_errors(text: str, fragments: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    cli_error(capsys, ["run", "--config", config, "--out", tmp_path / "run"], *fragments)
    assert not (tmp_path / "run").exists()


def test_adapt_refuses_unknown_settings_before_running(tmp_path: Path) -> None:
    from prance import adapt

    with pytest.raises(PranceError, match="unknown setting 'epochs'"):
        adapt(None, "fashion-mnist", out=tmp_path / "run", epochs=3)
    with pytest.raises(PranceError, match="unknown setting dense.epoch;"):
        adapt(None, "fashion-mnist", out=tmp_path / "run", dense={"epoch": 3})
    assert not (tmp_path / "run").exists()


def test_a_selector_recorded_before_the_reward_setting_rewarded_outcomes(tmp_path: Path) -> None:
    from prance.pipeline.ledger import Ledger

    name = "selector.reward"
    ledger = Ledger.read(tmp_path)
    ledger.start("selector", {k: v for k, v in stage_settings(_from_flags(), "selector").items() if k != name})
    assert ledger.changed("selector", stage_settings(_from_flags("--set", f"{name}=outcome"), "selector")) is None
    assert ledger.changed("selector", stage_settings(_from_flags("--set", f"{name}=gain"), "selector")) == name
    assert ledger.changed("selector", stage_settings(_from_flags(), "selector")) == name  # today's default: gain
