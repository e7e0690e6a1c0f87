"""Every tensor the model, token ops and engine make follows the input's device and dtype."""

from __future__ import annotations

import copy

import pytest
import torch

from prance import Plan
from prance.engine import DynamicExecutor, MaskedExecutor


def _plans(model, batch: int) -> Plan:
    g = torch.Generator().manual_seed(4)
    return Plan.random(model.config, model.space, batch, generator=g, keep_range=(0.2, 1.0))


def test_float64_runs_equal_float32(tiny):
    """A hard-coded float32 anywhere would fail (mixed dtypes) or lose float64's precision."""
    x = torch.randn(10, 3, 16, 16)
    plan = _plans(tiny, 10)
    want = DynamicExecutor(tiny)(x, plan).double()
    double = copy.deepcopy(tiny).double()
    for path in (DynamicExecutor(double), MaskedExecutor(double)):
        got = path(x.double(), plan)
        assert got.dtype == torch.float64
        assert (got - want).abs().max() <= 1e-4
    with torch.inference_mode():
        assert (double(x.double(), plan) - want).abs().max() <= 1e-4  # physical path
    rollout = DynamicExecutor(double).rollout(x.double(), lambda state: plan)
    assert rollout.final.logits.dtype == torch.float64 and (rollout.final.logits - want).abs().max() <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_on_cuda_equals_masked_path(tiny):
    model = copy.deepcopy(tiny).cuda()
    x = torch.randn(10, 3, 16, 16, device="cuda")
    plan = _plans(tiny, 10)
    got = DynamicExecutor(model)(x, plan)
    with torch.inference_mode():
        want = model(x, plan, mode="masked")
    assert got.device.type == "cuda" and (got - want).abs().max() <= 1e-4
    rollout = DynamicExecutor(model).rollout(x, lambda state: plan)
    assert (rollout.final.logits - got).abs().max() <= 1e-4
