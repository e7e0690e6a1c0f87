"""What a benchmark reports: one row per method and batch size, the run's record, a table, JSON and a PNG."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Sequence

import torch

from prance.accounting import macs_per_sample
from prance.bench.methods import METHODS, Method
from prance.model.metavit import MetaViT

def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), for a handful of timings."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)



def measurement_row(m: Method, batch: int, seconds: list[float], rows: torch.Tensor,
                    dense_macs: float) -> dict[str, Any]:
    """Timings of ``m`` at one batch size, with the mean cost of the images ``rows`` it was timed on."""
    ms = [1000 * s for s in seconds]
    median = statistics.median(ms)
    return {
        "method": m.name,
        "batch_size": batch,
        "runs": len(ms),
        "ms_median": median,
        "ms_p10": _quantile(ms, 0.10),
        "ms_p25": _quantile(ms, 0.25),
        "ms_p75": _quantile(ms, 0.75),
        "ms_p90": _quantile(ms, 0.90),
        "images_per_s": 1000 * batch / median,
        "gmacs": float(m.macs[rows].double().mean()) / 1e9,
        "macs_fraction": float(m.macs[rows].double().mean()) / dense_macs,
        "params_m": float(m.params[rows].double().mean()) / 1e6,
        "token_fraction": float(m.tokens[rows].mean()),
        "per_image_plans": m.pool_plans is not None,
        "note": m.settings.get("plans", "") if m.pool_plans is not None else "",
    }


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not every platform has it
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_record(model: MetaViT, model_label: str, methods: dict[str, Method], reference: str, batch_sizes: list[int],
          target: float, runs: int, warmup: int, rounds: int, pool: int, images_label: str | None, seed: int,
          command: str | None, load_before: list[float] | None, seconds: float) -> dict[str, Any]:
    import timm

    import prance

    dense = float(macs_per_sample(model.config)[0])
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command or "prance.bench.benchmark (Python API)",
        "prance_version": prance.__version__,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "seconds": round(seconds, 2),
        "model": model_label,
        "config": model.config.to_dict(),
        "space": model.space.to_dict(),
        "dense_gmacs": dense / 1e9,
        "target_macs": target,
        "reference": reference,
        "batch_sizes": batch_sizes,
        "runs": runs,
        "warmup": warmup,
        "rounds": rounds,
        "pool": pool,
        "inputs": images_label,
        "seed": seed,
        "inference_mode": True,
        "methods": {name: m.settings for name, m in methods.items()},
    }


# ----------------------------------------------------------------------------- output
_COLUMNS = ("batch", "method", "img/s", "ms/batch", "p10-p90 ms", "GMACs", "MACs", "params M", "tokens",
            "speed-up", "ideal", "eff.")


def format_table(result: dict[str, Any]) -> str:
    """The rows as an aligned text table, with the run's settings and the plan source underneath."""
    meta = result["meta"]
    dense = meta["dense_gmacs"]
    lines = []
    for r in result["rows"]:
        lines.append((str(r["batch_size"]), r["method"] + ("*" if r["per_image_plans"] else ""),
                      f"{r['images_per_s']:.1f}", f"{r['ms_median']:.2f}", f"{r['ms_p10']:.2f}-{r['ms_p90']:.2f}",
                      f"{r['gmacs']:.4f}", f"{r['macs_fraction']:.3f}", f"{r['params_m']:.3f}",
                      f"{r['token_fraction']:.3f}", f"{r['speedup']:.2f}x", f"{r['ideal_speedup']:.2f}x",
                      f"{r['efficiency']:.2f}"))
    widths = [max(len(c), *(len(row[i]) for row in lines)) if lines else len(c) for i, c in enumerate(_COLUMNS)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i != 1 else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(_COLUMNS), fmt(["-" * w for w in widths])]
    last_batch = None
    for row in lines:
        if last_batch is not None and row[0] != last_batch:
            out.append("")
        out.append(fmt(row))
        last_batch = row[0]
    out.append("")
    out.append(f"model {meta['model']}; dense {dense:.4f} GMACs; target {meta['target_macs']:g} x dense MACs; "
               f"{meta.get('device', 'cpu')} {meta.get('dtype', 'float32')}, {meta['threads']} thread(s); "
               f"{meta['runs']} timed runs (+{meta['warmup']} warm-up, "
               f"{meta['rounds']} rounds); speed-up = {meta['reference']} median / method median; "
               "ideal = dense MACs / method MACs; eff. = speed-up / ideal; tokens = fraction of patch tokens each "
               "stage ends with, mean over stages")
    settings = meta["methods"]
    for name in ("evit", "tome", "static-subnet"):
        if name in settings:
            shown = {k: v for k, v in settings[name].items() if k != "plan"}
            if name == "static-subnet":
                plan = settings[name]["plan"]
                shown["widths"], shown["mlp_ratios"] = plan["widths"], plan["mlp_ratios"]
                if any(v != 1 for v in plan["keep"] + plan["merge_keep"]):
                    shown["keep"], shown["merge_keep"] = plan["keep"], plan["merge_keep"]
            out.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    per_image = [n for n in ("prance", "prance-padded") if n in settings]
    if per_image:
        out.append(f"* {', '.join(per_image)}: {settings[per_image[0]]['plans']}")
    if "selector" in meta:
        out.append(f"selector: mean {meta['selector']['macs_ratio']:.4f} x dense MACs over the {meta['pool']} images "
                   f"(selector included), budget {meta['selector']['budget']:g}")
    out.append(f"inputs: {meta['inputs']}; load average {meta['loadavg_before']} -> {meta['loadavg_after']}")
    if "allocator" in meta:
        out.append(f"allocator: {meta['allocator']}")
    return "\n".join(out)


def plot_speedups(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """PNG of speed-up over the reference vs batch size per method; ideal speed-ups dashed."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    meta, rows = result["meta"], result["rows"]
    fig = Figure(figsize=(9.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    colors = {name: f"C{i}" for i, name in enumerate(METHODS)}
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in mine]
        source = str(meta["methods"][name].get("plans", "")) if mine[0]["per_image_plans"] else ""
        label = name + next((f" ({kind})" for kind in ("selector plans", "random per-image plans")
                             if source.startswith(kind)), "")
        ax.plot(bs, [r["speedup"] for r in mine], "o-", color=colors[name], label=label)
        if name != meta["reference"]:
            ax.plot(bs, [r["ideal_speedup"] for r in mine], "--", color=colors[name], alpha=0.6, linewidth=1)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["batch_size"] for r in rows}), [str(b) for b in sorted({r["batch_size"] for r in rows})])
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"speed-up over {meta['reference']} (median time ratio)")
    ax.set_title(f"{meta['model']}: target {meta['target_macs']:g} x dense MACs, {meta['threads']} thread(s)\n"
                 "solid: measured, dashed: ideal (dense MACs / method MACs)", fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8)
    ax.grid(True, alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike[str], stem: str = "bench") -> tuple[Path, Path]:
    """``out_dir/stem.json`` (rows + metadata) and ``out_dir/stem.png`` (the speed-up plot)."""
    from prance.evaluation.evaluate import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_json(result, out / f"{stem}.json"), plot_speedups(result, out / f"{stem}.png")

