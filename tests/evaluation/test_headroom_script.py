"""scripts/headroom.py: routing each image to a subnet so that the mean MACs meet a budget."""

from __future__ import annotations

import importlib.util

import torch

from tests.conftest import REPO


def _headroom():
    spec = importlib.util.spec_from_file_location("headroom", REPO / "scripts" / "headroom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_route_sends_the_images_that_gain_most_per_mac_to_the_larger_subnet_within_the_budget():
    g = torch.Generator().manual_seed(0)
    n = 200
    # two subnets: 0.3 and 0.9 of dense MACs; scores are predicted probabilities of being right
    macs = torch.tensor([[0.3], [0.9]], dtype=torch.float64).expand(2, n).clone()
    score = torch.rand(2, n, generator=g, dtype=torch.float64)
    budget = 0.5
    chosen = _headroom().route(score, macs, budget)
    # reference: with one price per MAC, the images whose gain from the larger subnet is largest move first;
    # as many as the budget allows (each costs 0.6 more), those with a positive gain only
    gain = score[1] - score[0]
    fit = int((budget - 0.3) * n / 0.6 + 1e-9)
    ranked = gain.argsort(descending=True)
    expected = torch.zeros(n, dtype=torch.long)
    expected[ranked[:fit][gain[ranked[:fit]] > 0]] = 1
    assert torch.equal(chosen, expected)
    assert float(macs[chosen, torch.arange(n)].mean()) <= budget + 1e-12
