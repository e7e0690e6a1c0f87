"""``AdaptiveViT``: the meta-network, its selector and the execution engine as one module.

``AdaptiveViT(images)`` returns logits; every image got its own widths, MLP widths and token
counts from the selector, executed physically by the engine (DESIGN.md §5). After each call
:attr:`AdaptiveViT.last` holds what each image cost and chose. An image's decisions and
logits never depend on the other images of its batch: the selector sees only that image's
state, and the engine runs every image exactly as it would run alone.

The budget is an input. A selector trained for a budget range (``train-selector
--budget-range``) moves its operating point without retraining: :meth:`AdaptiveViT.set_budget`
sets the default, and ``AdaptiveViT(images, budget=b)`` gives each image its own (``[B]``);
the calibration record's knob curve lands the holdout mean on any budget of the range. A
selector trained for one budget serves that budget only and refuses any other.

Optionally every stage decision is rounded *up* to one of K representative decisions learned on
the holdout (:mod:`prance.selector.representatives`, :meth:`AdaptiveViT.fit_representatives`):
at most K distinct decisions per stage make larger groups in the engine, and no image gets
less compute than its selector asked for. They are learned at one budget (the model's when
fitted); calibrate with them in place so the mean lands on the budget.

It is saved and loaded as one versioned checkpoint file (kind ``"adaptive"``) holding the
meta-network, the selector with its calibration, the budget, the representatives if any and
the data split it was calibrated on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from prance.accounting import macs_per_sample, params_per_sample, token_fractions
from prance.engine import DynamicExecutor
from prance.engine.stepwise import budget_slot
from prance.errors import PranceError
from prance.model.metavit import MetaViT
from prance.plan import Plan
from prance.selector.budget import KnobCurve, check_budget
from prance.selector.representatives import Representatives, RoundUp, fit_representatives
from prance.selector.selector import Selector, SelectorConfig
from prance.training.checkpoint import atomic_save, load_checkpoint, make_checkpoint, model_from_checkpoint

KIND = "adaptive"
#: Checkpoint kinds that carry a selector (a selector run's checkpoints and the final file).
SELECTOR_KINDS = ("selector", "joint", KIND)


@dataclass(frozen=True)
class ImageStats:
    """What each image of the last batch chose and cost (all ``[B, ...]``, on the CPU)."""

    plan: Plan  # the executed per-image plan
    macs: torch.Tensor  # [B] MACs, selector included
    dense_macs: int  # MACs of the full-size network (no selector)
    params: torch.Tensor  # [B] parameters activated
    tokens: torch.Tensor  # [B, S] fraction of the patch tokens alive at the end of each stage
    budget: torch.Tensor | None = None  # [B] float64 budget each image was decided under

    @property
    def macs_ratio(self) -> torch.Tensor:
        return self.macs.double() / self.dense_macs

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per image (for JSON / CSV)."""
        out = []
        for i in range(len(self.macs)):
            out.append({"macs": int(self.macs[i]), "macs_ratio": float(self.macs_ratio[i]),
                        "params": int(self.params[i]), "tokens": [round(float(t), 4) for t in self.tokens[i]],
                        **({} if self.budget is None else {"budget": float(self.budget[i])}), **self.plan.to_dict(i)})
        return out


