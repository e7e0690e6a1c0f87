"""How methods are timed, in the manner of timm's ``benchmark.py``.

Every input is a tensor made before timing starts (data loading is never timed), each method
gets warm-up calls and then timed calls under ``torch.inference_mode()``, with the device
synchronised around every timed call.

Timed runs are split into ``rounds``: in each round every method runs its share of timed calls
back to back (after one untimed call that re-warms the caches), and the method order rotates.
On a shared machine this keeps slow drifts in load from biasing one method, so the
speed-up ratios of one run are comparable even when absolute times are noisy.

Before timing, glibc's allocator is told to keep freed memory (:func:`steady_allocator`), so
no method pays page faults for its activations; ``profile_dir`` adds, per method and batch
size, the operators the time went to.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from prance.accounting import macs_per_sample
from prance.adaptive import AdaptiveViT
from prance.bench.methods import METHODS, Method, MethodOptions, build_methods
from prance.bench.plans import differing_decisions, selector_plans
from prance.bench.report import loadavg, measurement_row, run_record
from prance.config import ViTConfig
from prance.errors import PranceError
from prance.model.metavit import MetaViT
from prance.plan import Plan

DEFAULT_BATCH_SIZES = (1, 8, 64)


def check_args(batch_sizes: Sequence[int], methods: Sequence[str], target: float, runs: int, warmup: int,
               rounds: int) -> None:
    """Every benchmark setting the user gives, checked before anything runs (one-line errors)."""
    if not batch_sizes:
        raise PranceError("give at least one batch size, e.g. --batch-sizes 1,8,64")
    bad = [b for b in batch_sizes if not isinstance(b, int) or b < 1]
    if bad:
        raise PranceError(f"batch sizes must be positive whole numbers, got {bad[0]}; e.g. --batch-sizes 1,8,64")
    if not methods:
        raise PranceError(f"give at least one method: {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PranceError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if "dense-timm" not in methods and "dense" not in methods:
        raise PranceError("speed-ups need a reference: include dense-timm (or dense) in --methods")
    if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= 1):
        raise PranceError(f"--target-macs is a fraction of the dense MACs in (0, 1], got {target}")
    if runs < 1:
        raise PranceError(f"--runs must be at least 1, got {runs}")
    if warmup < 0:
        raise PranceError(f"--warmup must be >= 0, got {warmup}")
    if rounds < 1:
        raise PranceError(f"--rounds must be at least 1, got {rounds}")


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def benchmark(
    model: MetaViT | AdaptiveViT,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    methods: Sequence[str] = METHODS,
    target_macs: float | None = None,
    runs: int = 20,
    warmup: int = 5,
    rounds: int = 4,
    images: torch.Tensor | None = None,
    images_label: str | None = None,
    image_indices: Sequence[int] | None = None,
    pool: int | None = None,
    options: MethodOptions | None = None,
    seed: int = 0,
    model_label: str = "model",
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    profile_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Time every method at every batch size; returns ``{"meta": {...}, "rows": [...]}``.

    With ``profile_dir``, each method is also run under ``torch.profiler`` after its timing
    and the operators it spent its time in are written to ``profile-<method>-b<batch>.txt``.

    ``images`` (pre-loaded, ``[N, C, H, W]``) are cycled through; without them random
    normal images are made. ``pool`` images (default: at least 64 and the largest batch)
    are split into batches, and timed run ``k`` uses batch ``k`` mod the number of batches,
    so at small batch sizes per-image plans vary from run to run as they would in use.
    MACs, parameters and tokens of per-image methods are averaged over the images of the
    timed runs. ``image_indices`` (where the images sit in their split) are recorded.

    ``target_macs`` is a fraction of the dense MACs (default 0.5). With an
    :class:`~prance.adaptive.AdaptiveViT` as ``model``, PRANCE is that model deciding for itself
    (:func:`~prance.bench.methods.adaptive_method`) on ``images``, which must be real images; the
    target is its mean MACs on them, selector included, and the baselines are matched to that.
    After each batch size the plans the timed calls executed are compared with the costed ones.
    """
    methods = list(dict.fromkeys(methods))
    batch_sizes = list(batch_sizes)
    adaptive = model if isinstance(model, AdaptiveViT) else None
    if adaptive is not None:
        _check_adaptive(target_macs, images, options)
        model = adaptive.model
    target = 0.5 if target_macs is None else target_macs
    check_args(batch_sizes, methods, target, runs, warmup, rounds)
    rounds = min(rounds, runs)
    log = log or (lambda s: None)
    device = torch.device(device)
    (model if adaptive is None else adaptive).eval().to(device)
    cfg = model.config
    pool = max(64, *batch_sizes) if pool is None else pool
    if pool < max(batch_sizes):
        raise PranceError(f"the image pool ({pool}) must hold the largest batch ({max(batch_sizes)})")
    if images is None:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(pool, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
        images_label = images_label or f"random normal images ({pool}, pre-generated)"
    else:
        model.check_input(images)
        cycle = torch.arange(pool) % len(images)
        images = images[cycle].contiguous()
        images_label = images_label or f"{len(images)} pre-loaded images"
        if image_indices is not None:
            image_indices = [int(image_indices[i]) for i in cycle]
    decisions = None
    if adaptive is not None:
        decisions = selector_plans(adaptive, images.to(device, model.head.weight.dtype), max(batch_sizes))
        target = min(1.0, float(decisions.macs_ratio.mean()))
        options = replace(options or MethodOptions(), adaptive=adaptive, decisions=decisions)
        log(f"selector plans: {float(decisions.macs_ratio.mean()):.4f} x dense MACs on average over {pool} images "
            "(selector included); the baselines are matched to that")

    allocator = steady_allocator()
    layout: dict[str, list[Plan]] = {"plans": []}  # per-image plans of each batch, for the current batch size
    built = build_methods(model, methods, pool, target, lambda j: layout["plans"][j], options, seed=seed)
    reference = "dense-timm" if "dense-timm" in built else "dense"
    pool_plans = next((m.pool_plans for m in built.values() if m.pool_plans is not None), None)
    dense_macs = float(macs_per_sample(cfg)[0])
    load_before = loadavg()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for b in batch_sizes:
        n_batches = max(1, min(pool // b, warmup + runs + rounds))
        index = [torch.arange(j * b, (j + 1) * b) for j in range(n_batches)]
        xs = [images[i].to(device, model.head.weight.dtype).contiguous() for i in index]
        layout["plans"] = [pool_plans.select(i) for i in index] if pool_plans is not None else []
        log(f"batch {b}: {len(built)} methods x ({warmup} warm-up + {runs} timed runs in {rounds} rounds) "
            f"over {n_batches} distinct batch(es)")
        times = _time_methods(list(built.values()), xs, runs, warmup, rounds)
        batch_rows = []
        for name, m in built.items():
            timed = torch.cat([index[j] for j, _ in times[name]])
            batch_rows.append(measurement_row(m, b, [t for _, t in times[name]], timed, dense_macs))
            if m.decides is not None:
                batch_rows[-1].update(_check_decisions(m, xs, layout["plans"], {j for j, _ in times[name]}, cfg, log))
        ref = next(r for r in batch_rows if r["method"] == reference)
        for row in batch_rows:
            row["speedup"] = ref["ms_median"] / row["ms_median"]
            row["ideal_speedup"] = ref["gmacs"] / row["gmacs"]
            row["efficiency"] = row["speedup"] / row["ideal_speedup"]
            log(f"  {row['method']:>14}: {row['ms_median']:9.2f} ms/batch  speed-up {row['speedup']:.2f}x "
                f"(ideal {row['ideal_speedup']:.2f}x)")
        rows.extend(batch_rows)
        if profile_dir is not None:
            for name, m in built.items():
                path = write_profile(m, xs, Path(profile_dir) / f"profile-{name}-b{b}.txt", calls=max(1, min(runs, 5)))
                log(f"  profile of {name} -> {path}")
    meta = run_record(model, model_label, built, reference, batch_sizes, target, runs, warmup, rounds, pool,
                      images_label, seed, command, load_before, time.perf_counter() - started)
    meta["image_indices"] = None if image_indices is None else list(image_indices)
    if decisions is not None:
        meta["selector"] = {"macs_ratio": float(decisions.macs_ratio.mean()), "budget": adaptive.budget,
                            "macs": decisions.macs.tolist(), "plans": [decisions.plan.to_dict(i) for i in range(pool)]}
    meta["allocator"] = allocator
    meta["device"] = str(device)
    meta["dtype"] = str(model.head.weight.dtype).removeprefix("torch.")
    return {"meta": meta, "rows": rows}


def _check_adaptive(target_macs: float | None, images: torch.Tensor | None, options: MethodOptions | None) -> None:
    """An adaptive model sets its own target and plans, and decides from real images."""
    o = options or MethodOptions()
    if target_macs is not None:
        raise PranceError("an adaptive model's own mean MACs are the target; drop --target-macs (or benchmark its "
                          "meta-network checkpoint at a target)")
    if o.plans is not None or o.distinct_plans is not None or o.keep_grid is not None:
        raise PranceError("an adaptive model decides its own per-image plans; drop --plans, --distinct-plans and "
                          "--keep-grid")
    if images is None:
        raise PranceError("an adaptive model decides from the images it sees; time it on real images (its data "
                          "set's test split), not random ones")


def _check_decisions(m: Method, xs: list[torch.Tensor], costed: list[Plan], timed: set[int], config: ViTConfig,
                     log: Callable[[str], None]) -> dict[str, int]:
    """How many images of the batches ``timed`` ``m`` decides differently from the plans it is costed by
    (one more untimed call per batch: its decisions are deterministic, so the timed calls made the same)."""
    assert m.decides is not None
    checked = sum(costed[j].batch_size for j in timed)
    differing = sum(int(differing_decisions(m.decides(xs[j]), costed[j], config).sum()) for j in sorted(timed))
    if differing:
        log(f"  warning: {m.name} decided {differing} of {checked} images differently when timed than when "
            "costed; its MACs are those of the costed plans")
    return {"decisions_checked": checked, "decisions_differing": differing}


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator() -> str:
    """Keep freed memory for reuse, so no method is timed paging fresh memory in (glibc only).

    By default glibc hands blocks above a moving threshold back to the kernel on free, and the
    next call of the same size page-faults them in again. That costs the dense baselines, with
    their large activations, up to 20 % of their time on this CPU and makes them noisy.
    Raising the mmap and trim thresholds (as ``GLIBC_TUNABLES`` would) keeps every method on
    warm memory. Returns what was done, for the result's metadata.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.libc_ver()[0] != "glibc":
        return "system default (not glibc)"
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 256 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc, mmap/trim thresholds raised to 256 MiB / 1 GiB" if ok else "glibc default (mallopt failed)"


def write_profile(method: Method, xs: list[torch.Tensor], path: Path, calls: int = 5, rows: int = 25) -> Path:
    """Where ``method``'s time goes: torch.profiler operator totals over ``calls`` calls, per call."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        method.forward(xs[0], 0)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for k in range(calls):
                method.forward(xs[k % len(xs)], k % len(xs))
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"{method.name}: {calls} call(s), {total / calls / 1e3:.2f} ms of operator self time per call "
             "(profiler overhead included)", "", f"{'operator':<52} {'ms/call':>9} {'share':>7} {'calls/call':>11}"]
    for e in events[:rows]:
        lines.append(f"{e.key[:52]:<52} {e.self_cpu_time_total / calls / 1e3:9.3f} "
                     f"{e.self_cpu_time_total / max(total, 1):7.1%} {e.count / calls:11.1f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _time_methods(methods: list[Method], xs: list[torch.Tensor], runs: int, warmup: int,
                  rounds: int) -> dict[str, list[tuple[int, float]]]:
    """``{method: [(batch index, seconds), ...]}`` of the timed calls (see the module docstring)."""
    calls = {m.name: 0 for m in methods}
    timed: dict[str, list[tuple[int, float]]] = {m.name: [] for m in methods}

    def call(m: Method) -> tuple[int, float]:
        j = calls[m.name] % len(xs)
        calls[m.name] += 1
        synchronize(xs[j].device)  # a GPU times only this call's kernels, all of them
        t0 = time.perf_counter()
        m.forward(xs[j], j)
        synchronize(xs[j].device)
        return j, time.perf_counter() - t0

    with torch.inference_mode():
        for m in methods:
            # Per-image methods warm up on every distinct batch once: the engine caches weight
            # views per (block, size) on first use, a one-time cost that steady serving never pays.
            for _ in range(max(warmup, len(xs)) if m.pool_plans is not None and warmup > 0 else warmup):
                call(m)
        for r, share in enumerate(_split(runs, rounds)):
            for m in methods[r % len(methods):] + methods[: r % len(methods)]:
                if r > 0 or warmup == 0:
                    call(m)  # untimed: re-warm the caches the other methods used
                timed[m.name].extend(call(m) for _ in range(share))
    return timed


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (a no-op on CPU, where calls return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

