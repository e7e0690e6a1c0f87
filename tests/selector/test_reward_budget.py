"""The Result-to-Go reward's parts and the budget machinery (dual ascent, calibration)."""

from __future__ import annotations

import pytest
import torch

from prance.errors import PranceError
from prance.selector.budget import DualAscent, calibrate, check_budget
from prance.selector.reward import relative_accuracy, step_reward


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
    budget = torch.tensor([0.31, 0.69, 0.3, 0.72])
    controller.update(budget, torch.tensor([0.5, 0.2, 0.5, 0.2]))  # bin 0 over budget, bin 1 under
    assert controller.lam[0] > 0.1 and controller.lam[1] == 0.0
    assert controller.lam_of(budget).tolist() == [controller.lam[0].item(), 0.0, controller.lam[0].item(), 0.0]
    fresh = DualAscent([0.3, 0.7])
    fresh.load_state_dict(controller.state_dict())
    assert torch.equal(fresh.lam, controller.lam)
    with pytest.raises(PranceError, match="same budget"):
        DualAscent([0.5]).load_state_dict(controller.state_dict())


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
