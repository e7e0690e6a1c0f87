"""The Result-to-Go reward's parts and the budget machinery (dual ascent, calibration)."""

from __future__ import annotations

import pytest
import torch

from prance.errors import PranceError
from prance.selector.budget import DualAscent, KnobCurve, budget_knots, calibrate, calibrate_range, check_budget
from prance.selector.ppo import gae
from prance.selector.reward import StepReward, relative_accuracy, step_reward, step_rewards


def test_accuracy_is_relative_to_the_dense_model():
    labels = torch.tensor([0, 0, 0, 0])
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # right, wrong, right, wrong
    dense_correct = torch.tensor([True, True, False, False])
    # dense right & run right -> 1; dense right & run wrong -> 0; dense wrong -> 1 either way
    assert relative_accuracy(logits, labels, dense_correct).tolist() == [1.0, 0.0, 1.0, 1.0]


def test_step_reward_subtracts_the_priced_macs_and_kept_tokens():
    r = step_reward(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]), torch.tensor([True, True]),
                    macs=torch.tensor([50, 100]), dense_macs=100.0, kept=torch.tensor([0.5, 1.0]))
    total = r.total(lam=torch.tensor([0.4, 0.2]), keep_penalty=0.1)
    assert torch.allclose(total, torch.tensor([1 - 0.4 * 0.5 - 0.05, 0 - 0.2 * 1.0 - 0.1]))


def _three_steps() -> list[StepReward]:
    """Outcomes of a 3-step rollout of two images: stage-by-stage cheaper runs, image 1 lost at step 2."""
    return [StepReward(torch.tensor([1.0, 1.0]), torch.tensor([0.8, 0.9]), torch.tensor([0.5, 1.0])),
            StepReward(torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.7]), torch.tensor([0.7, 0.5])),
            StepReward(torch.tensor([1.0, 0.0]), torch.tensor([0.45, 0.5]), torch.tensor([1.0, 0.25]))]


def test_outcome_rewards_are_each_steps_own_outcome():
    parts, lam = _three_steps(), torch.tensor([0.3, 0.6])
    rewards = step_rewards(parts, lam, 0.1, "outcome", full_macs_ratio=1.01)
    assert torch.allclose(rewards, torch.stack([p.total(lam, 0.1) for p in parts]))


def test_gain_rewards_return_the_deployed_runs_outcome_less_what_the_state_had_secured():
    """With γ = 1 every step's return is the final (deployed) run's outcome minus the outcome before
    that step (the full-size run before step 1), less the keep penalties of that step and later ones."""
    parts, lam, kp, full = _three_steps(), torch.tensor([0.3, 0.6]), 0.1, 1.01
    rewards = step_rewards(parts, lam, kp, "gain", full_macs_ratio=full)
    outcome = [p.accuracy - lam * p.macs_ratio for p in parts]
    before = [1.0 - lam * full, outcome[0], outcome[1]]
    _, returns = gae(rewards, torch.zeros_like(rewards), gamma=1.0, lam=1.0)
    for t in range(3):
        kept = sum(parts[k].kept for k in range(t, 3))
        assert torch.allclose(returns[t], outcome[2] - before[t] - kp * kept)
    # image 1 lost the dense model's answer at step 2: that step, and no other, is charged the accuracy
    assert rewards[1, 1] == pytest.approx(-1.0 - 0.6 * (0.7 - 0.9) - 0.1 * 0.5)
    with pytest.raises(ValueError, match="none of"):
        step_rewards(parts, lam, kp, "sum", full_macs_ratio=full)


def test_dual_ascent_drives_a_cost_responsive_policy_onto_its_budget():
    """A stand-in policy whose mean cost falls as λ rises (as a reward-maximising selector's does)."""
    gen = torch.Generator().manual_seed(0)
    controller = DualAscent([0.4], lr=0.2, init=0.0)
    for _ in range(300):
        lam = float(controller.lam[0])
        cost = (0.9 - 0.3 * lam + 0.02 * torch.randn(256, generator=gen, dtype=torch.float64)).clamp(0.2, 1.0)
        controller.update(torch.full((256,), 0.4), cost)
    assert abs(float(controller.cost[0]) - 0.4) < 0.01
    assert abs(float(controller.lam[0]) - 5 / 3) < 0.1  # 0.9 - 0.3 λ = 0.4


def test_dual_ascent_keeps_one_multiplier_per_budget_and_never_goes_negative():
    controller = DualAscent([0.3, 0.7], lr=1.0, init=0.1)
    budget = torch.tensor([0.3, 0.7, 0.3, 0.7])
    controller.update(budget, torch.tensor([0.5, 0.2, 0.5, 0.2]))  # knot 0 over budget, knot 1 under
    assert controller.lam[0] == pytest.approx(0.1 + 0.2) and controller.lam[1] == 0.0
    # Between knots λ is the straight line between theirs; beyond the ends, the end's.
    lam0 = controller.lam[0].item()
    at = torch.tensor([0.3, 0.4, 0.6, 0.7, 0.1, 0.9], dtype=torch.float64)
    assert controller.lam_of(at).tolist() == pytest.approx([lam0, 0.75 * lam0, 0.25 * lam0, 0.0, lam0, 0.0])
    fresh = DualAscent([0.3, 0.7])
    fresh.load_state_dict(controller.state_dict())
    assert torch.equal(fresh.lam, controller.lam)
    with pytest.raises(PranceError, match="same budget"):
        DualAscent([0.5]).load_state_dict(controller.state_dict())


