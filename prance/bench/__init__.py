"""Wall-clock benchmark of PRANCE and its baselines at matched MACs (DESIGN.md §5, §6).

In the manner of timm's ``benchmark.py``: inputs are tensors made before timing, every method
gets warm-up and timed calls under ``torch.inference_mode()``, and the result is a list of
rows (JSON) plus a table and a plot. One module per concern:

* :mod:`~prance.bench.methods` — what is timed (dense timm and ours, EViT, ToMe, the static
  subnet, PRANCE's engine) and how each is matched to the MACs target;
* :mod:`~prance.bench.plans`   — the per-image plans PRANCE runs: an adaptive model's own (selector
  plans), random ones at the target, or a file's;
* :mod:`~prance.bench.timing`  — warm-up, interleaved timed rounds, device synchronisation, profiles;
* :mod:`~prance.bench.report`  — rows, the run's record, table, JSON and PNG;
* :mod:`~prance.bench.inputs`  — the model (checkpoint, timm weights or preset) and its images.

``prance bench`` (:mod:`prance.cli.bench`) is the command line on top.
"""

from prance.bench.inputs import Images, Subject, load_images, load_model
from prance.bench.methods import (METHODS, Method, MethodOptions, adaptive_method, build_methods, match_evit_keep,
                                  match_tome_r, reducer_macs, search_static_plan, token_fraction)
from prance.bench.plans import load_plans, load_static_plan, random_plans, select_mean, selector_plans
from prance.bench.report import format_table, plot_speedups, write_outputs
from prance.bench.timing import DEFAULT_BATCH_SIZES, benchmark, check_args, steady_allocator

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "Images",
    "METHODS",
    "Method",
    "MethodOptions",
    "Subject",
    "adaptive_method",
    "benchmark",
    "build_methods",
    "check_args",
    "format_table",
    "load_images",
    "load_model",
    "load_plans",
    "load_static_plan",
    "match_evit_keep",
    "match_tome_r",
    "plot_speedups",
    "random_plans",
    "reducer_macs",
    "search_static_plan",
    "select_mean",
    "selector_plans",
    "steady_allocator",
    "token_fraction",
    "write_outputs",
]
