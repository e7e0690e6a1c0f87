"""``prance report``: a run folder's report is its own files' numbers, with figures, and says what has not run.

The run folder is real: a micro meta-network and selector (random weights, as in the fine-tuning
tests), fine-tuned, swept, evaluated and benchmarked by the real commands on small slices of
Fashion-MNIST. Every number of the report is checked against the file it came from, read here
independently.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from prance import create_model
from prance.adaptive import AdaptiveViT
from prance.cli import main
from prance.config import SearchSpace
from prance.data import FASHION_MNIST_CLASSES
from prance.evaluation.report import best_static_subnet, verdict, write_report
from prance.plan import Plan
from prance.selector.selector import Selector, SelectorConfig
from prance.source import EDITED
from prance.training.checkpoint import save_checkpoint
from tests.conftest import REPO, cli_error

pytestmark = pytest.mark.usefixtures("one_thread")

#: 3 stages of 2 blocks (decisions before stages 1 and 2), as in the fine-tuning tests.
MICRO = dict(embed_dim=32, depth=6, num_heads=2, stage_depth=2)
SPLIT = {"data": "fashion-mnist", "holdout": {"fraction": 0.1, "seed": 0}, "classes": list(FASHION_MNIST_CLASSES)}
BUDGET = 0.6


def _cli(*argv: object) -> None:
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: str) -> Path:
    """A complete run folder of the layout `prance run` writes, from real commands on small slices."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report") / "run"
    for stage in ("dense", "meta", "selector", "eval"):
        (root / stage).mkdir(parents=True)
    torch.manual_seed(0)
    save_checkpoint(root / "dense/best.pt", create_model("fmnist-micro", **MICRO), "dense", split=SPLIT)
    model = create_model("fmnist-micro", **MICRO)
    model.space = SearchSpace(widths=(16, 24, 32), mlp_ratios=(2.0, 4.0), heads=(2,), token_mode="merge",
                              min_keep=0.25)
    save_checkpoint(root / "meta/best.pt", model, "meta", split=SPLIT)
    selector = Selector(model.config, model.space, SelectorConfig(hidden=16, budget=BUDGET))
    AdaptiveViT(model, selector, BUDGET, split=SPLIT).save(root / "selector/adaptive.pt")
    small = ("--epochs", 1, "--limit", 32, "--holdout-limit", 32, "--batch-size", 16, "--warmup-steps", 1)
    _cli("finetune", "--adaptive", root / "selector/adaptive.pt", "--teacher", root / "dense/best.pt", *small,
         "--out", root / "finetune")
    _cli("finetune", "--adaptive", root / "selector/adaptive.pt", "--teacher", root / "dense/best.pt", *small,
         "--static-plan", "auto", "--static-candidates", 4, "--out", root / "static_finetune")
    _cli("sweep", "--checkpoint", root / "meta/best.pt", "--count", 6, "--holdout-limit", 64, "--test-limit", 128,
         "--out", root / "sweep")
    _cli("evaluate", "--checkpoint", root / "finetune/adaptive.pt", "--out", root / "eval/prance.json")  # all 10k
    _cli("evaluate", "--checkpoint", root / "selector/adaptive.pt", "--limit", 256, "--out",
         root / "eval/selector.json")
    _cli("evaluate", "--checkpoint", root / "dense/best.pt", "--baseline", "evit:0.5", "--baseline", "tome:2",
         "--limit", 256, "--out", root / "eval/dense.json")
    _cli("evaluate", "--checkpoint", root / "static_finetune/best.pt", "--plan", root / "static_finetune/plan.yaml",
         "--limit", 256, "--out", root / "eval/static_finetune.json")
    _cli("bench", "--checkpoint", root / "finetune/adaptive.pt", "--batch-sizes", "1,4", "--runs", 2, "--warmup", 1,
         "--rounds", 1, "--pool", 4, "--threads", 1, "--methods", "dense-timm,evit,tome,static-subnet,prance",
         "--static-plan", root / "static_finetune/plan.yaml", "--out", root / "bench")
    torch.set_num_threads(threads)
    return root


@pytest.fixture(scope="module")
def report(run: Path) -> dict:
    """The report written once; results.json parsed."""
    before = hashlib.sha256((run / "eval/prance.json").read_bytes()).hexdigest()
    assert write_report(run, overlays=4) == run / "report.md"
    assert hashlib.sha256((run / "eval/prance.json").read_bytes()).hexdigest() == before  # inputs untouched
    return json.loads((run / "results.json").read_text())


