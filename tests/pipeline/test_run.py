"""``prance run`` end to end on a slice of the real Fashion-MNIST: every stage's files, test-split results,
resuming an interrupted run to the same result, and refusing changed settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from prance.bench.methods import match_evit_keep, match_tome_r
from prance.cli import main
from prance.data.splits import final_test_set
from prance.pipeline.config import STAGES, stage_settings
from prance.pipeline.resolve import resolve_config
from prance.source import source_commit
from prance.training.checkpoint import load_checkpoint, model_from_checkpoint
from tests.conftest import cli_error
from tests.pipeline.conftest import LIMIT, copy_run, run_argv, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

FILES = {
    "dense": ["dense/best.pt", "dense/last.pt", "dense/log.jsonl"],
    "meta": ["meta/best.pt", "meta/log.jsonl"],
    "sweep": ["sweep/sweep.json", "sweep/sweep.csv", "sweep/sweep.png"],
    "selector": ["selector/adaptive.pt", "selector/last.pt", "selector/log.jsonl", "selector/curves.png"],
    "finetune": ["finetune/adaptive.pt", "finetune/log.jsonl"],
    "static_finetune": ["static_finetune/best.pt", "static_finetune/plan.yaml", "static_finetune/log.jsonl"],
    "round_up": ["round_up/round_up.json"],
    "evaluate": ["eval/prance.json", "eval/prance.csv", "eval/selector.json", "eval/selector.csv", "eval/dense.json",
                 "eval/static_finetune.json"],
    "bench": ["bench/bench.json", "bench/bench.png"],
    "report": ["report.md", "results.json"],
}
TIMING = ("seconds", "images_per_second")


@pytest.mark.slow
def test_every_stage_writes_its_files_and_the_results_come_from_the_test_split(finished_run: Path) -> None:
    for stage, files in FILES.items():
        for name in files:
            assert (finished_run / name).is_file(), f"{stage}: {name} missing"
    record = json.loads((finished_run / "stages.json").read_text())
    assert list(record) == list(STAGES) and all(r["status"] == "done" for r in record.values())
    assert all(r["commits"] == [c for c in [source_commit()] if c] for r in record.values())  # the source each stage ran at

    # Every training stage learned from the holdout of the dense run and no stage read the test split for choices.
    holdout = load_checkpoint(finished_run / "dense" / "best.pt")["split"]["holdout"]
    for name in ("meta/best.pt", "selector/adaptive.pt", "finetune/adaptive.pt", "static_finetune/best.pt"):
        assert load_checkpoint(finished_run / name)["split"]["holdout"] == holdout, name
    # The chain: meta from dense, selector of meta, fine-tunes of the selector's adaptive model, teacher dense.
    meta_args = load_checkpoint(finished_run / "meta" / "best.pt")["args"]["run"]
    assert Path(meta_args["init"]) == finished_run / "dense" / "best.pt" and meta_args["teacher"] == "init"
    assert meta_args["space"]["token_mode"] == "merge"
    selector_args = load_checkpoint(finished_run / "selector" / "adaptive.pt")["args"]
    assert Path(selector_args["meta"]) == finished_run / "meta" / "best.pt"
    joint_args = load_checkpoint(finished_run / "finetune" / "adaptive.pt")["args"]
    assert Path(joint_args["adaptive"]) == finished_run / "selector" / "adaptive.pt"
    assert Path(joint_args["teacher"]) == finished_run / "dense" / "best.pt"

    # The evaluations are of the test split: the labels, image by image, are the test split's (same slice).
    test = final_test_set("fashion-mnist", img_size=28, in_chans=1, limit=LIMIT, seed=0)
    labels = [int(test[i][1]) for i in range(len(test))]
    prance = json.loads((finished_run / "eval" / "prance.json").read_text())
    assert prance["split"] == "test" and [r["label"] for r in prance["images"]] == labels
    assert [r["index"] for r in prance["images"]] == test.indices.tolist()  # each image's place in the split
    assert prance["summary"]["top1"] == pytest.approx(
        100.0 * sum(r["label"] == r["prediction"] for r in prance["images"]) / len(labels))
    for name in ("dense", "static_finetune", "selector"):
        result = json.loads((finished_run / "eval" / f"{name}.json").read_text())
        assert result["split"] == "test"
        assert [r["images"] for r in result.get("rows", [result.get("summary")])] == [LIMIT] * len(
            result.get("rows", [0]))
    # EViT and ToMe ran at the settings whose MACs come closest to PRANCE's mean MACs on the holdout (a choice
    # made on the test images would not be one made on the holdout).
    dense = json.loads((finished_run / "eval" / "dense.json").read_text())
    model = model_from_checkpoint(load_checkpoint(finished_run / "dense" / "best.pt"))
    target = load_checkpoint(prance["checkpoint"])["calibration"]["holdout_macs_ratio"]
    assert target != prance["summary"]["macs_ratio"]
    assert [r["plan_name"] for r in dense["rows"]] == [
        "max", f"evit:{match_evit_keep(model, target)}", f"tome:{match_tome_r(model, target)}"]
    sweep = json.loads((finished_run / "sweep" / "sweep.json").read_text())
    assert sweep["test_images"] == LIMIT and all("test_top1_dense" in r for r in sweep["rows"])
    # The bench's static subnet is the static-plan fine-tune's plan, so that baseline's row carries a speed.
    bench = json.loads((finished_run / "bench" / "bench.json").read_text())
    timed = bench["meta"]["methods"]["static-subnet"]
    plan = yaml.safe_load((finished_run / "static_finetune" / "plan.yaml").read_text())
    assert timed["source"] == f"plan {plan.pop('name')!r} from {finished_run / 'static_finetune' / 'plan.yaml'}"
    assert timed["plan"] == plan


@pytest.mark.slow
def test_config_yaml_round_trips(finished_run: Path, tmp_path: Path) -> None:
    written = finished_run / "config.yaml"
    again = resolve_config(written)
    assert yaml.safe_load(written.read_text()) == again.to_dict()
    original = resolve_config(tiny_config(tmp_path), {"schedule": "demo", "limit": LIMIT, "threads": 1})
    assert again == original
    record = json.loads((finished_run / "stages.json").read_text())
    assert all(record[s]["settings"] == json.loads(json.dumps(stage_settings(again, s))) for s in STAGES)


def _same_adaptive(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["selector"]["state"], cb["selector"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ca["calibration"] == cb["calibration"]


def _without_timing(result: dict) -> dict:
    rows = result.get("rows", [])
    return {**{k: v for k, v in result.items() if k not in ("rows", "summary", "checkpoint")},
            "rows": [{k: v for k, v in r.items() if k not in TIMING} for r in rows],
            "summary": {k: v for k, v in (result.get("summary") or {}).items() if k not in TIMING}}


@pytest.mark.slow
def test_an_interrupted_run_continues_to_where_an_uninterrupted_run_ends(
        finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import prance.training.finetune as finetune_module
    import prance.training.meta as meta_module

    run = copy_run(finished_run, tmp_path / "run", stages=("dense",))
    argv = run_argv(tiny_config(tmp_path), run)
    real_meta, real_finetune = meta_module.run_train_meta, finetune_module.run_finetune

    def meta_stops(*args, **kwargs):  # Ctrl-C once last.pt of step 2 is written
        real_meta(*args, **kwargs, stop_after=2)
        raise KeyboardInterrupt

    def joint_stops(adaptive, cfg, *args, **kwargs):
        real_finetune(adaptive, cfg, *args, **kwargs, stop_after=None if cfg.static_plan else 2)
        if cfg.static_plan is None:
            raise KeyboardInterrupt

    monkeypatch.setattr(meta_module, "run_train_meta", meta_stops)
    assert main(argv) == 2
    assert "interrupted; run the same command again to continue" in capsys.readouterr().err
    assert json.loads((run / "stages.json").read_text())["meta"]["status"] == "running"
    assert load_checkpoint(run / "meta" / "last.pt")["train_state"]["step"] == 2
    monkeypatch.setattr(meta_module, "run_train_meta", real_meta)
    monkeypatch.setattr(finetune_module, "run_finetune", joint_stops)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "== stage 2/10 meta: the meta-network (sandwich rule, distilled from dense) (continuing" in out
    assert "interrupted; run the same command again" in err, err
    record = json.loads((run / "stages.json").read_text())
    assert [s for s in STAGES if record.get(s, {}).get("status") == "done"] == ["dense", "meta", "sweep", "selector"]
    assert record["finetune"]["status"] == "running"
    monkeypatch.setattr(finetune_module, "run_finetune", real_finetune)
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "== stage 1/10 dense: done already" in log and "== stage 5/10 finetune: joint fine-tuning (continuing" in log

    ma, mb = (load_checkpoint(r / "meta" / "best.pt")["model"] for r in (run, finished_run))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    for name in ("selector/adaptive.pt", "finetune/adaptive.pt"):
        _same_adaptive(run / name, finished_run / name)
    for name in ("prance", "selector", "dense", "static_finetune"):
        a = json.loads((run / "eval" / f"{name}.json").read_text())
        b = json.loads((finished_run / "eval" / f"{name}.json").read_text())
        assert _without_timing(a) == _without_timing(b), name
        if "images" in a:
            assert a["images"] == b["images"], name  # every image's decisions


def test_a_changed_setting_is_refused_naming_the_stage_and_the_setting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    cfg = resolve_config(config, {"schedule": "demo", "limit": LIMIT})
    run.mkdir()
    record = {s: {"settings": stage_settings(cfg, s), "status": "done", "seconds": 1.0, "finished": None}
              for s in STAGES[:5]}
    (run / "stages.json").write_text(json.dumps(record))
    before = (run / "stages.json").read_text()
    cli_error(capsys, run_argv(config, run, "--selector-updates", "5"), "stage selector",
                    "selector.updates=3, now selector.updates=5", "--restart-from selector", "new --out",
                    f"--config {run / 'config.yaml'}")
    cli_error(capsys, run_argv(config, run, "--budget", "0.4"), "stage sweep", "budget=0.5, now budget=0.4",
              "--restart-from sweep")
    cli_error(capsys, run_argv(config, run, "--seed", "1"), "stage dense", "seed=0, now seed=1")
    cli_error(capsys, run_argv(config, run, "--mode", "prune"), "stage meta", "mode=\"merge\", now mode=\"prune\"")
    assert (run / "stages.json").read_text() == before and sorted(p.name for p in run.iterdir()) == ["stages.json"]


@pytest.mark.slow
def test_where_it_runs_may_change_and_restart_from_redoes_only_that_stage_and_later(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmnist_dir: str) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    config = tiny_config(tmp_path)
    # Threads, device and where the data lives cannot change results: everything is done already.
    assert main(run_argv(config, run, "--threads", "2", "--device", "cpu", "--data-dir", fmnist_dir)) == 0
    assert capsys.readouterr().out.count("done already") == len(STAGES)

    kept = {name: (run / name).read_bytes() for name in ("dense/best.pt", "selector/adaptive.pt",
                                                         "eval/prance.json")}
    (run / "bench" / "stale.txt").write_text("from the old bench")
    override = tmp_path / "more.yaml"
    override.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()),
                                        "bench": {"batch_sizes": [2], "runs": 3, "warmup": 1, "rounds": 1, "pool": 4}}))
    assert main(run_argv(override, run, "--restart-from", "bench")) == 0
    out = capsys.readouterr().out
    assert out.count("done already") == STAGES.index("bench") and "== stage 9/10 bench: " in out
    assert all((run / name).read_bytes() == data for name, data in kept.items())
    assert not (run / "bench" / "stale.txt").exists()
    bench = json.loads((run / "bench" / "bench.json").read_text())
    assert {r["batch_size"] for r in bench["rows"]} == {2} and bench["meta"]["runs"] == 3
    assert json.loads((run / "stages.json").read_text())["bench"]["settings"]["bench.runs"] == 3


def test_a_stage_recorded_done_without_its_files_is_refused(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(finished_run, tmp_path / "run")
    (run / "sweep" / "sweep.json").unlink()
    cli_error(capsys, run_argv(tiny_config(tmp_path), run), "stage sweep is recorded done but sweep/sweep.json is "
              "missing", "--restart-from sweep")


@pytest.mark.slow
def test_reuse_copies_the_leading_stages_done_with_the_same_settings_and_runs_the_rest(
        finished_run: Path, budget_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path)
    run, out = copy_run(budget_run[0], tmp_path / "budget-0.6"), budget_run[1]
    # The budget changes the sweep's choice and everything after it: dense and meta are taken, the rest runs.
    assert f"== reusing dense, meta of {finished_run} (done there with these settings); not the rest: stage sweep " \
           "ran there with another budget" in out and out.count("done already") == 2
    for name in ("dense/best.pt", "meta/best.pt", "meta/log.jsonl"):
        assert (run / name).read_bytes() == (finished_run / name).read_bytes(), name
    record = json.loads((run / "stages.json").read_text())
    assert [s for s in STAGES if "reused_from" in record[s]] == ["dense", "meta"]
    assert record["meta"]["reused_from"] == str(finished_run) and record["sweep"]["settings"]["budget"] == 0.6
    selector = load_checkpoint(run / "selector" / "adaptive.pt")
    assert selector["budget"] == 0.6 and Path(selector["args"]["meta"]) == budget_run[0] / "meta" / "best.pt"
    report = (run / "report.md").read_text()  # the stage table says where a reused stage ran and when
    assert f"| meta | done in {finished_run} (reused) | {record['meta']['seconds']:.0f} | " in report

    # Running it again skips everything; a folder that is no run is refused before anything is written.
    assert main(run_argv(config, run, "--budget", "0.6", "--reuse", str(finished_run))) == 0
    out = capsys.readouterr().out
    assert out.count("done already") == len(STAGES) and "nothing to reuse" in out
    cli_error(capsys, run_argv(config, tmp_path / "new", "--reuse", str(tmp_path / "nothing")),
              "--reuse", "not a prance run folder", "stages.json")
    cli_error(capsys, run_argv(config, run, "--budget", "0.6", "--reuse", str(run)), "this run's own folder")
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_the_round_up_lever_makes_the_rounded_model_prance_for_evaluation_bench_and_report(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--set round_up.k=2 on a finished run's stages: everything up to the fine-tunes is reused, the rounded
    model is written, and evaluation, bench and report are of it (at most 2 distinct decisions per stage)."""
    run = tmp_path / "k2"
    argv = run_argv(tiny_config(tmp_path), run, "--set", "round_up.k=2", "--reuse", str(finished_run))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== reusing dense, meta, sweep, selector, finetune, static_finetune of" in out
    assert "not the rest: stage round_up ran there with another round_up.k" in out
    rounded = load_checkpoint(run / "round_up" / "adaptive.pt")
    assert rounded["calibration"]["round_up"] == 2 and rounded["args"]["round_up"] == 2
    assert Path(rounded["args"]["adaptive"]) == run / "finetune" / "adaptive.pt"
    assert json.loads((run / "round_up" / "round_up.json").read_text())["model"] == "round_up/adaptive.pt"

    prance = json.loads((run / "eval" / "prance.json").read_text())
    assert Path(prance["checkpoint"]) == run / "round_up" / "adaptive.pt"
    depth = load_checkpoint(run / "dense" / "best.pt")["config"]["stage_depth"]
    for stage in range(1, 3):  # the decided stages of the micro model
        blocks = slice(stage * depth, (stage + 1) * depth)
        decisions = {(r["widths"][stage], *r["mlp_ratios"][blocks], *r["heads"][blocks], r["keep"][stage],
                      r["merge_keep"][stage]) for r in prance["images"]}
        assert len(decisions) <= 2, (stage, decisions)
    bench = json.loads((run / "bench" / "bench.json").read_text())
    assert f"--checkpoint {run / 'round_up' / 'adaptive.pt'} " in bench["meta"]["command"]
    results = json.loads((run / "results.json").read_text())
    row = next(r for r in results["rows"] if r["key"] == "prance")
    assert "round_up/adaptive.pt" in row["source"] and row["speed"]  # timed: the lever's point
    assert any(n.startswith("speed: bench timed the evaluated decisions") for n in row["notes"])
    same = rounded["calibration"]["without_round_up"]["same_images"]
    assert (f"Without rounding decisions up to K = 2 representatives, on the same images: mean "
            f"{same['holdout_macs_ratio']:.4f} of dense MACs at holdout top-1 {same['holdout_top1']:.2f} %."
            in (run / "report.md").read_text())
    # The source run (the default, K = 4) was left as it was.
    assert load_checkpoint(finished_run / "round_up" / "adaptive.pt")["calibration"]["round_up"] == 4

    # The rounded model is one of the stage's outputs: without it the stage is not done.
    (run / "round_up" / "adaptive.pt").unlink()
    cli_error(capsys, argv, "stage round_up is recorded done but round_up/adaptive.pt is missing",
              "--restart-from round_up")


