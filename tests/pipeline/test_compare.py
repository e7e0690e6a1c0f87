"""``prance compare``: several run folders in one table, every number read back from each run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prance.cli import main
from prance.evaluation.compare import compare_runs
from prance.source import short, source_commit
from tests.conftest import cli_error


@pytest.mark.slow
def test_the_table_holds_each_runs_own_numbers_and_speed_ups_over_its_own_dense(
        finished_run: Path, budget_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = [finished_run, budget_run[0]]
    comparison = compare_runs(runs)
    assert comparison["runs"] == [str(r) for r in runs] and comparison["split"] == "test"
    for run, budget in zip(runs, (0.5, 0.6)):
        rows = {r["key"]: r for r in comparison["rows"] if r["run"] == str(run)}
        assert {r["budget"] for r in rows.values()} == {budget} and {r["mode"] for r in rows.values()} == {"merge"}
        prance = json.loads((run / "eval" / "prance.json").read_text())["summary"]
        assert rows["prance"]["top1"] == prance["top1"] and rows["prance"]["macs_ratio"] == pytest.approx(
            prance["macs_ratio"], rel=1e-3)
        bench = json.loads((run / "bench" / "bench.json").read_text())["rows"]
        speed = {(r["method"], str(r["batch_size"])): r["images_per_s"] for r in bench}
        # The static-plan fine-tune's plan is the one bench timed as its static subnet, so it has a speed; PRANCE
        # has one as bench timed images the evaluation of the 200-image slice holds, with the same decisions.
        timed = {"dense": "dense-timm", "static_finetune": "static-subnet", "evit": "evit", "tome": "tome",
                 "prance": "prance"}
        assert {k for k, r in rows.items() if r["speedup"]} == set(timed)
        for key, r in rows.items():
            for b, value in r["speedup"].items():
                assert value == pytest.approx(speed[timed[key], b] / speed["dense-timm", b]), (key, b)
            assert set(r["speedup"]) in (set(), {"1", "4"})

    out = tmp_path / "cmp"
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    text = (out / "comparison.md").read_text()
    assert capsys.readouterr().out.startswith(text)
    labels = ["finished0/run", "budget0/run"]  # both folders are called run: named by their paths
    assert [r["label"] for r in comparison["rows"]] == [labels[runs.index(Path(r["run"]))] for r in comparison["rows"]]
    assert sum(line.startswith(f"| {label} | merge |") for line in text.splitlines()
               for label in labels) == len(comparison["rows"])
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "comparison.json").read_text())["rows"] == comparison["rows"]
    # Each run names the source its stages ran at; the table's own commit is only the one that drew it.
    for label in labels:
        assert f"- `{label}`: `{short(source_commit())}`" in text.split("## Sources")[1]


@pytest.mark.slow
def test_an_adaptive_models_evaluation_file_adds_one_row_with_its_own_numbers(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evaluation = tmp_path / "range" / "test-0.5.json"
    assert main(["evaluate", "--checkpoint", str(finished_run / "finetune" / "adaptive.pt"), "--limit", "50",
                 "--out", str(evaluation)]) == 0
    result = json.loads(evaluation.read_text())
    out = tmp_path / "cmp"
    assert main(["compare", str(finished_run), "--evaluation", str(evaluation), "--out", str(out)]) == 0
    capsys.readouterr()
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    row = rows[-1]
    assert [r["run"] for r in rows].count(str(evaluation.resolve())) == 1
    assert row["label"] == "range/test-0.5" and row["budget"] == 0.5 and row["speedup"] == {}
    assert row["top1"] == result["summary"]["top1"] and row["images"] == 50
    assert row["macs_ratio"] == pytest.approx(result["summary"]["macs_ratio"])
    assert row["token_fraction_last"] == pytest.approx(result["summary"]["token_fractions"][-1])
    assert "| range/test-0.5 | — | 0.5 | adaptive model |" in (out / "comparison.md").read_text()

    ranged = tmp_path / "range" / "test-0.35.json"  # a selector of a budget range is named by its range
    ranged.write_text(json.dumps({**result, "budget_range": [0.3, 0.8], "budget": 0.35}))
    capsys.readouterr()
    assert main(["compare", str(finished_run), "--evaluation", str(ranged), "--out", str(out)]) == 0
    assert "| range/test-0.35 | — | 0.35 | budget-range selector 0.3-0.8 |" in capsys.readouterr().out

    holdout = tmp_path / "holdout.json"
    holdout.write_text(json.dumps({**result, "split": "holdout"}))
    cli_error(capsys, ["compare", str(finished_run), "--evaluation", str(holdout), "--out", str(tmp_path / "c2")],
              "holdout split", "--split test")
    cli_error(capsys, ["compare", str(finished_run), "--evaluation", str(finished_run / "eval" / "dense.json"),
                       "--out", str(tmp_path / "c2")], "not an adaptive model's evaluation")
    assert not (tmp_path / "c2").exists()


@pytest.mark.slow
def test_a_bench_of_the_evaluated_model_gives_its_row_speed_ups_and_any_other_bench_is_refused(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(finished_run / "finetune" / "adaptive.pt")
    evaluation, bench = tmp_path / "range" / "test-0.5.json", tmp_path / "bench"
    assert main(["evaluate", "--checkpoint", model, "--limit", "50", "--out", str(evaluation)]) == 0
    assert main(["bench", "--checkpoint", model, "--methods", "dense-timm,prance", "--batch-sizes", "1,4",
                 "--runs", "2", "--warmup", "1", "--rounds", "1", "--pool", "8", "--threads", "1",
                 "--out", str(bench)]) == 0
    capsys.readouterr()
    timed = json.loads((bench / "bench.json").read_text())
    speed = {(r["method"], str(r["batch_size"])): r["images_per_s"] for r in timed["rows"]}
    comparison = compare_runs([finished_run], [evaluation], [bench / "bench.json"])
    row = comparison["rows"][-1]
    assert row["label"] == "range/test-0.5"
    assert row["speedup"] == {b: pytest.approx(speed["prance", b] / speed["dense-timm", b]) for b in ("1", "4")}
    out = tmp_path / "cmp"
    assert main(["compare", str(finished_run), "--evaluation", str(evaluation), "--bench", str(bench / "bench.json"),
                 "--out", str(out)]) == 0
    assert json.loads((out / "comparison.json").read_text())["rows"][-1]["speedup"] == row["speedup"]

    # Decisions that cost other MACs on one shared image are another model's: refused, as are a second bench of
    # the same model and a file that is no bench.
    other = tmp_path / "other.json"
    macs = list(timed["meta"]["selector"]["macs"])
    macs[0] += 1
    other.write_text(json.dumps({**timed, "meta": {**timed["meta"], "selector": {**timed["meta"]["selector"],
                                                                                   "macs": macs}}}))
    for extra, message in (([str(other)], "did not time any --evaluation's model"),
                           ([str(bench / "bench.json")] * 2, "already has a bench"),
                           ([str(evaluation)], "not a bench.json")):
        argv = ["compare", str(finished_run), "--evaluation", str(evaluation), "--out", str(tmp_path / "c2")]
        cli_error(capsys, argv + [a for b in extra for a in ("--bench", b)], message)
    assert not (tmp_path / "c2").exists()


def test_bad_run_folders_are_one_line_errors_and_leave_no_output(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    cli_error(capsys, ["compare", str(tmp_path / "empty"), "--out", str(tmp_path / "cmp")], "not a prance run folder")
    cli_error(capsys, ["compare", str(finished_run), str(finished_run), "--out", str(tmp_path / "cmp")],
              "given twice")
    assert not (tmp_path / "cmp").exists()