def _load(run: Path, rel: str) -> dict:
    return json.loads((run / rel).read_text())


def _speed(bench: dict, method: str) -> dict:
    return {str(r["batch_size"]): (r["images_per_s"], r["ms_median"]) for r in bench["rows"] if r["method"] == method}


# ----------------------------------------------------------------------------- the numbers
def test_every_headline_number_is_the_one_its_file_holds(run: Path, report: dict) -> None:
    dense_eval, bench = _load(run, "eval/dense.json"), _load(run, "bench/bench.json")
    dense = next(r for r in dense_eval["rows"] if r["plan_name"] == "max")
    want = {"dense": (dense, "dense-timm"), "prance": (_load(run, "eval/prance.json")["summary"], "prance"),
            "selector": (_load(run, "eval/selector.json")["summary"], None),
            "static_finetune": (_load(run, "eval/static_finetune.json")["rows"][0], "static-subnet"),
            "evit": (dense_eval["rows"][1], "evit"), "tome": (dense_eval["rows"][2], "tome")}
    rows = {r["key"]: r for r in report["rows"]}
    assert set(rows) == set(want) | {"best_static"}
    for key, (source, timed) in want.items():
        row = rows[key]
        assert row["status"] == "done" and row["top1"] == source["top1"], key
        assert row["gmacs"] == pytest.approx(source["macs"] / 1e9, rel=1e-12)
        assert row["macs_ratio"] == pytest.approx(source["macs"] / dense["macs"], rel=1e-12)
        assert row["params_m"] == source["params_m"] and row["token_fraction_last"] == source["token_fractions"][-1]
        got = {b: (s["images_per_s"], s["ms"]) for b, s in row["speed"].items()}
        assert got == (_speed(bench, timed) if timed else {}), key
        assert set(got) == ({"1", "4"} if timed else set())
    # the static-plan fine-tune's speed is the bench's static subnet's because bench timed its plan
    static_plan = _load(run, "eval/static_finetune.json")["rows"][0]["plan"]
    assert bench["meta"]["methods"]["static-subnet"]["plan"] == static_plan
    text = (run / "report.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| PRANCE |"))
    prance = want["prance"][0]
    for cell in (f"{prance['top1']:.2f}", f"{prance['macs'] / 1e9:.4f}", f"{prance['params_m']:.3f}",
                 f"{_speed(bench, 'prance')['4'][0]:.1f}"):
        assert f"| {cell} |" in line, (cell, line)


def test_prance_speed_is_shown_only_if_bench_timed_the_evaluated_models_decisions(run: Path, report: dict,
                                                                                   tmp_path: Path) -> None:
    prance = next(r for r in report["rows"] if r["key"] == "prance")
    assert "the MACs of the 4 of its 4 test images that eval/prance.json covers agree" in " ".join(prance["notes"])
    other = tmp_path / "run"
    shutil.copytree(run / "eval", other / "eval")
    bench = _load(run, "bench/bench.json")
    bench["meta"]["selector"]["macs"][2] += 1  # one pooled image decided differently: another model was timed
    (other / "bench").mkdir()
    (other / "bench/bench.json").write_text(json.dumps(bench))
    write_report(other, overlays=0)
    row = next(r for r in json.loads((other / "results.json").read_text())["rows"] if r["key"] == "prance")
    assert row["speed"] == {} and "other MACs than eval/prance.json's on 1 of the 4 test images" in row["notes"][0]
    assert next(r for r in json.loads((other / "results.json").read_text())["rows"] if r["key"] == "evit")["speed"]
    # An evaluation of other test images cannot vouch for the bench: no speed either.
    evaluated = _load(run, "eval/prance.json")
    timed = set(bench["meta"]["image_indices"])
    evaluated["images"] = [r for r in evaluated["images"] if r["index"] not in timed]
    (other / "eval/prance.json").write_text(json.dumps(evaluated))
    (other / "bench/bench.json").write_text(json.dumps(_load(run, "bench/bench.json")))
    write_report(other, overlays=0)
    row = next(r for r in json.loads((other / "results.json").read_text())["rows"] if r["key"] == "prance")
    assert row["speed"] == {} and "none of the test images bench timed" in row["notes"][0]


