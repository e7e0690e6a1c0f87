"""An executor outlives weight updates: fine-tuning and selector training reuse one engine."""

from __future__ import annotations

import pytest
import torch

from prance import MetaViT, Plan
from prance.engine import DynamicExecutor
from tests.conftest import tiny_config, tiny_space


@pytest.mark.parametrize("token_mode", ["prune", "merge", "prune_merge"])
def test_reused_executor_sees_new_weights(token_mode, one_thread):
    """Elastic heads slice QKV by copying; after load_state_dict or an optimiser step the engine
    must use the new weights (the masked path, which reads the parameters directly, is the reference)."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = MetaViT(cfg, tiny_space(cfg, token_mode=token_mode)).eval()
    other = MetaViT(cfg, model.space).eval()
    x = torch.randn(10, 3, 16, 16)
    plan = Plan.random(cfg, model.space, 10, generator=torch.Generator().manual_seed(1), keep_range=(0.3, 1.0))
    assert bool((plan.heads < cfg.num_heads).any()), "the test needs images running fewer heads"
    engine = DynamicExecutor(model)
    engine(x, plan)  # fills the weight cache with the old weights

    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        want = model(x, plan, mode="masked")
    assert (engine(x, plan) - want).abs().max() <= 1e-5

    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(x, plan, mode="masked").square().mean()
    loss.backward()
    optimiser.step()
    with torch.inference_mode():
        want = model(x, plan, mode="masked")
    assert (engine(x, plan) - want).abs().max() <= 1e-5
