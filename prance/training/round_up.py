"""Representative decisions onto an adaptive model, calibrated with them in place (DESIGN.md §5).

Rounding every stage decision up to one of K representatives (:mod:`prance.selector.representatives`)
adds MACs, so the calibration knob found without it would overshoot the budget. Here the
knob is calibrated again with rounding active: at every knob value tried, the representatives
are learned anew from the selector's decisions there (they depend on the knob), then the mean
MACs (selector included) of the rounded model is measured; both on the holdout, as every
choice is (DESIGN.md §8). This costs about (S + 1) holdout passes per knob value tried. The
model without rounding is measured on the same images first, so the record pairs the lever's
cost in top-1 with its rounded figures.

:func:`round_up_file` does it to an existing ``adaptive.pt`` and writes a new file;
``prance train-selector --round-up K`` does it after training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from prance.adaptive import KIND, SELECTOR_KINDS, AdaptiveViT
from prance.data.held import HeldBatches
from prance.data.provenance import checkpoint_dataset
from prance.errors import PranceError
from prance.files import recorded_path
from prance.selector.budget import calibrate
from prance.training.checkpoint import load_checkpoint


@torch.no_grad()
def _measure(adaptive: AdaptiveViT, images: Sequence[torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Mean MACs ratio (selector included) of ``adaptive`` on ``images`` batches, and its predictions."""
    macs, predictions = [], []
    for x in images:
        predictions.append(adaptive(x).argmax(-1).cpu())
        macs.append(adaptive.last.macs.double())
    return float(torch.cat(macs).mean()) / adaptive.last.dense_macs, torch.cat(predictions)


def calibrate_with_round_up(adaptive: AdaptiveViT, holdout: Dataset, k: int, budget: float | None = None,
                            batch_size: int = 256) -> dict[str, Any]:
    """Set ``adaptive``'s knob and ``k`` representatives so its rounded mean MACs on ``holdout``
    land on ``budget`` (default: its own); returns (and stores) the calibration record."""
    if adaptive.selector.knob_curve is not None:
        raise PranceError("this adaptive model serves a budget range (a knob curve); rounding up is calibrated "
                          "at one budget: use a selector trained for one budget")
    budget = adaptive.budget if budget is None else float(adaptive.check_budget(budget)[0])
    device = adaptive.model.cls_token.device
    images = HeldBatches(holdout, device, batch_size)
    previous = {key: v for key, v in adaptive.calibration.items() if key != "without_round_up"}
    if adaptive.representatives is None:  # the lever's cost, paired: the model as given on these same images
        ratio, predictions = _measure(adaptive, images)
        previous["same_images"] = {"holdout_macs_ratio": ratio, "holdout_images": len(holdout),
                                   "holdout_top1": images.accuracy(predictions)}

    def ratio_at(knob: float) -> float:
        adaptive.selector.knob.fill_(knob)
        adaptive.fit_representatives(images, k)
        return _measure(adaptive, images)[0]

    adaptive.set_budget(budget)
    cal = calibrate(ratio_at, budget, tolerance=0.005 * budget)
    adaptive.selector.knob.fill_(cal.knob)
    adaptive.fit_representatives(images, k)
    ratio, predictions = _measure(adaptive, images)
    top1 = images.accuracy(predictions)
    adaptive.calibration = {"knob": cal.knob, "holdout_macs_ratio": ratio, "holdout_top1": top1,
                            "holdout_images": len(holdout), "iterations": cal.iterations, "round_up": k,
                            "without_round_up": previous}
    return adaptive.calibration


def round_up_file(checkpoint: str | os.PathLike[str], k: int, out: str | os.PathLike[str], *,
                  holdout_limit: int | None = None, data_dir: str | None = None, seed: int = 0,
                  batch_size: int = 256, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load an adaptive model, learn ``k`` representatives on its holdout with the knob calibrated
    again, and write the result to ``out`` (a new adaptive file); returns the calibration record."""
    ckpt = load_checkpoint(checkpoint, kind=SELECTOR_KINDS)
    if ckpt["kind"] != KIND:
        raise PranceError(f"{checkpoint} is a {ckpt['kind']} checkpoint; give the adaptive.pt a finished "
                          "`prance train-selector` wrote")
    adaptive = AdaptiveViT.from_checkpoint(ckpt, checkpoint).to(device)
    holdout = checkpoint_dataset(ckpt, str(checkpoint), split="holdout", data_dir=data_dir, limit=holdout_limit,
                                 seed=seed)
    record = calibrate_with_round_up(adaptive, holdout, k, batch_size=batch_size)
    adaptive.save(Path(out), metrics={"holdout_top1": record["holdout_top1"],
                                      "holdout_macs_ratio": record["holdout_macs_ratio"]},
                  args={"adaptive": recorded_path(checkpoint), "round_up": k, "holdout_limit": holdout_limit, "seed": seed})
    return record


__all__ = ["calibrate_with_round_up", "round_up_file"]
