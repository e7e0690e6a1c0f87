"""The report as a document: which figure is drawn from which file, and report.md itself.

The numbers come from :mod:`prance.evaluation.report` (results.json); the per-image figures
read the eval stage's per-image decisions (``eval/prance.csv``); captions say what each
figure shows and where it comes from, and a figure whose files are missing leaves a line
saying it has not run yet.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from prance.errors import PranceError
from prance.evaluation import report_figures as figs
from prance.evaluation.report import NOT_RUN, RunFiles
from prance.source import short

#: Training stages whose log.jsonl the report draws, with what each trains.
TRAINING_STAGES = (("dense", "dense ViT (train-dense)"), ("meta", "meta-network (train-meta)"),
                   ("selector", "selector (train-selector, Result-to-Go PPO)"),
                   ("finetune", "joint fine-tuning (finetune)"),
                   ("static_finetune", "static-plan fine-tuning (finetune --static-plan)"))
_LISTS = {"tokens": float, "widths": int, "mlp_ratios": float, "heads": int, "keep": float, "merge_keep": float}


def read_decisions(files: RunFiles, rel: str = "eval/prance.csv") -> list[dict[str, Any]] | None:
    """The eval stage's per-image records (label, prediction, MACs, tokens and decisions), None if missing."""
    path = files.path(rel)
    if not path.is_file():
        return None
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        records = [{"index": int(r["index"]), "label": int(r["label"]), "prediction": int(r["prediction"]),
                    "macs": float(r["macs"]), "macs_ratio": float(r["macs_ratio"]),
                    **{k: [cast(v) for v in r[k].split()] for k, cast in _LISTS.items()}} for r in rows]
    except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError, csv.Error) as e:
        raise PranceError(f"{path} is not the per-image CSV `prance evaluate --out` writes ({type(e).__name__}: "
                          f"{e}); re-run the evaluate stage or delete the file") from None
    files.sources[rel] = str(path.resolve())
    return records


def class_names(files: RunFiles, data: str | None) -> list[str]:
    """Class names in label order: from a stage's split.json, else Fashion-MNIST's if that is the data."""
    for stage in ("finetune", "selector", "meta", "dense"):
        split = files.json(f"{stage}/split.json")
        if isinstance(split, dict) and split.get("classes"):
            return [str(c) for c in split["classes"]]
    if data == "fashion-mnist":
        from prance.data import FASHION_MNIST_CLASSES

        return list(FASHION_MNIST_CLASSES)
    return []