def test_the_best_static_subnet_is_the_sweeps_best_on_the_holdout_within_prances_macs(run: Path, report: dict) -> None:
    sweep, prance = _load(run, "sweep/sweep.json"), _load(run, "eval/prance.json")["summary"]
    fitting = [r for r in sweep["rows"] if r["macs"] <= prance["macs"]]
    assert fitting, "the micro sweep should hold a subnet within PRANCE's MACs"
    best = sorted(fitting, key=lambda r: (-r["holdout_top1"], r["macs"]))[0]
    row = next(r for r in report["rows"] if r["key"] == "best_static")
    assert row["method"] == f"best static subnet ({best['name']})" and row["top1"] == best["test_top1"]
    assert row["gmacs"] == pytest.approx(best["macs"] / 1e9) and row["params_m"] == best["params_m"]
    assert report["static_choice"]["fitting"] == len(fitting)
    # tokens after the last stage, counted on a real forward pass of the plan (not the accounting formula)
    model = create_model("fmnist-micro", **MICRO)
    model.space = SearchSpace(widths=(16, 24, 32), mlp_ratios=(2.0, 4.0), heads=(2,), token_mode="merge",
                              min_keep=0.25)
    trace: list = []
    model(torch.randn(1, 1, 28, 28), Plan.from_dict(model.config, best["plan"]), mode="masked", trace=trace)
    assert len(trace) == model.config.num_stages
    assert row["token_fraction_last"] == pytest.approx(int(trace[-1].num_patches()[0]) / model.config.num_patches)


def test_best_static_subnet_is_chosen_on_holdout_never_on_test_and_within_the_macs() -> None:
    rows = [{"name": "dear", "macs": 11.0, "holdout_top1": 99.0, "test_top1": 99.0},
            {"name": "lucky-on-test", "macs": 5.0, "holdout_top1": 80.0, "test_top1": 95.0},
            {"name": "best-on-holdout", "macs": 9.0, "holdout_top1": 90.0, "test_top1": 85.0},
            {"name": "tie-but-cheaper", "macs": 8.0, "holdout_top1": 90.0, "test_top1": 84.0}]
    best, fitting = best_static_subnet(rows, max_macs=10.0)
    assert best["name"] == "tie-but-cheaper" and fitting == 3
    assert best_static_subnet(rows, max_macs=1.0) == (None, 0)


def test_the_verdict_says_by_how_much_prance_wins_or_that_it_does_not() -> None:
    def row(key: str, top1: float, gmacs: float) -> dict:
        return {"key": key, "top1": top1, "gmacs": gmacs, "images": 10000, "status": "done"}

    v = verdict([row("prance", 90.0, 0.05), row("best_static", 88.0, 0.05), row("static_finetune", 90.5, 0.045)])
    assert "PRANCE beats the best static subnet by +2.00 points" in v["text"]
    assert "PRANCE does not beat the static-plan fine-tune (-0.50 points)" in v["text"]
    se = 100 * math.sqrt(0.9 * 0.1 / 10000 + 0.88 * 0.12 / 10000)  # two independent binomial proportions
    assert v["comparisons"]["best_static"]["standard_error"] == pytest.approx(se)
    assert not v["comparisons"]["best_static"]["within_noise"] and v["comparisons"]["static_finetune"]["within_noise"]
    assert v["comparisons"]["static_finetune"]["macs_ratio_to_prance"] == pytest.approx(0.9)
    assert verdict([row("best_static", 88.0, 0.05)])["text"].startswith("No verdict yet")


def test_decisions_by_class_are_the_per_image_records_grouped_by_label(run: Path, report: dict) -> None:
    images = _load(run, "eval/prance.json")["images"]  # the JSON records; the report read the CSV
    classes = report["decisions_by_class"]
    assert sum(c["images"] for c in classes.values()) == len(images) == 10000
    for y, name in enumerate(FASHION_MNIST_CLASSES):
        mine = [r for r in images if r["label"] == y]
        got = classes[name]
        assert got["images"] == len(mine)
        assert got["top1"] == pytest.approx(100 * sum(r["prediction"] == y for r in mine) / len(mine))
        assert got["mean_macs_ratio"] == pytest.approx(sum(r["macs_ratio"] for r in mine) / len(mine))
        assert got["mean_token_fraction_last"] == pytest.approx(sum(r["tokens"][-1] for r in mine) / len(mine))


