"""Budgets by constraint (DESIGN.md §3): the MACs penalty is a Lagrange multiplier, not a knob.

The user states a budget — mean MACs as a fraction of the dense model's, selector included.
Training maximises accuracy subject to ``E[MACs ratio] ≤ budget``; its Lagrangian puts
``λ · MACs ratio`` into every reward, and λ follows dual ascent: it grows while the policy
spends more than the budget and shrinks (never below 0) while it spends less.

One selector for many budgets: the budget is drawn per image from a range, and λ becomes a
piecewise-linear function of it, one multiplier per budget knot (:class:`DualAscent`).

Training only brings the mean *near* the budget; :func:`calibrate` then places it on the
budget on the holdout by a search over one monotone knob of the deployed selector. For a
range, :func:`calibrate_range` does so at every knot and the knob between knots is read off
a piecewise-linear :class:`KnobCurve`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from prance.errors import PranceError


def check_budget(budget: float) -> float:
    """A budget must be a fraction of the dense MACs in (0, 1]."""
    budget = float(budget)
    if not 0.0 < budget <= 1.0:
        raise PranceError(f"budget {budget} must be a fraction of the dense MACs in (0, 1], e.g. 0.5; "
                          "give GMACs with --gmacs instead")
    return budget


def check_budget_range(budget_range: Sequence[float]) -> tuple[float, float]:
    """A budget range ``(low, high)``: two budgets with ``low < high``."""
    if len(budget_range) != 2:
        raise PranceError(f"a budget range is two fractions low,high, e.g. 0.3,0.8; got {list(budget_range)}")
    low, high = (check_budget(b) for b in budget_range)
    if not low < high:
        raise PranceError(f"budget range {low},{high} must have low < high, e.g. 0.3,0.8 (one budget: --budget)")
    return low, high


def budget_knots(budget_range: Sequence[float], bins: int) -> list[float]:
    """``bins`` budgets evenly spaced from the range's low end to its high end, both included."""
    low, high = check_budget_range(budget_range)
    if bins < 2:
        raise PranceError(f"a budget range needs at least 2 budget bins, got {bins}")
    return [low + (high - low) * i / (bins - 1) for i in range(bins)]


