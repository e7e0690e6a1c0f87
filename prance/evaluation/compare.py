"""Several ``prance run`` folders side by side: one table over operating points (token modes, budgets).

Each run contributes the rows of its own report (:func:`prance.evaluation.report.collect`), so every
number still comes from that run's files and is on its test split. Speed-ups are each method's
images per second over the dense row's in the same run's bench (one machine, one sitting); runs
benchmarked apart are compared through those ratios, never through raw throughput. Test-split
evaluations of adaptive models made outside a run (``prance evaluate --out``, e.g. one budget-range
selector at several budgets) add one row each; such a row gets speed-ups from a ``prance bench --checkpoint``
of that model at that budget (``--bench``) once bench's timed decisions are shown to be the evaluated ones.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prance.errors import PranceError
from prance.evaluation.report import RunFiles, collect
from prance.source import short, source_commit

#: What each row of the comparison keeps of a report row.
ROW_KEYS = ("key", "method", "status", "top1", "images", "gmacs", "macs_ratio", "params_m", "token_fraction_last")


def compare_runs(runs: Sequence[str | Path], evaluations: Sequence[str | Path] = (),
                 benches: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The headline rows of every run in ``runs`` (in that order), with speed-ups over the run's own dense, then one
    row per adaptive model's test-split evaluation file in ``evaluations``, with speed-ups from the bench file
    of ``benches`` that timed its decisions."""
    if not runs:
        raise PranceError("give at least one run folder (the --out of `prance run`)")
    folders = [Path(r).resolve() for r in runs]
    repeated = next((f for i, f in enumerate(folders) if f in folders[:i]), None)
    if repeated is not None:
        raise PranceError(f"run folder {repeated} is given twice; name each run once")
    rows, verdicts = [], []
    for folder, label in zip(folders, run_labels(folders)):
        results = collect(RunFiles(folder))
        cfg = results.get("config") or {}
        dense = next((r for r in results["rows"] if r["key"] == "dense"), None)
        reference = dense["speed"] if dense else {}
        for r in results["rows"]:
            speedup = {b: s["images_per_s"] / reference[b]["images_per_s"] for b, s in r["speed"].items()
                       if b in reference}
            rows.append({"run": str(folder), "label": label, "mode": cfg.get("mode"), "budget": cfg.get("budget"),
                         **{k: r[k] for k in ROW_KEYS}, "speedup": speedup})
        verdicts.append({"run": str(folder), "label": label, "text": results["verdict"]["text"],
                         "commits": stage_commits(results.get("stages") or {})})
    extra = [evaluation_row(Path(e)) for e in evaluations]
    attach_benches(extra, [Path(b) for b in benches])
    rows += [row for row, _ in extra]
    return {"generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": source_commit(), "split": "test", "runs": [str(f) for f in folders], "rows": rows,
            "verdicts": verdicts}


def stage_commits(stages: dict[str, Any]) -> list[str]:
    """The prance sources a run's stages ran at (stages.json), in order of first use; [] if not recorded."""
    out: list[str] = []
    for entry in stages.values():
        for c in (entry.get("commits") or []) if isinstance(entry, dict) else []:
            if c and c not in out:
                out.append(c)
    return out