# ----------------------------------------------------------------------------- figures and the document
def test_every_figure_is_a_png_the_report_shows_with_its_caption(run: Path, report: dict) -> None:
    import matplotlib.image

    text = (run / "report.md").read_text()
    names = {f["name"]: f for f in report["figures"]}
    assert set(names) == {"pareto", "decisions", "classes", "tokens", "curves_dense", "curves_meta",
                          "curves_selector", "curves_finetune", "curves_static_finetune"}
    drawn = {n for n, f in names.items() if f["path"]}
    # random-weight dense/meta/selector files here have no training log: they say so instead of a figure
    assert drawn == {"pareto", "decisions", "classes", "tokens", "curves_finetune", "curves_static_finetune"}
    for name in drawn:
        f = names[name]
        path = run / f["path"]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(path).shape[:2]
        assert height > 200 and width > 300, name
        assert f"![{f['title']}]({f['path']})" in text and f"*{f['caption']}*" in text
    assert "holdout top-1 (val_top1) after each of 1 epochs" in names["curves_finetune"]["caption"]
    assert "match eval/prance.csv for 4 of 4 images" in names["tokens"]["caption"]
    for name in ("curves_dense", "curves_meta", "curves_selector"):
        assert f"*{names[name]['title']}: not run yet.*" in text
    assert report["verdict"]["text"] in text and report["sources"]["bench/bench.json"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert (report["commit"] or "").removesuffix(EDITED) == (head.stdout.strip() if head.returncode == 0 else "")


def test_the_token_overlays_run_the_images_whose_decisions_the_eval_recorded(run: Path, report: dict) -> None:
    images = {r["index"]: r for r in _load(run, "eval/prance.json")["images"]}
    shown = next(f for f in report["figures"] if f["name"] == "tokens")["images"]
    assert len(shown) == 4
    macs = sorted(r["macs"] for r in images.values())
    assert shown[0]["macs"] == macs[0] and shown[-1]["macs"] == macs[-1]  # cheapest to dearest
    for r in shown:
        recorded = images[r["index"]]
        assert (r["label"], r["prediction"], r["widths"], r["merge_keep"]) == (
            recorded["label"], recorded["prediction"], recorded["widths"], recorded["merge_keep"])


def test_a_run_still_going_says_not_run_yet_where_its_stages_belong(run: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(run / "dense", partial / "dense")
    shutil.copytree(run / "sweep", partial / "sweep")
    (partial / "eval").mkdir()
    shutil.copy(run / "eval/dense.json", partial / "eval/dense.json")
    (partial / "stages.json").write_text(json.dumps({"dense": {"status": "done", "seconds": 3.0},
                                                     "finetune": {"status": "running"}}))
    assert main(["report", str(partial), "--overlays", "0"]) == 0
    results = json.loads((partial / "results.json").read_text())
    rows = {r["key"]: r for r in results["rows"]}
    assert rows["dense"]["status"] == "done" and rows["dense"]["top1"] is not None
    for key in ("prance", "selector", "static_finetune", "best_static"):
        assert rows[key]["status"].startswith("not run yet") and rows[key]["top1"] is None, key
    assert results["verdict"]["text"].startswith("No verdict yet")
    text = (partial / "report.md").read_text()
    assert "| PRANCE | not run yet |" in text and "*The bench stage is not run yet.*" in text
    assert "*Per-image compute and decisions: not run yet.*" in text
    assert "| finetune | running |" in text
    figures = {f["name"]: f for f in results["figures"]}
    assert figures["pareto"]["path"] and not figures["tokens"]["path"]


@pytest.mark.parametrize("damage, fragment", [
    ("missing", "does not exist"), ("file", "is a file, not a run folder"),
    ("empty", "is not a prance run folder"), ("corrupt", "eval/prance.json is corrupt"),
    ("foreign", "eval/dense.json is not what its stage writes")])
def test_a_bad_run_folder_is_one_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str,
                                      fragment: str) -> None:
    target = tmp_path / "run"
    if damage == "file":
        target.write_text("not a folder")
    elif damage == "empty":
        target.mkdir()
    elif damage in ("corrupt", "foreign"):
        (target / "eval").mkdir(parents=True)
        shutil.copy(run / "eval/dense.json", target / "eval/dense.json")
        if damage == "corrupt":
            (target / "eval/prance.json").write_text((run / "eval/prance.json").read_text()[:500])
        else:
            (target / "eval/dense.json").write_text(json.dumps({"rows": [{"top1": 1.0}]}))
    cli_error(capsys, ["report", target], fragment)