def by_class(records: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per class: images, test top-1, mean MACs / dense, mean tokens after the last stage, mean width per stage."""
    out = {}
    for y in sorted({r["label"] for r in records}):
        rs = [r for r in records if r["label"] == y]
        n = len(rs)
        out[names[y] if y < len(names) else f"class {y}"] = {
            "label": y, "images": n, "top1": 100.0 * sum(r["prediction"] == y for r in rs) / n,
            "mean_macs_ratio": sum(r["macs_ratio"] for r in rs) / n,
            "mean_token_fraction_last": sum(r["tokens"][-1] for r in rs) / n,
            "mean_widths": [sum(r["widths"][s] for r in rs) / n for s in range(len(rs[0]["widths"]))]}
    return out


def draw_figures(files: RunFiles, results: dict[str, Any], device: str = "cpu", overlays: int = 6
                 ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Every figure of the report under RUN/figures, and the per-class numbers of the decisions figure."""
    out_dir = files.path("figures")
    out_dir.mkdir(exist_ok=True)
    entries: list[dict[str, Any]] = []

    def add(name: str, title: str, caption: str | None, drawn: bool, missing: str) -> None:
        entries.append({"name": name, "title": title, "path": f"figures/{name}.png" if drawn else None,
                        "caption": caption if drawn else None, "status": "done" if drawn else missing})

    rows = results["rows"]
    sweep = files.json("sweep/sweep.json") or {}
    drawn_rows = [r for r in rows if r["top1"] is not None]
    best = results["static_choice"].get("name")
    done = figs.pareto(rows, sweep.get("rows", []), best, (results["dense_macs"] or 0) / 1e9 or None,
                       out_dir / "pareto.png") is not None
    shown = ", ".join(r["method"] for r in drawn_rows)
    add("pareto", "Accuracy against MACs", f"Test top-1 against mean GMACs per image (top axis: MACs / dense) of "
        f"{shown}" + (f", over the {len(sweep['rows'])} static subnets of the sweep (grey; dashed: their upper "
                      "envelope on the test split)" if sweep.get("rows") else "")
        + ". A point far below the others is drawn on the lower edge with its value written. Sources: the "
        "headline table's files and sweep/sweep.json.", done, NOT_RUN)

    records = read_decisions(files)
    prance_eval = files.json("eval/prance.json") or {}
    budget = prance_eval.get("budget")
    what = f"{len(records)} test images of eval/prance.csv ({files.prance_model()})" if records else ""
    done = records is not None and figs.decision_histograms(records, budget, out_dir / "decisions.png") is not None
    add("decisions", "Per-image compute and decisions",
        f"Left: each test image's MACs / dense (selector included), its mean and the budget; middle: the keep "
        f"ratios the selector decided at each stage ≥ 1; right: how often each residual width was chosen per "
        f"stage. From the {what}.", done, files.not_run("eval/prance.csv"))

    names = class_names(files, prance_eval.get("data"))
    classes = by_class(records, names) if records else None
    done = records is not None and figs.decisions_by_class(records, names, out_dir / "classes.png") is not None
    add("classes", "Decisions by class",
        f"Per true class of the {what}: the spread of per-image MACs / dense (box: quartiles, whiskers: 5th-95th "
        "percentile, line: median; the class's test top-1 in brackets), the mean fraction of patch tokens left "
        "after each stage, and the mean residual width chosen per stage.", done, files.not_run("eval/prance.csv"))

    entries.append(_overlays(files, records or [], names, out_dir, device, overlays))

    for stage, title in TRAINING_STAGES:
        log = files.path(f"{stage}/log.jsonl")
        shows = figs.training_curves(log, out_dir / f"curves_{stage}.png", title) if log.is_file() else None
        if shows:
            files.sources[f"{stage}/log.jsonl"] = str(log.resolve())
        add(f"curves_{stage}", f"Training curves: {title}", f"{title[0].upper() + title[1:]}: {shows}. From "
            f"{stage}/log.jsonl.", shows is not None,
            files.not_run(f"{stage}/log.jsonl") + ("" if not log.is_file() else " (nothing logged)"))
    return entries, classes


def _overlays(files: RunFiles, records: list[dict[str, Any]], names: list[str], out_dir: Path,
              device: str, count: int) -> dict[str, Any]:
    """The token-overlay figure: PRANCE's model run on a few test images (the only model run of the report)."""
    entry: dict[str, Any] = {"name": "tokens", "title": "The selector's decisions on test images", "path": None,
                             "caption": None}
    model = files.prance_model()
    adaptive = files.path(model)
    if not adaptive.is_file():
        return {**entry, "status": files.not_run(model)}
    if count == 0:
        return {**entry, "status": "not drawn (--overlays 0)"}
    if not records:  # the images are chosen from the evaluation's per-image decisions
        return {**entry, "status": files.not_run("eval/prance.csv")}
    try:
        shown, mode = figs.token_overlays(adaptive, records, names, out_dir / "tokens.png", count, device)
    except PranceError as e:  # e.g. the data set is not on this machine: the rest of the report stands
        return {**entry, "status": f"could not be drawn: {e}"}
    files.sources[model] = str(adaptive.resolve())
    agree = sum(r["eval_macs"] == r["macs"] for r in shown)
    check = f"the decisions made here match eval/prance.csv for {agree} of {len(shown)} images"
    spread = "spread from the cheapest to the dearest per-image MACs of eval/prance.csv, "
    effect = {"merge": "patches merged into one token share a colour tint (token mode merge: nothing is pruned)",
              "prune": "patches whose token was pruned are dimmed (token mode prune: nothing is merged)"}.get(
        mode, "patches whose token was pruned are dimmed, patches merged into one token share a colour tint")
    return {**entry, "path": "figures/tokens.png", "status": "done", "images": shown, "caption": (
        f"{len(shown)} test images ({spread}test index #), run through {model}. Left: the image, its "
        "true → predicted class, its MACs / dense, the residual widths and the keep ratios the selector chose for "
        f"the stages after the first; then one panel per stage: {effect}; the panel title counts the tokens left. "
        f"Check: {check}.")}


# ----------------------------------------------------------------------------- report.md
def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _batch_sizes(results: dict[str, Any]) -> list[str]:
    sizes = {b for r in results["rows"] for b in r["speed"]}
    return sorted(sizes, key=int) if sizes else ["1", "64"]


def markdown(results: dict[str, Any]) -> str:
    """report.md: verdict, headline table, operating point, speed, figures, stages and sources."""
    cfg = results.get("config") or {}
    commit = results.get("commit")
    lines = [f"# PRANCE run report: {Path(results['run']).name}", "",
             f"Run folder `{results['run']}`; report written {results['generated']} by prance"
             + (f" at commit `{short(commit)}`" if commit else " (commit unknown: not a git checkout)") + "."
             + (f" Data {cfg.get('data')}, token mode {cfg.get('mode')}, budget {cfg.get('budget')} (config.yaml)."
                if cfg else ""),
             "All accuracy is on the test split; every choice (best epoch, static subnet, calibration) was made on "
             "the holdout inside the stages.", "", "## Verdict", "", results["verdict"]["text"], "",
             "## Headline (test split)", ""]
    sizes = _batch_sizes(results)
    head = ["method", "top-1 (%)", "test images", "GMACs", "MACs / dense", "params (M)", "tokens after last stage"]
    head += [f"{c} @ batch {b}" for b in sizes for c in ("img/s", "ms")] + ["from"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["rows"]:
        cells = [r["method"], _fmt(r["top1"], ".2f") if r["top1"] is not None else r["status"], _fmt(r["images"], "d"),
                 _fmt(r["gmacs"], ".4f"), _fmt(r["macs_ratio"], ".3f"), _fmt(r["params_m"], ".3f"),
                 _fmt(r["token_fraction_last"], ".3f")]
        for b in sizes:
            speed = r["speed"].get(b) or {}
            cells += [_fmt(speed.get("images_per_s"), ".1f"), _fmt(speed.get("ms"), ".2f")]
        lines.append("| " + " | ".join(cells + [f"`{r['source']}`"]) + " |")
    choice = results["static_choice"]
    lines += ["", "- Speed from `bench/bench.json` (median of timed runs; ms at batch > 1 is the time of the whole "
              "batch); — where the method was not benchmarked" + ("" if results["bench"] else
                                                                  f" (the bench stage is {NOT_RUN})") + ".",
              f"- Best static subnet: {choice['rule']}" + (
                  f"; {choice['fitting']} of the {choice['candidates']} subnets fit within {choice['max_gmacs']:.4f} "
                  f"GMACs, chosen: {choice['name']}." if "fitting" in choice else ".")]
    lines += [f"- {r['method']}: {note}." for r in results["rows"] for note in r["notes"]]
    lines += _operating_point(results.get("operating_point")) + _speed(results.get("bench"))
    lines += ["## Figures", ""]
    for f in results["figures"]:
        lines += [f"### {f['title']}", ""]
        lines += [f"![{f['title']}]({f['path']})", "", f"*{f['caption']}*", ""] if f["path"] else [
            f"*{f['title']}: {f['status']}.*", ""]
    lines += _stages(results.get("stages") or {})
    lines += ["## Sources", ""] + [f"- `{rel}`: `{path}`" for rel, path in results["sources"].items()] + [""]
    return "\n".join(lines)


def _operating_point(op: dict[str, Any] | None) -> list[str]:
    if not op:
        return ["", "## PRANCE's operating point", "", f"*{NOT_RUN}.*", ""]
    cal = op.get("calibration") or {}
    q = op.get("macs_quantiles") or {}
    lines = ["", "## PRANCE's operating point", "",
             f"Budget {op.get('budget')} (mean MACs / dense, selector included); on the test split the mean is "
             f"{_fmt(op.get('test_macs_ratio'), '.4f')}."]
    if cal:
        lines.append(f"The knob was calibrated on {cal.get('holdout_images')} holdout images: mean "
                     f"{_fmt(cal.get('holdout_macs_ratio'), '.4f')} of dense MACs at holdout top-1 "
                     f"{_fmt(cal.get('holdout_top1'), '.2f')} %.")
        same = (cal.get("without_round_up") or {}).get("same_images") if cal.get("round_up") else None
        if same:
            lines.append(f"Without rounding decisions up to K = {cal['round_up']} representatives, on the same images: "
                         f"mean {_fmt(same.get('holdout_macs_ratio'), '.4f')} of dense MACs at holdout top-1 "
                         f"{_fmt(same.get('holdout_top1'), '.2f')} %.")
    if q:
        lines.append("Per-image GMACs on the test split, 5/25/50/75/95th percentile: "
                     + " / ".join(f"{float(v) / 1e9:.4f}" for _, v in sorted(q.items(), key=lambda kv: float(kv[0])))
                     + ".")
    return lines + [""]


def _speed(bench: dict[str, Any] | None) -> list[str]:
    lines = ["## Speed (bench/bench.json)", ""]
    if not bench:
        return lines + [f"*The bench stage is {NOT_RUN}.*", ""]
    lines += [f"`{bench['command']}` — {bench['threads']} thread(s) on {bench['cpu']}, {bench['inputs']}, "
              f"{bench['date']}. Speed-up against {bench['reference']}; PRANCE runs its selector's own per-image "
              "plans, the baselines are matched to their mean MACs"
              + (f" (static subnet: {bench['static_subnet_source']})" if bench.get("static_subnet_source") else "")
              + ".", "", "| method | batch | img/s | ms (median) | ms p10-p90 | speed-up | GMACs |",
              "|---|---|---|---|---|---|---|"]
    for r in bench["rows"]:
        lines.append(f"| {r['method']} | {r['batch_size']} | {_fmt(r['images_per_s'], '.1f')} | "
                     f"{_fmt(r['ms_median'], '.2f')} | {_fmt(r['ms_p10'], '.2f')}-{_fmt(r['ms_p90'], '.2f')} | "
                     f"{_fmt(r['speedup'], '.2f')}× | {_fmt(r['gmacs'], '.4f')} |")
    plot = ["", f"![bench]({bench['plot']})", "", "*Speed-up of every method at each batch size, as bench drew it "
            f"({bench['plot']}).*"] if bench.get("plot") else []
    return lines + plot + [""]


def _stages(stages: dict[str, Any]) -> list[str]:
    if not stages:
        return ["## Stages", "", "*No stages.json (a run folder assembled by hand, or written before it).*", ""]
    lines = ["## Stages", "", "| stage | status | wall time (s) | finished | prance source |", "|---|---|---|---|---|"]
    from prance.pipeline.config import STAGES

    for name in sorted(stages, key=lambda n: STAGES.index(n) if n in STAGES else len(STAGES)):
        s = stages[name] if isinstance(stages[name], dict) else {}
        status = s.get("status", "—") + (f" in {s['reused_from']} (reused)" if s.get("reused_from") else "")
        source = ", ".join(f"`{short(c)}`" for c in s.get("commits") or []) or "—"
        lines.append(f"| {name} | {status} | {_fmt(s.get('seconds'), '.0f')} | {s.get('finished', '—')} | {source} |")
    return lines + [""]
