"""A run's results, read from the run folder's own files: the headline rows, the verdict, results.json.

``prance run`` writes one folder (README: the run folder); this module reads it and nothing
else — no training and no evaluation is repeated. Every number comes from the file named
next to it: top-1, MACs, parameters and tokens from the test-split evaluations in ``eval/``,
the static subnets from ``sweep/sweep.json``, speed from ``bench/bench.json``. A stage that
has not run (yet) leaves its place saying so. :func:`write_report` also draws the figures
(:mod:`prance.evaluation.report_figures`) and writes ``report.md``
(:mod:`prance.evaluation.report_markdown`).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prance.errors import PranceError
from prance.files import load_yaml
from prance.source import source_commit

NOT_RUN = "not run yet"
#: What a run folder holds (README: the run folder); a folder with none of them is not a run.
RUN_ENTRIES = ("config.yaml", "stages.json", "dense", "meta", "sweep", "selector", "finetune", "static_finetune",
               "round_up", "eval", "bench")
#: Which stage writes each file the report reads (to say which stage has not run).
STAGE_OF = {"eval": "evaluate", "sweep": "sweep", "bench": "bench"}
PLAN_KEYS = ("widths", "mlp_ratios", "heads", "keep", "merge_keep")


class RunFiles:
    """The files of one run folder, read once each; records which ones the results came from."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise PranceError(f"run folder {self.root} does not exist; give the --out folder of `prance run`")
        if not self.root.is_dir():
            raise PranceError(f"{self.root} is a file, not a run folder; give the --out folder of `prance run`")
        if not any((self.root / name).exists() for name in RUN_ENTRIES):
            raise PranceError(f"{self.root} is not a prance run folder (it holds none of config.yaml, stages.json, "
                              "dense/, eval/ ...); give the --out folder of `prance run`")
        self.sources: dict[str, str] = {}
        self._cache: dict[str, Any] = {}
        self.stages = self.json("stages.json") or {}

    def path(self, rel: str) -> Path:
        return self.root / rel

    def json(self, rel: str) -> Any | None:
        """The parsed file, None if it does not exist (yet); a corrupt file is a one-line error."""
        if rel not in self._cache:
            path = self.root / rel
            if not path.is_file():
                self._cache[rel] = None
            else:
                try:
                    self._cache[rel] = json.loads(path.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise PranceError(f"{path} is corrupt ({type(e).__name__}); re-run its stage (`prance run` with "
                                      "the same --out continues the run) or delete the file") from None
                self.sources[rel] = str(path.resolve())
        return self._cache[rel]

    def yaml(self, rel: str) -> Any | None:
        path = self.root / rel
        if not path.is_file():
            return None
        data = load_yaml(path, "run file")
        self.sources[rel] = str(path.resolve())
        return data

    def prance_model(self) -> str:
        """The run file that is PRANCE: the one eval/prance.json evaluated; before that, what config.yaml makes it
        (round_up/adaptive.pt when the round-up lever is on, else finetune/adaptive.pt)."""
        from prance.pipeline.config import PRANCE_MODELS, prance_model

        evaluated = self.json("eval/prance.json")
        checkpoint = evaluated.get("checkpoint") if isinstance(evaluated, dict) else None
        evaluated_model = "/".join(Path(checkpoint).parts[-2:]) if isinstance(checkpoint, str) else None
        if evaluated_model in PRANCE_MODELS:
            return evaluated_model
        config = self.yaml("config.yaml")
        round_up = config.get("round_up") if isinstance(config, dict) else None
        k = round_up.get("k") if isinstance(round_up, dict) else None
        return prance_model(k if isinstance(k, int) else 0)

    def not_run(self, rel: str) -> str:
        """``not run yet`` for a missing file, saying so when stages.json shows its stage running."""
        stage = rel.split("/")[0]
        stage = STAGE_OF.get(stage, stage)
        status = (self.stages.get(stage) or {}).get("status") if isinstance(self.stages, dict) else None
        return NOT_RUN + (f" (the {stage} stage is {status})" if status and status != "done" else "")

    @contextmanager
    def reading(self, rel: str) -> Iterator[None]:
        """Turn a file that parses but lacks what its stage writes into a one-line error naming it."""
        try:
            yield
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
            raise PranceError(f"{self.root / rel} is not what its stage writes ({type(e).__name__}: {e}); re-run "
                              "that stage or delete the file") from None


# ----------------------------------------------------------------------------- one row of the headline table
def headline_row(key: str, method: str, source: str, r: dict[str, Any] | None, dense_macs: float | None,
                 not_run: str = NOT_RUN, **extra: Any) -> dict[str, Any]:
    """A headline row from an evaluation record ``r`` (``evaluate``'s row or an adaptive summary)."""
    row = {"key": key, "method": method, "source": source, "status": "done" if r else not_run, "top1": None,
           "images": None, "gmacs": None, "macs_ratio": None, "params_m": None, "token_fraction_last": None,
           "speed": {}, "notes": []}
    if r:
        fractions = r.get("token_fractions")
        row.update(top1=float(r["top1"]), images=r.get("images"), gmacs=float(r["macs"]) / 1e9,
                   macs_ratio=float(r["macs"]) / dense_macs if dense_macs else None, params_m=float(r["params_m"]),
                   token_fraction_last=None if not fractions or fractions[-1] is None else float(fractions[-1]))
    row.update(extra)
    return row


def _bench_rows(bench: dict[str, Any] | None, method: str) -> dict[str, dict[str, float]]:
    """Throughput and latency of ``method`` at each batch size bench timed ({} if it was not timed)."""
    out = {}
    for r in (bench or {}).get("rows", []):
        if r["method"] == method:
            out[str(r["batch_size"])] = {"images_per_s": float(r["images_per_s"]), "ms": float(r["ms_median"]),
                                         "bench_method": method, "gmacs": float(r["gmacs"])}
    return out


def _same_plan(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Two plan mappings describe the same subnet (floats compared to 6 digits)."""
    return bool(a and b) and _plan_values(a) == _plan_values(b)


def _plan_values(plan: dict[str, Any]) -> dict[str, list[float]]:
    return {k: [round(float(v), 6) for v in plan.get(k, [])] for k in PLAN_KEYS}


def plan_token_fraction(config: dict[str, Any] | None, plan: dict[str, Any]) -> float | None:
    """The fraction of patch tokens a static plan leaves after its last stage (the accounting formula)."""
    if not config:
        return None
    from prance.accounting import token_fractions
    from prance.config import ViTConfig
    from prance.plan import Plan

    cfg = ViTConfig.from_dict(config)
    return float(token_fractions(cfg, Plan.from_dict(cfg, plan))[0, -1])


def best_static_subnet(sweep_rows: list[dict[str, Any]], max_macs: float) -> tuple[dict[str, Any] | None, int]:
    """The sweep's subnet with the best holdout top-1 among those within ``max_macs`` (fewer MACs on ties)."""
    fitting = [r for r in sweep_rows if float(r["macs"]) <= max_macs]
    if not fitting:
        return None, 0
    return max(fitting, key=lambda r: (float(r["holdout_top1"]), -float(r["macs"]))), len(fitting)


def headline(files: RunFiles) -> dict[str, Any]:
    """The headline rows (dense, PRANCE, before fine-tuning, static-plan fine-tune, best static subnet, EViT,
    ToMe), the static-subnet choice and the PRANCE operating point, every number from the file named in its row."""
    bench = files.json("bench/bench.json")
    if bench is not None:
        with files.reading("bench/bench.json"):  # every row readable: later look-ups cannot fail
            for method in {r["method"] for r in bench["rows"]}:
                _bench_rows(bench, method)
    dense_rows, dense_macs, config = _dense_rows(files, bench)
    prance_rows = _prance_rows(files, bench, dense_macs)
    static_rows, choice = _static_rows(files, bench, dense_macs, config)
    return {"rows": dense_rows[:1] + prance_rows + static_rows + dense_rows[1:], "dense_macs": dense_macs,
            "static_choice": choice, "operating_point": _operating_point(files.json("eval/prance.json")),
            "bench": _bench_summary(bench, files)}


def _summary(files: RunFiles, rel: str) -> dict[str, Any] | None:
    """An adaptive model's evaluation summary (None if its file is not there yet)."""
    with files.reading(rel):
        evaluated = files.json(rel)
        return None if evaluated is None else evaluated["summary"]


def _timed(bench: dict[str, Any] | None, method: str) -> dict[str, Any]:
    """How bench/bench.json set ``method`` up ({} if it was not benchmarked)."""
    return (((bench or {}).get("meta") or {}).get("methods") or {}).get(method) or {}


def _dense_rows(files: RunFiles, bench: dict[str, Any] | None
                ) -> tuple[list[dict[str, Any]], float | None, dict[str, Any] | None]:
    """The dense row then EViT's and ToMe's (eval/dense.json), the dense MACs and the model's shape."""
    dense_eval, summary = files.json("eval/dense.json") or {"rows": []}, _summary(files, "eval/prance.json")
    with files.reading("eval/dense.json"):
        dense = next((r for r in dense_eval["rows"] if r["plan_name"] == "max"), None)
        dense_macs = float(dense["macs"]) if dense else summary["macs"] / summary["macs_ratio"] if summary else None
        speed, reference = _bench_rows(bench, "dense-timm"), "timm's VisionTransformer with the same weights"
        if not speed:
            speed, reference = _bench_rows(bench, "dense"), "the meta-network at full size"
        rows = [headline_row("dense", "dense", "eval/dense.json (dense/best.pt, plan max)", dense, dense_macs,
                             files.not_run("eval/dense.json"), speed=speed,
                             notes=[f"speed: {reference}"] if speed else [])]
        for r in dense_eval["rows"]:
            kind, _, setting = r["plan_name"].partition(":")
            if kind not in ("evit", "tome"):
                continue
            row = headline_row(kind, f"EViT (keep {setting})" if kind == "evit" else f"ToMe (r = {setting})",
                               f"eval/dense.json (dense/best.pt, {r['plan_name']})", r, dense_macs,
                               speed=_bench_rows(bench, kind))
            timed = _timed(bench, kind).get("keep_rate" if kind == "evit" else "r")
            if row["speed"] and timed is not None and float(timed) != float(setting):
                row["notes"].append(f"bench timed {kind} at {'keep' if kind == 'evit' else 'r ='} {timed:g} "
                                    "(matched to PRANCE's mean MACs on its own images)")
            rows.append(row)
    config = dense_eval.get("config") or (files.json("eval/static_finetune.json") or {}).get("config") or \
        ((bench or {}).get("meta") or {}).get("config")
    return rows, dense_macs, config


def _prance_rows(files: RunFiles, bench: dict[str, Any] | None, dense_macs: float | None) -> list[dict[str, Any]]:
    """PRANCE (finetune/adaptive.pt, or round_up/adaptive.pt) and PRANCE before fine-tuning (selector/adaptive.pt)
    on the test split."""
    rows = []
    for key, method, rel, model in (("prance", "PRANCE", "eval/prance.json", files.prance_model()),
                                    ("selector", "PRANCE before fine-tuning", "eval/selector.json",
                                     "selector/adaptive.pt")):
        rows.append(headline_row(key, method, f"{rel} ({model})", _summary(files, rel), dense_macs,
                                 files.not_run(rel), speed=_bench_rows(bench, "prance") if key == "prance" else {}))
    with files.reading("bench/bench.json"):
        _check_bench_model(rows[0], bench, files.json("eval/prance.json"))
    return rows


def _static_rows(files: RunFiles, bench: dict[str, Any] | None, dense_macs: float | None,
                 config: dict[str, Any] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The static-plan fine-tune (eval/static_finetune.json) and the best static subnet of the sweep, each with
    the bench's static-subnet speed when bench timed that very plan; and how the subnet was chosen."""
    bench_plan = _timed(bench, "static-subnet").get("plan")

    def with_speed(row: dict[str, Any], plan: dict[str, Any] | None) -> dict[str, Any]:
        if plan and _same_plan(plan, bench_plan):
            row["speed"] = _bench_rows(bench, "static-subnet")
            row["notes"].append("speed: the same plan timed by bench as static-subnet")
        elif plan and bench_plan:
            row["notes"].append("bench timed another static subnet (see Speed), so no speed here")
        return row

    with files.reading("eval/static_finetune.json"):
        evaluated = files.json("eval/static_finetune.json")
        ft = evaluated["rows"][0] if evaluated is not None else None
        rows = [with_speed(headline_row("static_finetune", "static-plan fine-tune", "eval/static_finetune.json "
                                        f"(static_finetune/best.pt, plan {ft['plan_name'] if ft else 'plan.yaml'})",
                                        ft, dense_macs, files.not_run("eval/static_finetune.json")),
                           ft and ft["plan"])]
    choice: dict[str, Any] = {"rule": "the sweep's static subnet with the best holdout top-1 among those with MACs "
                              "<= PRANCE's mean MACs on the test split (fine-tuned PRANCE, else before fine-tuning)"}
    sweep = files.json("sweep/sweep.json")
    reference = _summary(files, "eval/prance.json") or _summary(files, "eval/selector.json")
    source = "sweep/sweep.json (meta/best.pt; chosen on holdout top-1)"
    if sweep is None or reference is None:
        missing = files.not_run("sweep/sweep.json" if sweep is None else "eval/prance.json")
        return rows + [headline_row("best_static", "best static subnet", source, None, dense_macs, missing)], choice
    with files.reading("sweep/sweep.json"):
        best, fitting = best_static_subnet(sweep["rows"], float(reference["macs"]))
        choice.update(max_gmacs=float(reference["macs"]) / 1e9, candidates=len(sweep["rows"]), fitting=fitting,
                      name=best["name"] if best else None)
        record = best and {"top1": best["test_top1"], "macs": best["macs"], "params_m": best["params_m"],
                           "images": sweep.get("test_images"),
                           "token_fractions": [plan_token_fraction(config, best["plan"])]}
        row = headline_row("best_static", f"best static subnet ({best['name']})" if best else "best static subnet",
                           source, record, dense_macs, "no static subnet of the sweep fits within PRANCE's mean MACs",
                           holdout_top1=best["holdout_top1"] if best else None)
    return rows + [with_speed(row, best and best["plan"])], choice


def bench_agreement(bench: dict[str, Any] | None, evaluation: dict[str, Any] | None) -> tuple[int, int, int] | None:
    """Whether ``bench`` (a bench.json) timed the model ``evaluation`` (an adaptive evaluation) evaluated:
    ``(timed, shared, differing)`` — the test images bench timed, how many of them the evaluation also holds
    (record indices are places in the test split), and on how many of those their MACs differ. None when
    bench timed no adaptive model's decisions or there is no evaluation."""
    selector = (bench or {}).get("meta", {}).get("selector")
    if not selector or not evaluation:
        return None
    evaluated = {r["index"]: r["macs"] for r in evaluation.get("images", [])}
    timed = list(zip(bench["meta"]["image_indices"] or [], selector["macs"]))
    shared = [(i, m) for i, m in timed if i in evaluated]
    return len(timed), len(shared), sum(evaluated[i] != m for i, m in shared)


def _check_bench_model(row: dict[str, Any], bench: dict[str, Any] | None, prance_eval: dict[str, Any] | None) -> None:
    """Keep PRANCE's speed only if bench timed the evaluated model: the MACs bench recorded for each of its
    test images must be the ones eval/prance.json records for that image."""
    agreement = bench_agreement(bench, prance_eval)
    if not row["speed"] or agreement is None:
        return
    timed, shared, differing = agreement
    if differing or not shared:
        row["speed"] = {}
        row["notes"].append(f"no speed: bench/bench.json timed another model ({bench['meta'].get('model')}): its "
                            f"decisions cost other MACs than eval/prance.json's on {differing} of the {shared} "
                            "test images both hold" if shared else "no speed: none of the test images bench timed "
                            "is among those eval/prance.json evaluated, so bench cannot be shown to have timed "
                            "the evaluated model")
    else:
        row["notes"].append(f"speed: bench timed the evaluated decisions (the MACs of the {shared} of its "
                            f"{timed} test images that eval/prance.json covers agree with it)")


def _operating_point(prance_eval: dict[str, Any] | None) -> dict[str, Any] | None:
    """PRANCE's budget, its holdout calibration and the spread of its per-image MACs on the test split."""
    if not prance_eval:
        return None
    s = prance_eval["summary"]
    return {"budget": prance_eval.get("budget"), "calibration": prance_eval.get("calibration"),
            "test_macs_ratio": s.get("macs_ratio"), "macs_quantiles": s.get("macs_quantiles"),
            "token_fractions": s.get("token_fractions")}


def _bench_summary(bench: dict[str, Any] | None, files: RunFiles) -> dict[str, Any] | None:
    """What the bench timed: every row's speed, and how (threads, images, command)."""
    if not bench:
        return None
    meta = bench.get("meta") or {}
    rows = [{k: r.get(k) for k in ("method", "batch_size", "images_per_s", "ms_median", "ms_p10", "ms_p90",
                                   "speedup", "gmacs", "macs_fraction", "note")} for r in bench.get("rows", [])]
    return {"command": meta.get("command"), "threads": meta.get("threads"), "cpu": meta.get("cpu"),
            "inputs": meta.get("inputs"), "reference": meta.get("reference"), "date": meta.get("date"),
            "static_subnet_source": _timed(bench, "static-subnet").get("source"), "rows": rows,
            "plot": "bench/bench.png" if files.path("bench/bench.png").is_file() else None}


# ----------------------------------------------------------------------------- the verdict
def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Does PRANCE beat the best static subnet and the static-plan fine-tune on the test split, and by how much."""
    by_key = {r["key"]: r for r in rows}
    p = by_key.get("prance")
    if not p or p["top1"] is None:
        return {"text": f"No verdict yet: PRANCE (the fine-tuned model, eval/prance.json) is {NOT_RUN}.",
                "comparisons": {}}
    sentences, comparisons = [], {}
    for key, name in (("best_static", "the best static subnet"), ("static_finetune", "the static-plan fine-tune")):
        o = by_key.get(key)
        if not o or o["top1"] is None:
            sentences.append(f"Against {name}: {o['status'] if o else NOT_RUN}.")
            continue
        diff = p["top1"] - o["top1"]
        se = _difference_se(p["top1"], p["images"], o["top1"], o["images"])
        relation = ("beats" if diff > 0 else "ties with" if diff == 0 else "does not beat")
        by = f" by {diff:+.2f} points" if diff > 0 else f" ({diff:+.2f} points)" if diff < 0 else ""
        macs = o["gmacs"] / p["gmacs"]
        text = (f"PRANCE {relation} {name}{by} of test top-1: {p['top1']:.2f} % at {p['gmacs']:.4f} GMACs against "
                f"{o['top1']:.2f} % at {o['gmacs']:.4f} GMACs ({macs:.2f}× PRANCE's MACs).")
        if se is not None:
            images = f"{p['images']} test images" if p["images"] == o["images"] else \
                f"{p['images']} and {o['images']} test images"
            text += (f" One standard error of this difference ({images}) is {se:.2f} points" +
                     (", so it is within noise." if abs(diff) < 2 * se else "."))
        sentences.append(text)
        comparisons[key] = {"top1_difference": diff, "beats": diff > 0, "standard_error": se,
                            "macs_ratio_to_prance": macs, "within_noise": se is not None and abs(diff) < 2 * se}
    return {"text": " ".join(sentences), "comparisons": comparisons}


def _difference_se(top1_a: float, n_a: int | None, top1_b: float, n_b: int | None) -> float | None:
    """Standard error (points) of the difference of two top-1 figures measured on independent samples."""
    if not n_a or not n_b:
        return None
    pa, pb = top1_a / 100, top1_b / 100
    return 100 * math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)


def collect(files: RunFiles) -> dict[str, Any]:
    """Everything results.json holds except the figures: numbers, verdict, stages, provenance."""
    config = files.yaml("config.yaml")
    results = headline(files)
    return {"run": str(files.root.resolve()), "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "commit": source_commit(), "split": "test", "config": config if isinstance(
        config, dict) else None, "stages": files.stages if isinstance(files.stages, dict) else {}, **results,
        "verdict": verdict(results["rows"])}


def write_report(run_dir: str | Path, device: str = "cpu", overlays: int = 6) -> Path:
    """Write RUN/report.md, RUN/results.json and RUN/figures/*.png from the run's files; returns report.md.

    ``overlays`` test images are run through PRANCE's model for the token-overlay figure (0: none)."""
    from prance.evaluation.evaluate import write_json
    from prance.evaluation.report_document import draw_figures, markdown
    from prance.files import atomic_write, check_writable_dir

    files = RunFiles(run_dir)
    check_writable_dir(files.root, "run folder")
    results = collect(files)
    results["figures"], results["decisions_by_class"] = draw_figures(files, results, device, overlays)
    results["sources"] = dict(sorted(files.sources.items()))
    write_json(results, files.path("results.json"))
    text = markdown(results)
    return atomic_write(files.path("report.md"), lambda f: f.write(text.encode()))
