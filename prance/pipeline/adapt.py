"""``prance.adapt``: a dense ViT (or none) plus data in, a trained :class:`~prance.adaptive.AdaptiveViT` out.

The Python face of ``prance run``: the same stages in the same run folder, so calling it again
with the same arguments continues an interrupted run (or, when it is finished, only loads the
result), and other arguments for a finished stage are refused in one line as the command does.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prance.adaptive import AdaptiveViT


def adapt(
    model: str | os.PathLike[str] | None,
    data: str | os.PathLike[str] = "fashion-mnist",
    *,
    budget: float = 0.5,
    mode: str = "merge",
    out: str | os.PathLike[str] = "runs/adapt",
    schedule: str = "full",
    config: str | os.PathLike[str] | None = None,
    restart_from: str | None = None,
    device: str = "cpu",
    **overrides: Any,
) -> AdaptiveViT:
    """Train PRANCE for ``model`` on ``data`` at ``budget`` and return the fine-tuned adaptive model.

    ``model``: a local timm/DeiT checkpoint file (``timm:PATH`` or a plain path; fine-tuned on
    ``data`` when its classes differ), a prance dense checkpoint, or None to train the dense ViT
    first. ``data``: "fashion-mnist" or the path of an ImageNet-layout folder. ``mode``: the
    token reduction (merge, prune, prune_merge). ``schedule``: "full" (the headline recipe) or
    "demo". ``config``: a YAML file laid out like RUN/config.yaml. ``overrides``: any other
    setting of RUN/config.yaml, a stage's as a mapping, e.g. ``dense={"epochs": 5}``,
    ``selector={"updates": 100}``, ``limit=2000``, ``threads=2``. Arguments given here override the
    config file's values.

    Every stage runs in ``out`` (report included; see ``prance run``); the model returned is
    ``out/finetune/adaptive.pt`` (``out/round_up/adaptive.pt`` with ``round_up={"k": K}``), on ``device``.
    """
    from prance.adaptive import AdaptiveViT
    from prance.pipeline.config import prance_model
    from prance.pipeline.resolve import data_settings, resolve_config
    from prance.pipeline.run import run_pipeline

    given = {**overrides, "budget": budget, "mode": mode, "schedule": schedule, "device": device,
             **data_settings(str(data), overrides.get("data_dir")),
             "init": None if model is None else os.fspath(model)}
    cfg = resolve_config(config, given)
    run = run_pipeline(cfg, out, restart_from=restart_from)
    return AdaptiveViT.load(run / prance_model(cfg.round_up.k), device=device)


__all__ = ["adapt"]
