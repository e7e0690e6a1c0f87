"""Budgets by constraint (DESIGN.md §3): the MACs penalty is a Lagrange multiplier, not a knob.

The user states a budget — mean MACs as a fraction of the dense model's, selector included.
Training maximises accuracy subject to ``E[MACs ratio] ≤ budget``; its Lagrangian puts
``λ · MACs ratio`` into every reward, and λ follows dual ascent: it grows while the policy
spends more than the budget and shrinks (never below 0) while it spends less. With several
budgets (one selector for many budgets) each budget bin has its own λ.

Training only brings the mean *near* the budget; :func:`calibrate` then places it on the
budget on the holdout by bisection over one monotone knob of the deployed selector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prance.errors import PranceError


def check_budget(budget: float) -> float:
    """A budget must be a fraction of the dense MACs in (0, 1]."""
    budget = float(budget)
    if not 0.0 < budget <= 1.0:
        raise PranceError(f"budget {budget} must be a fraction of the dense MACs in (0, 1], e.g. 0.5; "
                          "give GMACs with --gmacs instead")
    return budget


class DualAscent:
    """λ per budget bin, updated by projected dual ascent on the observed mean MACs ratio.

    ``budgets`` are the bins' centres (one bin for a fixed budget). ``lr`` is the dual step
    size; λ starts at ``init``. The observed cost is smoothed by an exponential moving
    average (``smoothing``) so one noisy rollout does not whip λ around.
    """

    def __init__(self, budgets: list[float], lr: float = 0.05, init: float = 0.5, smoothing: float = 0.5) -> None:
        if not budgets:
            raise PranceError("dual ascent needs at least one budget")
        if lr <= 0 or init < 0 or not 0 <= smoothing < 1:
            raise PranceError("dual ascent needs lr > 0, init >= 0 and smoothing in [0, 1)")
        self.budgets = torch.tensor([check_budget(b) for b in budgets], dtype=torch.float64)
        self.lam = torch.full_like(self.budgets, float(init))
        self.cost = torch.full_like(self.budgets, float("nan"))
        self.lr, self.smoothing = lr, smoothing

    def bin_of(self, budget: torch.Tensor) -> torch.Tensor:
        """``[B]`` index of the nearest budget bin of each image's budget."""
        return (budget.to(torch.float64).cpu()[:, None] - self.budgets[None]).abs().argmin(1)

    def lam_of(self, budget: torch.Tensor) -> torch.Tensor:
        """``[B]`` λ of each image's budget bin (on ``budget``'s device)."""
        return self.lam[self.bin_of(budget)].to(budget.device)

    def update(self, budget: torch.Tensor, macs_ratio: torch.Tensor) -> None:
        """One dual step per bin seen in this rollout: ``λ ← max(0, λ + lr · (cost − budget))``."""
        bins = self.bin_of(budget)
        ratio = macs_ratio.detach().to(torch.float64).cpu()
        for k in bins.unique().tolist():
            mean = float(ratio[bins == k].mean())
            prev = float(self.cost[k])
            self.cost[k] = mean if prev != prev else self.smoothing * prev + (1 - self.smoothing) * mean
            self.lam[k] = max(0.0, float(self.lam[k]) + self.lr * (float(self.cost[k]) - float(self.budgets[k])))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"budgets": self.budgets.clone(), "lam": self.lam.clone(), "cost": self.cost.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not torch.equal(state["budgets"], self.budgets):
            raise PranceError(f"saved λ are for budgets {state['budgets'].tolist()}, not {self.budgets.tolist()}; "
                              "resume with the same budget settings")
        self.lam, self.cost = state["lam"].clone(), state["cost"].clone()


@dataclass(frozen=True)
class Calibration:
    """Where calibration put the knob, and the mean MACs ratio it measured there."""

    knob: float
    macs_ratio: float
    iterations: int


def calibrate(mean_ratio_at: Callable[[float], float], budget: float, lo: float = -1.0, hi: float = 1.0,
              tolerance: float = 0.005, max_iter: int = 30, grid: int = 9) -> Calibration:
    """The knob value in ``[lo, hi]`` whose mean MACs ratio is closest to ``budget``.

    ``mean_ratio_at(knob)`` should grow with the knob (a shift of every raw action towards the
    large end), but a trained selector need not make it monotone: its later decisions react to
    the earlier, shifted ones. So a coarse scan of ``grid`` knob values comes first, then
    bisection inside the first interval whose ends straddle the budget. The closest point seen
    anywhere is returned; the search stops once within ``tolerance`` (absolute, as a fraction of
    dense MACs) or after ``max_iter`` evaluations. An unreachable budget gets the nearest point.
    """
    budget = check_budget(budget)
    knobs = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]
    seen = [(k, mean_ratio_at(k)) for k in knobs]
    best = min(seen, key=lambda p: (abs(p[1] - budget), p[1] > budget))
    bracket = next(((a, b) for a, b in zip(seen, seen[1:]) if (a[1] - budget) * (b[1] - budget) <= 0), None)
    iterations = len(seen)
    while bracket is not None and iterations < max_iter and abs(best[1] - budget) > tolerance:
        (k_lo, f_lo), (k_hi, f_hi) = bracket
        mid = 0.5 * (k_lo + k_hi)
        f_mid = mean_ratio_at(mid)
        iterations += 1
        if (abs(f_mid - budget), f_mid > budget) < (abs(best[1] - budget), best[1] > budget):
            best = (mid, f_mid)
        bracket = ((k_lo, f_lo), (mid, f_mid)) if (f_lo - budget) * (f_mid - budget) <= 0 else ((mid, f_mid),
                                                                                               (k_hi, f_hi))
    return Calibration(best[0], best[1], iterations)


__all__ = ["Calibration", "DualAscent", "calibrate", "check_budget"]