class AdaptiveViT(nn.Module):
    """Meta-network + selector + engine (see the module docstring)."""

    def __init__(self, model: MetaViT, selector: Selector, budget: float | None = None,
                 calibration: Mapping[str, Any] | None = None, split: Mapping[str, Any] | None = None,
                 representatives: Representatives | None = None) -> None:
        super().__init__()
        if selector.config != model.config or selector.space != model.space:
            raise PranceError("the selector was built for another model shape or search space; train a selector "
                              "for this meta-network")
        self.model, self.selector = model.eval(), selector.eval()
        self.calibration = dict(calibration or {})
        if "knob_curve" in self.calibration:
            selector.knob_curve = KnobCurve.from_dict(self.calibration["knob_curve"])
        self.split = dict(split or {})
        self.engine = DynamicExecutor(model)
        self._executed: tuple[Plan, torch.Tensor | None] | None = None  # plan and budgets of the last call
        self._last: ImageStats | None = None
        self.representatives = representatives
        self.budget = selector.cfg.budget
        self.set_budget(self.budget if budget is None else budget)

    @property
    def budget_range(self) -> tuple[float, float]:
        """The budgets this model serves: its trained range, or ``(b, b)`` for a selector of one budget ``b``."""
        return self.selector.cfg.budget_range or (self.selector.cfg.budget, self.selector.cfg.budget)

    def check_budget(self, budget: torch.Tensor | float) -> torch.Tensor:
        """``budget`` as ``[N]`` float64 on the CPU, refused in one line if any lies outside :attr:`budget_range`."""
        values = torch.as_tensor(budget, dtype=torch.float64).detach().cpu().reshape(-1)
        for b in values.unique().tolist():
            check_budget(b)
        low, high = self.budget_range
        slack = 1e-6 * high  # float32 budgets round in the 8th digit
        outside = values[(values < low - slack) | (values > high + slack)]
        if len(outside):
            served = (f"budgets {low:g} to {high:g}" if high > low else f"one budget, {low:g} (train with "
                      "`prance train-selector --budget-range` for a selector of many)")
            raise PranceError(f"budget {float(outside[0]):g} is outside what this adaptive model was trained and "
                              f"calibrated for: {served}")
        return values

    def set_budget(self, budget: float) -> "AdaptiveViT":
        """Move the default operating point to ``budget`` (no retraining; inside :attr:`budget_range`)."""
        self.budget = float(self.check_budget(float(budget))[0])
        return self

    def forward(self, images: torch.Tensor, budget: torch.Tensor | float | None = None) -> torch.Tensor:
        """Logits ``[B, classes]`` at ``budget`` (one for all, or ``[B]``; default :attr:`budget`).

        Per-image decisions and costs go to :attr:`last`."""
        budget = budget_slot(self.budget if budget is None else self.check_budget(budget), len(images))
        logits, plan = self.engine.run(images, policy=self.policy, budget=budget)
        self._executed, self._last = (plan, budget), None
        return logits

    @property
    def last(self) -> ImageStats | None:
        """What each image of the last batch chose and cost (None before the first call).

        Counted when first read, not in :meth:`forward`: the accounting walks every block in Python,
        a sizeable share of a small model's forward at batch 1 that a deployed model does not need."""
        if self._last is None and self._executed is not None:
            plan, budget = self._executed
            cfg = self.model.config
            self._last = ImageStats(plan=plan, macs=macs_per_sample(cfg, plan) + self.selector.macs_per_image(),
                                    dense_macs=int(macs_per_sample(cfg, self.model.full_plan)[0]),
                                    params=params_per_sample(cfg, plan), tokens=token_fractions(cfg, plan),
                                    budget=budget)
        return self._last

    # ------------------------------------------------------------------ representative decisions
    @property
    def policy(self) -> Selector | RoundUp:
        """What decides each stage: the selector, its decisions rounded up if representatives are set."""
        if self.representatives is None:
            return self.selector
        return RoundUp(self.selector, self.representatives, self.model.config)

    def fit_representatives(self, images: Sequence[torch.Tensor], k: int) -> Representatives:
        """Learn and set ``k`` representative decisions per stage from the selector's decisions on
        holdout ``images`` (batches) at the current budget and knob."""
        with torch.no_grad():
            self.representatives = fit_representatives(self.engine, self.selector, images, k, budget=self.budget)
        return self.representatives

    def set_representatives(self, representatives: Representatives | None) -> "AdaptiveViT":
        """Round decisions up to ``representatives`` (``None``: run the selector's own decisions)."""
        self.representatives = representatives
        return self

    # ------------------------------------------------------------------ files
    def checkpoint(self, metrics: Mapping[str, Any] | None = None, args: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
        """The versioned checkpoint dict of this adaptive model (``args``: how the run that made it was set)."""
        ckpt = make_checkpoint(self.model, KIND, metrics=metrics, args=args, split=self.split or None)
        ckpt["selector"] = selector_record(self.selector)
        ckpt["budget"] = self.budget
        ckpt["calibration"] = dict(self.calibration)
        if self.representatives is not None:
            ckpt["representatives"] = self.representatives.record()
        return ckpt

    def save(self, path: str | os.PathLike[str], metrics: Mapping[str, Any] | None = None,
             args: Mapping[str, Any] | None = None) -> Path:
        """Write the model to ``path`` atomically."""
        return atomic_save(self.checkpoint(metrics, args), path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu") -> "AdaptiveViT":
        """An adaptive model from a file written by :meth:`save` (or a selector run's checkpoint)."""
        ckpt = load_checkpoint(path, kind=SELECTOR_KINDS)
        return cls.from_checkpoint(ckpt, path).to(device)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any], path: str | os.PathLike[str] = "checkpoint"
                        ) -> "AdaptiveViT":
        model = model_from_checkpoint(ckpt)
        selector = selector_from_record(ckpt.get("selector"), model, path)
        reps = ckpt.get("representatives")  # files written before representatives existed have none
        reps = None if reps is None else Representatives.from_record(reps, model.config, model.space, str(path))
        return cls(model, selector, ckpt.get("budget"), ckpt.get("calibration"), ckpt.get("split"), reps)


def selector_record(selector: Selector) -> dict[str, Any]:
    """What a checkpoint stores of a selector: its settings and weights (plain values and tensors)."""
    return {"config": selector.cfg.to_dict(),
            "state": {k: v.detach().cpu().clone() for k, v in selector.state_dict().items()}}


def selector_from_record(record: Any, model: MetaViT, path: str | os.PathLike[str]) -> Selector:
    """The selector a checkpoint's ``selector`` record describes, for ``model``."""
    if not isinstance(record, Mapping) or "config" not in record or "state" not in record:
        raise PranceError(f"{path} holds no selector; give a checkpoint written by `prance train-selector`")
    try:
        # Files from before ``knob_mode`` calibrated a knob that shifts the discrete choices too.
        selector = Selector(model.config, model.space, SelectorConfig(**{"knob_mode": "shift", **record["config"]}))
        selector.load_state_dict(dict(record["state"]))
    except (TypeError, RuntimeError, KeyError) as e:
        raise PranceError(f"{path}: its selector does not fit its meta-network ({str(e).splitlines()[0][:120]}); "
                          "the file is corrupt or from another version") from None
    return selector.eval()


__all__ = ["AdaptiveViT", "ImageStats", "KIND", "SELECTOR_KINDS", "selector_from_record", "selector_record"]
