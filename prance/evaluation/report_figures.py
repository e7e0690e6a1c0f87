"""The figures of a run's report: Pareto, per-image decisions, decisions by class, token overlays, curves.

Each function draws one PNG from numbers the report already read out of the run folder (only
:func:`token_overlays` runs the model, on a handful of test images, to trace which patches
merge). They return the path written, or None when there is nothing to draw yet.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prance.files import atomic_write

#: Marker and colour of each headline method in the Pareto plot (by its key in the results).
STYLE = {"dense": ("*", "black", 130), "prance": ("o", "tab:red", 60), "selector": ("o", "none", 150),
         "static_finetune": ("D", "tab:orange", 60), "best_static": ("s", "tab:gray", 60),
         "evit": ("^", "tab:blue", 60), "tome": ("P", "tab:green", 80)}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(ax: Any, title: str, xlabel: str, ylabel: str | None = None, empty: str | None = None) -> None:
    """Title and axis labels of a panel; its legend, or ``empty`` written across it when it has no data."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if empty:
        ax.text(0.5, 0.5, empty, ha="center", transform=ax.transAxes)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(fig: Any, out: Path, dpi: int = 110) -> Path:
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=dpi))
    _pyplot().close(fig)
    return out


# ----------------------------------------------------------------------------- accuracy against MACs
def pareto(rows: Sequence[dict[str, Any]], sweep: Sequence[dict[str, Any]], best_static: str | None,
           dense_gmacs: float | None, out: Path) -> Path | None:
    """Test top-1 against mean GMACs: the headline rows over the sweep's static subnets.

    Points far below the rest (a baseline that collapses) are drawn on the lower edge with their
    value written, so the region where the methods compete stays readable.
    """
    points = [r for r in rows if r.get("top1") is not None and r.get("gmacs") is not None]
    statics = [r for r in sweep if r.get("test_top1") is not None]
    if not points and not statics:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    core = [r["top1"] for r in points if r["key"] not in ("evit", "tome")] + [r["test_top1"] for r in statics]
    floor = min(core or [r["top1"] for r in points]) - 1.0
    if statics:
        xs = np.array([r["gmacs"] for r in statics])
        ys = np.array([r["test_top1"] for r in statics])
        ax.scatter(xs, ys, s=18, color="lightgray", edgecolor="gray", zorder=2,
                   label=f"static subnets of the sweep ({len(statics)})")
        order, front, best = np.argsort(xs), [], -math.inf
        for i in order:
            if ys[i] > best:
                front.append(i)
                best = ys[i]
        ax.plot(xs[front], ys[front], "--", color="gray", lw=0.8, zorder=1)
    for r in points:
        marker, colour, size = STYLE.get(r["key"], ("o", "purple", 60))
        y, clipped = max(r["top1"], floor), r["top1"] < floor
        edge = "tab:red" if r["key"] == "selector" else "black"  # a ring: visible around PRANCE's point
        ax.scatter([r["gmacs"]], [y], marker="v" if clipped else marker, s=size, color=colour, edgecolor=edge,
                   linewidth=1.2, zorder=3 if r["key"] == "selector" else 4,
                   label=f"{r['method']}: {r['top1']:.2f} %")
        if clipped:
            ax.annotate(f"{r['method'].split(' ')[0]} {r['top1']:.1f} % (off the scale)", (r["gmacs"], y),
                        xytext=(4, 6), textcoords="offset points", fontsize=7)
    if dense_gmacs:
        ax.axvline(dense_gmacs, color="black", lw=0.5, ls=":")
        secondary = ax.secondary_xaxis("top", functions=(lambda g: g / dense_gmacs, lambda m: m * dense_gmacs))
        secondary.set_xlabel("MACs / dense")
    ax.set_ylim(bottom=floor - 0.3)
    ax.set_xlabel("mean GMACs per image (selector included)")
    ax.set_ylabel("top-1 on the test split (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    title = "accuracy against compute" + (f" (best static subnet: {best_static})" if best_static else "")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def runs_pareto(rows: Sequence[dict[str, Any]], out: Path) -> Path | None:
    """Test top-1 against MACs / dense over several runs (``prance compare``): one series per method and
    token mode, its points joined in MACs order, PRANCE's labelled with their run."""
    points = [r for r in rows if r.get("top1") is not None and r.get("macs_ratio") is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    lines = ("-", "--", ":", "-.")
    modes = list(dict.fromkeys(str(r["mode"]) for r in points))

    def series_of(r: dict[str, Any]) -> tuple[str, str, str]:  # an evaluation file's model: a series by method
        return r["key"], str(r["mode"]), r["method"] if r["key"] == "adaptive" else ""

    for key, mode, method in dict.fromkeys(series_of(r) for r in points):
        marker, colour, size = STYLE.get(key, ("o", "purple", 60))
        series = sorted((r for r in points if series_of(r) == (key, mode, method)), key=lambda r: r["macs_ratio"])
        xs, ys = [r["macs_ratio"] for r in series], [r["top1"] for r in series]
        face = "none" if colour == "none" else colour
        name = series[0]["method"].split(" (")[0] + ("" if series[0]["mode"] is None else f" ({mode})")
        ax.plot(xs, ys, lines[modes.index(mode) % len(lines)], color="tab:red" if face == "none" else face,
                lw=0.8, marker=marker, markersize=math.sqrt(size), markerfacecolor=face, markeredgecolor="black",
                label=name)
        if key in ("prance", "adaptive"):
            for r in series:
                ax.annotate(str(r.get("label") or r["budget"]), (r["macs_ratio"], r["top1"]), xytext=(4, -10),
                            textcoords="offset points", fontsize=7)
    ax.set_xlabel("mean MACs / dense (selector included)")
    ax.set_ylabel("top-1 on the test split (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("runs compared: accuracy against compute (PRANCE labelled with its run)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------- per-image decisions
def decided_keep_columns(records: Sequence[dict[str, Any]]) -> list[str]:
    """The keep-ratio columns the selector actually varied (``keep``, ``merge_keep`` or both)."""
    return [c for c in ("keep", "merge_keep") if any(v != 1.0 for r in records for v in r[c][1:])]


def decision_histograms(records: Sequence[dict[str, Any]], budget: float | None, out: Path) -> Path | None:
    """Per-image MACs / dense, the keep ratios decided at each stage ≥ 1, and the widths chosen."""
    if not records:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ratios = np.array([r["macs_ratio"] for r in records])
    axes[0].hist(ratios, bins=40, color="tab:red", alpha=0.8)
    axes[0].axvline(ratios.mean(), color="black", label=f"mean {ratios.mean():.3f}")
    if budget is not None:
        axes[0].axvline(budget, color="tab:blue", ls="--", label=f"budget {budget:g}")
    _label(axes[0], f"per-image compute ({len(records)} test images)", "MACs / dense of each test image", "images")
    stages = len(records[0]["widths"])
    columns = decided_keep_columns(records)
    bins = np.linspace(0, 1, 41)
    for c in columns:
        for s in range(1, stages):
            axes[1].hist([r[c][s] for r in records], bins=bins, histtype="step", lw=1.5,
                         label=f"{c} stage {s}", ls="-" if c == "merge_keep" else "--")
    _label(axes[1], "keep ratios decided per stage", "keep ratio decided (fraction of the stage's tokens kept)",
           empty=None if columns else "no token reduction decided")
    widths = sorted({w for r in records for w in r["widths"][1:]})
    step = 0.8 / max(stages - 1, 1)
    for s in range(1, stages):
        counts = [sum(r["widths"][s] == w for r in records) for w in widths]
        axes[2].bar(np.arange(len(widths)) + (s - 1 - (stages - 2) / 2) * step, counts, width=step,
                    label=f"stage {s}")
    axes[2].set_xticks(range(len(widths)), [str(w) for w in widths])
    _label(axes[2], "widths chosen per stage", "residual width chosen", "images")
    fig.tight_layout()
    return _save(fig, out)


def decisions_by_class(records: Sequence[dict[str, Any]], class_names: Sequence[str], out: Path) -> Path | None:
    """Per class: the spread of per-image MACs, mean tokens left after each stage and mean width per stage."""
    if not records:
        return None
    plt = _pyplot()
    labels = sorted({r["label"] for r in records})
    names = [class_names[y] if y < len(class_names) else f"class {y}" for y in labels]
    by_class = {y: [r for r in records if r["label"] == y] for y in labels}
    stages = len(records[0]["widths"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(labels) + 2.2),
                             gridspec_kw={"width_ratios": [1.6, 1, 1]})
    data = [[r["macs_ratio"] for r in by_class[y]] for y in labels]
    axes[0].boxplot(data, orientation="horizontal", whis=(5, 95), showfliers=False, widths=0.6)
    top1 = [100.0 * np.mean([r["prediction"] == r["label"] for r in by_class[y]]) for y in labels]
    axes[0].set_yticks(range(1, len(labels) + 1), [f"{n} ({t:.0f} %)" for n, t in zip(names, top1)])
    axes[0].invert_yaxis()
    _label(axes[0], "compute by class (test top-1 of the class in brackets)",
           "MACs / dense per image (box: quartiles, whiskers: 5-95 %)")
    axes[0].grid(axis="x", alpha=0.3)
    for ax, key, title, fmt in ((axes[1], "tokens", "mean fraction of tokens after stage", "{:.2f}"),
                                (axes[2], "widths", "mean residual width in stage", "{:.0f}")):
        grid = np.array([[np.mean([r[key][s] for r in by_class[y]]) for s in range(1, stages)] for y in labels])
        ax.imshow(grid, aspect="auto", cmap="viridis")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="white" if v < (grid.min() + grid.max()) / 2 else "black")
        ax.set_xticks(range(stages - 1), [str(s) for s in range(1, stages)])
        ax.set_yticks(range(len(labels)), names)
        _label(ax, title, "stage")
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------- the selector's decisions on images
def overlay_indices(records: Sequence[dict[str, Any]], count: int) -> list[int]:
    """Test images spread over the per-image MACs: the cheapest, the dearest and evenly between."""
    order = sorted(range(len(records)), key=lambda i: (records[i]["macs"], i))
    picks = [order[round(q * (len(order) - 1))] for q in np.linspace(0, 1, min(count, len(order)))]
    return list(dict.fromkeys(records[i]["index"] for i in picks))


def token_overlays(adaptive_path: Path, records: Sequence[dict[str, Any]], class_names: Sequence[str], out: Path,
                   count: int = 6, device: str = "cpu") -> tuple[list[dict[str, Any]], str]:
    """Run the adaptive model on ``count`` test images and draw, per stage, which patches it kept and merged
    (``prance.evaluation.visualize``), its decisions written beside each image.

    The images spread over the per-image MACs of ``records`` (the eval stage's decisions; each record's
    ``index`` is the image's place in the test split). Returns each image's decisions as computed here, with
    the MACs the records hold for it (``eval_macs``) to compare, and the model's token mode.
    """
    import torch

    from prance.adaptive import AdaptiveViT
    from prance.data.provenance import checkpoint_dataset
    from prance.evaluation.visualize import visualize
    from prance.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(adaptive_path)
    net = AdaptiveViT.from_checkpoint(ckpt, adaptive_path).to(device)
    dataset = checkpoint_dataset(ckpt, str(adaptive_path), split="test")
    indices = overlay_indices(records, count)
    images, labels = zip(*(dataset[i] for i in indices))
    batch = torch.stack(images).to(device)
    with torch.inference_mode():
        predictions = net(batch).argmax(-1).tolist()
    stats = net.last
    by_index = {r["index"]: r for r in records}
    rows = [{"index": int(i), "label": int(y), "prediction": int(p), **row,
             "eval_macs": by_index[i]["macs"]}
            for i, y, p, row in zip(indices, labels, predictions, stats.rows())]
    keep = "merge_keep" if net.model.space.token_mode == "merge" else "keep"
    titles = [f"#{r['index']} {_name(class_names, r['label'])}→{_name(class_names, r['prediction'])}\n"
              f"{r['macs_ratio']:.2f}× MACs  w {'/'.join(str(w) for w in r['widths'][1:])}\n"
              f"{keep.replace('_', ' ')} " + "/".join(f"{k:.2f}" for k in r[keep][1:]) for r in rows]
    visualize(net.model, batch, stats.plan, out, dataset.info.mean, dataset.info.std, titles)
    return rows, net.model.space.token_mode


def _name(class_names: Sequence[str], label: int) -> str:
    return str(class_names[label] if label < len(class_names) else label)[:12]


# ----------------------------------------------------------------------------- training curves
def read_log(path: Path) -> list[dict[str, Any]]:
    """The lines of a log.jsonl that parse (a line being written when the run was stopped is skipped)."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def holdout_keys(epochs: Sequence[dict[str, Any]]) -> list[str]:
    """The holdout top-1 figures an epoch line records (``holdout_top1``, ``val_top1``, ``val_top1_largest`` …)."""
    keys = dict.fromkeys(k for r in epochs for k in r if "top1" in k and not k.startswith(("train_", "best_")))
    return list(keys)


def training_curves(log: Path, out: Path, title: str) -> str | None:
    """Loss and holdout top-1 per epoch of one training stage (a selector log: its PPO curves, drawn by
    ``prance.training.selector.plot_curves``). Returns what the figure shows, None if nothing is logged yet."""
    rows = read_log(log)
    updates = sum(r.get("event") == "update" for r in rows)
    if updates:
        from prance.training.selector import plot_curves

        plot_curves(log, out)
        return (f"per PPO update ({updates}): return, top-1 against the dense model's, mean MACs / dense against "
                "the budget, λ, tokens kept per stage and the PPO diagnostics (approx. KL, clip fraction, explained "
                "variance)")
    steps = [r for r in rows if r.get("event") == "step" and "loss" in r]
    epochs = [r for r in rows if r.get("event") == "epoch"]
    if not steps and not epochs:
        return None
    macs_keys = list(dict.fromkeys(k for r in epochs for k in r if k.endswith("macs_ratio")))
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3 if macs_keys else 2, figsize=(13 if macs_keys else 10, 3.8))
    axes[0].plot([r["epoch"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.7,
                 label="training loss (log window)")
    _epoch_lines(axes[0], epochs, ["train_loss"], "epoch mean")
    _label(axes[0], "training loss", "epoch", "loss")
    _epoch_lines(axes[1], epochs, holdout_keys(epochs))
    _label(axes[1], "holdout top-1 after each epoch", "epoch", "top-1 (%)",
           empty=None if epochs else "no epoch finished yet")
    if macs_keys:
        _epoch_lines(axes[2], epochs, macs_keys)
        _label(axes[2], "mean compute", "epoch", "MACs / dense")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, out, dpi=90)
    shown = f"holdout top-1 ({', '.join(holdout_keys(epochs))}) after each of {len(epochs)} epochs" if epochs else \
        "no epoch finished yet"
    return (f"training loss per log window and per epoch, {shown}"
            + (f", and the mean MACs / dense ({', '.join(macs_keys)})" if macs_keys else ""))


def _epoch_lines(ax: Any, epochs: Sequence[dict[str, Any]], keys: Sequence[str], label: str | None = None) -> None:
    """One line per key over the epochs that record it."""
    for key in keys:
        points = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-", label=label or key)