@pytest.mark.slow
def test_a_stage_new_to_an_old_run_folder_runs_and_every_later_stage_runs_again(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run folder written before the round_up stage existed (no record of it), continued with the lever on:
    evaluation, bench and report were recorded done, but of the model before rounding, so they run again."""
    run = copy_run(finished_run, tmp_path / "old")
    record = json.loads((run / "stages.json").read_text())
    del record["round_up"]
    (run / "stages.json").write_text(json.dumps(record))
    shutil.rmtree(run / "round_up")
    before = (run / "eval" / "prance.json").read_text()
    assert main(run_argv(tiny_config(tmp_path), run, "--set", "round_up.k=2")) == 0
    out = capsys.readouterr().out
    assert out.count("done already") == STAGES.index("round_up")
    assert "== an earlier stage ran now, so evaluate, bench, report run again" in out
    prance = json.loads((run / "eval" / "prance.json").read_text())
    assert json.loads(before)["calibration"]["round_up"] == 4 and prance["calibration"]["round_up"] == 2
    assert Path(prance["checkpoint"]) == run / "round_up" / "adaptive.pt"
    assert list(json.loads((run / "stages.json").read_text())) == list(STAGES)


def test_reuse_takes_nothing_after_a_stage_this_run_did_itself(
        finished_run: Path, budget_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The budget run's meta-network learned from finished_run's dense model: a run that trained its own dense
    model (same settings, other weights could follow on another machine) must not take that meta-network."""
    config = tiny_config(tmp_path)
    run = copy_run(finished_run, tmp_path / "own", stages=("dense",))
    record = json.loads((run / "stages.json").read_text())
    assert "reused_from" not in record["dense"]
    # The reuse decision alone (a whole run would go on to train its own meta-network).
    from prance.pipeline.ledger import Ledger
    from prance.pipeline.run import _reuse
    from prance.pipeline.stages import Context

    cfg = resolve_config(config, {"schedule": "demo", "limit": LIMIT, "budget": 0.6})
    settings = {s: stage_settings(cfg, s) for s in STAGES}
    taken, why = _reuse(Context(cfg, run), budget_run[0], Ledger.read(run), settings, set())
    assert taken == [] and why == "this run did stage dense itself, and the later stages there did not start from it"
    assert not (run / "meta").exists() and json.loads((run / "stages.json").read_text()) == record