def _segment(knots: torch.Tensor, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left knot index and position ``t`` ∈ [0, 1] of each budget between it and the next (ends clamped)."""
    if len(knots) == 1:
        return torch.zeros(budget.shape, dtype=torch.long), torch.zeros(budget.shape, dtype=torch.float64)
    b = budget.to(torch.float64).cpu().clamp(float(knots[0]), float(knots[-1]))
    left = (torch.searchsorted(knots, b, right=True) - 1).clamp(0, len(knots) - 2)
    return left, (b - knots[left]) / (knots[left + 1] - knots[left])


class DualAscent:
    """λ as a piecewise-linear function of the budget, one multiplier per knot, by projected dual ascent.

    ``budgets`` are the knots (one for a fixed budget: λ is then one number). An image whose
    budget lies a fraction ``t`` of the way from knot ``k`` to ``k + 1`` gets
    ``λ = (1 − t) λ_k + t λ_{k+1}``: these hat weights ``w_k(b)`` make the Lagrangian of the
    constraints ``E[w_k(b) · (MACs ratio − b)] ≤ 0`` (one per knot) exactly that λ times the
    image's cost, and knot ``k`` ascends on the ``w_k``-weighted mean excess of cost over budget.
    The nearest knot's λ alone would make the incentive a staircase in the budget, and the
    policy's cost with it, which no interpolation of the calibration knob can follow.

    ``lr`` is the dual step size; λ starts at ``init``. The observed cost and budget of each
    knot are smoothed by an exponential moving average (``smoothing``), so one noisy rollout
    does not whip λ around.
    """

    def __init__(self, budgets: list[float], lr: float = 0.05, init: float = 0.5, smoothing: float = 0.5) -> None:
        if not budgets:
            raise PranceError("dual ascent needs at least one budget")
        if lr <= 0 or init < 0 or not 0 <= smoothing < 1:
            raise PranceError("dual ascent needs lr > 0, init >= 0 and smoothing in [0, 1)")
        self.budgets = torch.tensor([check_budget(b) for b in budgets], dtype=torch.float64)
        if bool((self.budgets[1:] <= self.budgets[:-1]).any()):
            raise PranceError(f"dual ascent needs increasing budget knots, got {budgets}")
        self.lam = torch.full_like(self.budgets, float(init))
        self.cost = torch.full_like(self.budgets, float("nan"))
        self.target = self.budgets.clone()
        self.lr, self.smoothing = lr, smoothing

    def weights(self, budget: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` hat weights of each image's budget on the knots (rows sum to 1)."""
        left, t = _segment(self.budgets, budget.reshape(-1))
        w = torch.zeros(len(left), len(self.budgets), dtype=torch.float64)
        w.scatter_(1, left[:, None], (1 - t)[:, None])
        if len(self.budgets) > 1:
            w.scatter_add_(1, left[:, None] + 1, t[:, None])
        return w

    def lam_of(self, budget: torch.Tensor) -> torch.Tensor:
        """``[B]`` λ at each image's budget (on ``budget``'s device)."""
        return (self.weights(budget) @ self.lam).to(budget.device)

    def moments(self, budget: torch.Tensor, macs_ratio: torch.Tensor) -> torch.Tensor:
        """``[3, K]`` sums over a rollout's images: weight, weight · cost, weight · budget per knot.

        Sums, not means, so processes can add theirs (``all_reduce``) before one :meth:`step`."""
        w = self.weights(budget)
        ratio = macs_ratio.detach().to(torch.float64).cpu().reshape(-1, 1)
        return torch.stack([w.sum(0), (w * ratio).sum(0), (w * budget.to(torch.float64).cpu()[:, None]).sum(0)])

    def step(self, moments: torch.Tensor) -> None:
        """One dual step per knot the rollout touched: ``λ ← max(0, λ + lr · (cost − budget))``."""
        weight, cost, budget = moments.to(torch.float64).cpu()
        for k in torch.nonzero(weight > 0).flatten().tolist():
            mean_cost, mean_budget = float(cost[k] / weight[k]), float(budget[k] / weight[k])
            if self.cost[k].isnan():
                self.cost[k], self.target[k] = mean_cost, mean_budget
            else:
                a = self.smoothing
                self.cost[k] = a * self.cost[k] + (1 - a) * mean_cost
                self.target[k] = a * self.target[k] + (1 - a) * mean_budget
            self.lam[k] = max(0.0, float(self.lam[k]) + self.lr * float(self.cost[k] - self.target[k]))

    def update(self, budget: torch.Tensor, macs_ratio: torch.Tensor) -> None:
        """One dual step on one process's rollout (``budget`` and ``macs_ratio`` per image)."""
        self.step(self.moments(budget, macs_ratio))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"budgets": self.budgets.clone(), "lam": self.lam.clone(), "cost": self.cost.clone(),
                "target": self.target.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if not torch.equal(state["budgets"], self.budgets):
            raise PranceError(f"saved λ are for budgets {state['budgets'].tolist()}, not {self.budgets.tolist()}; "
                              "resume with the same budget settings")
        self.lam, self.cost = state["lam"].clone(), state["cost"].clone()
        # Runs of one fixed budget saved no smoothed budget: it was the budget itself.
        self.target = state["target"].clone() if "target" in state else self.budgets.clone()


@dataclass(frozen=True)
class Calibration:
    """Where calibration put the knob, and the mean MACs ratio it measured there."""

    knob: float
    macs_ratio: float
    iterations: int


def calibrate(mean_ratio_at: Callable[[float], float], budget: float, lo: float = -1.0, hi: float = 1.0,
              tolerance: float = 0.005, max_iter: int = 30, grid: int = 9) -> Calibration:
    """The knob value in ``[lo, hi]`` whose mean MACs ratio is closest to ``budget``.

    ``mean_ratio_at(knob)`` should grow with the knob (it moves every decision towards the large
    end), but a trained selector need not make it monotone: its later decisions react to the
    earlier, moved ones. So a coarse scan of ``grid`` knob values comes first, then
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


@dataclass(frozen=True)
class KnobCurve:
    """The calibration knob as a function of the budget: piecewise linear through calibrated points.

    ``budgets`` increase strictly; beyond either end the knob of that end holds. The knob
    itself need not be monotone in the budget (the selector already spends more when shown a
    larger budget; the knob only corrects what is left), only the budget axis is ordered.
    """

    budgets: tuple[float, ...]
    knobs: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.budgets or len(self.budgets) != len(self.knobs):
            raise PranceError("a knob curve needs as many knobs as budgets, at least one; recalibrate the selector")
        if any(b >= c for b, c in zip(self.budgets, self.budgets[1:])):
            raise PranceError(f"a knob curve needs increasing budgets, got {list(self.budgets)}")

    def __call__(self, budget: torch.Tensor) -> torch.Tensor:
        """``[B]`` float64 knob at each budget (on the CPU)."""
        knots = torch.tensor(self.budgets, dtype=torch.float64)
        knobs = torch.tensor(self.knobs, dtype=torch.float64)
        left, t = _segment(knots, budget.reshape(-1))
        if len(knots) == 1:
            return knobs[left]
        return (1 - t) * knobs[left] + t * knobs[left + 1]

    def to_dict(self) -> dict[str, list[float]]:
        return {"budgets": list(self.budgets), "knobs": list(self.knobs)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KnobCurve":
        return cls(tuple(float(b) for b in d["budgets"]), tuple(float(k) for k in d["knobs"]))


def calibrate_range(mean_ratio_at: Callable[[float, float], float], budgets: Sequence[float],
                    relative_tolerance: float = 0.005) -> tuple[KnobCurve, list[Calibration]]:
    """:func:`calibrate` at each of ``budgets`` (``mean_ratio_at(budget, knob)``), joined into a curve."""
    cals = [calibrate(lambda k, b=b: mean_ratio_at(b, k), b, tolerance=relative_tolerance * b) for b in budgets]
    return KnobCurve(tuple(float(b) for b in budgets), tuple(c.knob for c in cals)), cals


__all__ = ["Calibration", "DualAscent", "KnobCurve", "budget_knots", "calibrate", "calibrate_range", "check_budget",
           "check_budget_range"]
