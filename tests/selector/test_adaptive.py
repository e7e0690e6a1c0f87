"""AdaptiveViT: one module, one file, and every image decided as if it were alone."""

from __future__ import annotations

import pytest
import torch

from prance.accounting import macs_per_sample
from prance.adaptive import AdaptiveViT
from prance.engine import DynamicExecutor
from prance.model import MetaViT
from prance.selector.selector import Selector, SelectorConfig
from tests.conftest import tiny_config, tiny_space


def _adaptive(seed: int = 0) -> tuple[AdaptiveViT, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = MetaViT(cfg, tiny_space(cfg)).eval()
    selector = Selector(cfg, model.space, SelectorConfig(hidden=16, budget=0.5))
    with torch.no_grad():  # a policy that is not uniform: decisions then depend on the image
        for p in selector.agent.actor.parameters():
            p.mul_(30.0)
    x = torch.randn(64, cfg.in_chans, cfg.img_size, cfg.img_size)
    states = []
    DynamicExecutor(model).run(x, policy=lambda s: (states.append(s), selector(s))[1])
    selector.fit_features(states)  # standardised features, as training fits them
    return AdaptiveViT(model, selector, budget=0.5, split={"data": "synthetic"}), x


def _same_decisions(a, i: int, b, j: int) -> bool:
    """Equal choices and token counts; keep ratios equal to float rounding (they are computed, like
    the logits, from features that a batched matrix product rounds differently in the last bit)."""
    pa, pb = a.plan, b.plan
    exact = all(torch.equal(getattr(pa, k)[i], getattr(pb, k)[j]) for k in ("widths", "mlp_ratios", "heads"))
    ratios = all(torch.allclose(getattr(pa, k)[i], getattr(pb, k)[j], atol=1e-6) for k in ("keep", "merge_keep"))
    return exact and ratios and torch.equal(a.tokens[i], b.tokens[j]) and a.macs[i] == b.macs[j]


def test_each_image_of_a_batch_gets_what_it_gets_alone():
    net, x = _adaptive()
    logits = net(x)
    batch = net.last
    assert len({tuple(batch.plan.widths[i].tolist()) + tuple(batch.tokens[i].tolist()) for i in range(len(x))}) >= 4
    for i in range(len(x)):
        alone = net(x[i : i + 1])
        assert _same_decisions(net.last, 0, batch, i), i
        assert torch.allclose(alone[0], logits[i], atol=1e-5), i


def test_per_image_statistics_price_the_executed_plans_and_the_selector():
    net, x = _adaptive()
    net(x[:8])
    stats = net.last
    want = macs_per_sample(net.model.config, stats.plan) + net.selector.macs_per_image()
    assert torch.equal(stats.macs, want)
    assert stats.tokens.shape == (8, net.model.config.num_stages)
    rows = stats.rows()
    assert len(rows) == 8 and rows[3]["macs"] == int(want[3]) and len(rows[3]["widths"]) == net.model.config.num_stages


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    net, x = _adaptive()
    net.selector.knob.fill_(0.1)
    net.calibration = {"knob": 0.1, "holdout_macs_ratio": 0.5}
    before = net(x)
    plan_before = net.last.plan
    path = net.save(tmp_path / "adaptive.pt")
    loaded = AdaptiveViT.load(path)
    after = loaded(x)
    assert torch.equal(before, after)
    assert all(loaded.last.plan.key(i) == plan_before.key(i) for i in range(len(x)))
    assert loaded.budget == 0.5 and loaded.calibration["knob"] == 0.1 and loaded.split == {"data": "synthetic"}
    assert float(loaded.selector.knob) == 0.1
    raw = torch.load(path, weights_only=True)  # loads without running pickled code
    assert raw["kind"] == "adaptive" and raw["format"] == "prance-checkpoint"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adaptive_model_on_cuda_decides_and_predicts_as_on_the_cpu():
    net, x = _adaptive()
    want = net(x[:16])
    on_cpu = net.last
    got = net.cuda()(x[:16].cuda())
    assert got.device.type == "cuda" and torch.allclose(got.cpu(), want, atol=1e-4)
    assert all(_same_decisions(net.last, i, on_cpu, i) for i in range(16))