def test_a_fixed_budget_runs_saved_dual_state_still_resumes():
    old = {"budgets": torch.tensor([0.5], dtype=torch.float64), "lam": torch.tensor([0.8], dtype=torch.float64),
           "cost": torch.tensor([0.6], dtype=torch.float64)}  # what runs of one budget saved before ranges
    controller = DualAscent([0.5], lr=0.5)
    controller.load_state_dict(old)
    controller.update(torch.full((4,), 0.5), torch.full((4,), 0.6))
    assert float(controller.lam[0]) == pytest.approx(0.8 + 0.5 * (0.6 - 0.5))


def test_per_bin_multipliers_each_find_their_budgets_price():
    """Budgets drawn uniformly from [0.3, 0.8]; a stand-in policy spends 0.95 − 0.3 λ at the λ it is shown.

    Meeting every budget b needs λ*(b) = (0.95 − b) / 0.3, a straight line, so each knot's λ must
    converge to λ* at that knot — falling from the cheapest budget to the dearest one."""
    knots = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    gen = torch.Generator().manual_seed(0)
    controller = DualAscent(knots, lr=0.3, init=0.5)
    for _ in range(400):
        budget = 0.3 + 0.5 * torch.rand(512, generator=gen, dtype=torch.float64)
        cost = 0.95 - 0.3 * controller.lam_of(budget) + 0.02 * torch.randn(512, generator=gen, dtype=torch.float64)
        controller.update(budget, cost)
    want = torch.tensor([(0.95 - b) / 0.3 for b in knots], dtype=torch.float64)
    assert torch.allclose(controller.lam, want, atol=0.05), controller.lam
    # Each knot's (smoothed, weighted) cost sits on its (weighted) budget.
    assert torch.allclose(controller.cost, controller.target, atol=0.01)


def test_one_dual_step_raises_overspending_bins_and_lowers_underspending_ones():
    controller = DualAscent([0.3, 0.55, 0.8], lr=0.5, init=1.0)
    budget = torch.tensor([0.3, 0.3, 0.55, 0.8, 0.8])
    controller.update(budget, torch.tensor([0.5, 0.4, 0.55, 0.6, 0.7]))  # cheap bin over, middle on, dear bin under
    assert controller.lam[0] > 1.0 and controller.lam[1] == pytest.approx(1.0) and controller.lam[2] < 1.0
    assert controller.lam[0] == pytest.approx(1.0 + 0.5 * (0.45 - 0.3))
    assert controller.lam[2] == pytest.approx(1.0 + 0.5 * (0.65 - 0.8))


def test_calibration_finds_the_knob_that_lands_on_the_budget():
    # A staircase-plus-slope cost, like a policy with discrete widths and continuous keep ratios.
    def ratio(knob: float) -> float:
        return 0.5 + 0.2 * knob + 0.05 * round(knob * 4) / 4

    got = calibrate(ratio, 0.51, tolerance=0.002)
    assert abs(got.macs_ratio - 0.51) <= 0.002 and abs(ratio(got.knob) - got.macs_ratio) < 1e-12
    # A budget inside a jump (0.4625 -> 0.475 at knob -0.125) gets the nearer side of it.
    in_gap = calibrate(ratio, 0.471, tolerance=0.001)
    assert in_gap.macs_ratio == pytest.approx(0.475, abs=1e-6)
    out_of_reach = calibrate(ratio, 0.9)
    assert out_of_reach.knob == 1.0
    with pytest.raises(PranceError, match="budget"):
        check_budget(1.5)


def test_calibration_survives_a_cost_that_is_not_monotone_in_the_knob():
    # Rises, dips below the budget again, then rises: plain bisection on [-1, 1] would look in the wrong half.
    def ratio(knob: float) -> float:
        return 0.6 + 0.3 * knob if knob < 0.2 else 0.3 + 0.5 * (knob - 0.2)

    got = calibrate(ratio, 0.5, tolerance=0.002)
    assert abs(got.macs_ratio - 0.5) <= 0.002 and ratio(got.knob) == got.macs_ratio


def test_knob_curve_is_piecewise_linear_between_calibrated_budgets_and_flat_beyond():
    curve = KnobCurve((0.3, 0.5, 0.8), (0.2, -0.1, 0.05))
    got = curve(torch.tensor([0.3, 0.4, 0.5, 0.65, 0.8, 0.1, 0.95], dtype=torch.float64))
    want = [0.2, 0.05, -0.1, -0.025, 0.05, 0.2, 0.05]  # by hand: halfway 0.2 -> -0.1, halfway -0.1 -> 0.05
    assert got.tolist() == pytest.approx(want)
    assert KnobCurve.from_dict(curve.to_dict()) == curve
    assert KnobCurve((0.5,), (0.3,))(torch.tensor([0.2, 0.9])).tolist() == [0.3, 0.3]
    with pytest.raises(PranceError, match="increasing"):
        KnobCurve((0.5, 0.4), (0.0, 0.0))


def test_range_calibration_meets_every_budget_of_a_budget_aware_cost():
    """A selector that already spends more at larger budgets, plus the knob's shift, with steps."""
    def ratio(budget: float, knob: float) -> float:
        return 0.2 + 0.6 * budget + 0.25 * knob + 0.02 * round(knob * 8) / 8

    budgets = budget_knots((0.3, 0.8), 6)
    assert budgets == pytest.approx([0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    curve, cals = calibrate_range(ratio, budgets, relative_tolerance=0.004)
    assert curve.budgets == tuple(budgets)
    for b, cal in zip(budgets, cals):
        assert abs(ratio(b, cal.knob) - b) <= 0.004 * b
        assert cal.knob == curve(torch.tensor([b], dtype=torch.float64)).item()
    with pytest.raises(PranceError, match="low < high"):
        budget_knots((0.8, 0.3), 6)
    with pytest.raises(PranceError, match="2 budget bins"):
        budget_knots((0.3, 0.8), 1)