def evaluation_row(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """One comparison row from ``prance evaluate --out`` of an adaptive model on the test split (no speed yet),
    and the evaluation it was read from."""
    from prance.evaluation.report import headline_row

    if not path.is_file():
        raise PranceError(f"--evaluation {path}: file not found; give the --out of `prance evaluate --checkpoint "
                          "ADAPTIVE.pt`")
    try:
        result = json.loads(path.read_text())
        summary, split = result["summary"], result["split"]
        budget_range = [float(b) for b in result.get("budget_range") or []]
        dense_macs = float(summary["macs"]) / float(summary["macs_ratio"])
        ranged = len(set(budget_range)) > 1
        method = ("budget-range selector " + "-".join(f"{b:g}" for b in budget_range)) if ranged else \
            "adaptive model"
        row = headline_row("adaptive", method, str(path), summary, dense_macs)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        raise PranceError(f"--evaluation {path} is not an adaptive model's evaluation (prance evaluate --checkpoint "
                          "ADAPTIVE.pt --out FILE.json)") from None
    if split != "test":
        raise PranceError(f"--evaluation {path} is of the {split} split; the comparison is on the test split "
                          "(evaluate with --split test)")
    return {"run": str(path.resolve()), "label": f"{path.parent.name}/{path.stem}", "mode": None,
            "budget": result.get("budget"), **{k: row[k] for k in ROW_KEYS}, "speedup": {}}, result


def attach_benches(evaluated: Sequence[tuple[dict[str, Any], dict[str, Any]]], benches: Sequence[Path]) -> None:
    """Give each evaluation row the speed-ups of the bench file that timed its model: the bench's per-image MACs
    agree with the evaluation's on every test image both hold. Speed-up is PRANCE's images per second over the
    dense reference's in that bench (one sitting)."""
    from prance.evaluation.report import bench_agreement

    for path in benches:
        try:
            bench = json.loads(path.read_text())
            reference = bench["meta"]["reference"]
            speed = {(r["method"], str(r["batch_size"])): float(r["images_per_s"]) for r in bench["rows"]}
        except FileNotFoundError:
            raise PranceError(f"--bench {path}: file not found; give the bench.json of `prance bench --checkpoint "
                              "ADAPTIVE.pt --budget B`") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise PranceError(f"--bench {path} is not a bench.json written by `prance bench`") from None
        matches = [row for row, result in evaluated if _timed_it(bench_agreement(bench, result))]
        if not matches:
            raise PranceError(f"--bench {path} did not time any --evaluation's model: no adaptive model's decisions, "
                              "or none whose per-image MACs match on the test images both hold; bench the evaluated "
                              "checkpoint at the evaluated budget (prance bench --checkpoint ADAPTIVE.pt --budget B)")
        for row in matches:
            if row["speedup"]:
                raise PranceError(f"--bench {path}: the evaluation {row['label']} already has a bench; give one "
                                  "bench per evaluation")
            row["speedup"] = {b: ips / speed[reference, b] for (m, b), ips in speed.items()
                              if m == "prance" and (reference, b) in speed}


def _timed_it(agreement: tuple[int, int, int] | None) -> bool:
    """A bench timed an evaluation's model: some test images in common, none with other MACs."""
    if agreement is None:
        return False
    _, shared, differing = agreement
    return shared > 0 and differing == 0


def run_labels(folders: Sequence[Path]) -> list[str]:
    """Short names of run folders: their own names, or their paths below the common parent where names repeat."""
    names = [f.name for f in folders]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([str(f) for f in folders])
    return [os.path.relpath(f, common) for f in folders]


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(comparison: dict[str, Any]) -> str:
    """The comparison as a Markdown document: one table, then each run's verdict and prance source."""
    sizes = sorted({b for r in comparison["rows"] for b in r["speedup"]}, key=int)
    head = ["run", "mode", "budget", "method", "top-1 (%)", "MACs / dense", "params (M)", "tokens after last stage"]
    head += [f"speed-up @ batch {b}" for b in sizes]
    lines = ["# PRANCE runs compared", "",
             f"Written {comparison['generated']}" + (f" by prance at commit `{short(comparison['commit'])}`"
                                                    if comparison["commit"] else "") +
             ". Every number is on the test split and comes from its run's own files (its report's headline "
             "rows); speed-ups are over the dense model in the same run's bench.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in comparison["rows"]:
        top1 = _fmt(r["top1"], ".2f") if r["top1"] is not None else r["status"]
        cells = [r["label"], r["mode"] or "—", _fmt(r["budget"], "g"), r["method"], top1,
                 _fmt(r["macs_ratio"], ".3f"), _fmt(r["params_m"], ".3f"), _fmt(r["token_fraction_last"], ".3f")]
        cells += [_fmt(r["speedup"].get(b), ".2f") + ("×" if b in r["speedup"] else "") for b in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Verdicts", ""] + [f"- `{v['label']}`: {v['text']}" for v in comparison["verdicts"]]
    lines += ["", "## Sources", "", "The prance source each run's stages ran at (its stages.json):", ""]
    lines += [f"- `{v['label']}`: " + (", ".join(f"`{short(c)}`" for c in v.get("commits") or [])
                                      or "not recorded (a run written before stages recorded it)")
              for v in comparison["verdicts"]]
    return "\n".join(lines) + "\n"


def write_comparison(runs: Sequence[str | Path], out: str | Path, evaluations: Sequence[str | Path] = (),
                     benches: Sequence[str | Path] = ()) -> Path:
    """Write OUT/comparison.md, comparison.json and comparison.png; returns the Markdown file."""
    from prance.evaluation.evaluate import write_json
    from prance.evaluation.report_figures import runs_pareto
    from prance.files import atomic_write, check_writable_dir

    comparison = compare_runs(runs, evaluations, benches)
    out = check_writable_dir(out, "--out folder")
    comparison["figure"] = "comparison.png" if runs_pareto(comparison["rows"], out / "comparison.png") else None
    write_json(comparison, out / "comparison.json")
    text = markdown(comparison)
    return atomic_write(out / "comparison.md", lambda f: f.write(text.encode()))


__all__ = ["attach_benches", "compare_runs", "evaluation_row", "markdown", "write_comparison"]
