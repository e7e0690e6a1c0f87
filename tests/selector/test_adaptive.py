"""AdaptiveViT: one module, one file, and every image decided as if it were alone."""

from __future__ import annotations

import pytest
import torch

from prance.accounting import macs_per_sample
from prance.adaptive import AdaptiveViT
from prance.engine import DynamicExecutor
from prance.errors import PranceError
from prance.model import MetaViT
from prance.selector.selector import Selector, SelectorConfig
from tests.conftest import tiny_config, tiny_space


def _adaptive(seed: int = 0, images: int = 64, calibration: dict | None = None, **selector_cfg
              ) -> tuple[AdaptiveViT, torch.Tensor]:
    """A random tiny adaptive model (selector of one budget, 0.5, unless ``selector_cfg`` says otherwise)."""
    torch.manual_seed(seed)
    cfg = tiny_config()
    model = MetaViT(cfg, tiny_space(cfg)).eval()
    selector = Selector(cfg, model.space, SelectorConfig(hidden=16, **{"budget": 0.5, **selector_cfg}))
    with torch.no_grad():  # a policy that is not uniform: decisions then depend on the image
        for p in selector.agent.actor.parameters():
            p.mul_(30.0)
    x = torch.randn(images, cfg.in_chans, cfg.img_size, cfg.img_size)
    states = []
    DynamicExecutor(model).run(x, policy=lambda s: (states.append(s), selector(s))[1], budget=selector.cfg.budget)
    selector.fit_features(states)  # standardised features, as training fits them
    return AdaptiveViT(model, selector, calibration=calibration, split={"data": "synthetic"}), x


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


# ----------------------------------------------------------------------------- one selector, many budgets
RANGE = (0.3, 0.8)


def _ranged() -> tuple[AdaptiveViT, torch.Tensor]:
    """A selector of the budget range, its knob read off a (made-up) calibration curve."""
    curve = {"budgets": [0.3, 0.55, 0.8], "knobs": [-0.4, 0.0, 0.3]}
    return _adaptive(images=48, calibration={"knob_curve": curve}, budget=0.55, budget_range=RANGE)


def test_the_budget_moves_the_operating_point_without_retraining():
    net, x = _ranged()
    assert net.budget == 0.55 and net.budget_range == RANGE
    means = []
    for b in (0.3, 0.45, 0.6, 0.8):
        net.set_budget(b)
        net(x)
        assert torch.all(net.last.budget == b)
        means.append(float(net.last.macs.double().mean()))
    assert means == sorted(means) and means[0] < means[-1]
    # The policy itself reads the budget (its state's last feature), not only the knob curve.
    net.selector.knob_curve = None
    net(x, budget=0.3)
    plans = [net.last.plan.key(i) for i in range(len(x))]
    net(x, budget=0.8)
    assert sum(plans[i] != net.last.plan.key(i) for i in range(len(x))) >= 4


def test_mixed_budgets_in_one_batch_give_each_image_what_it_gets_alone_with_its_budget():
    net, x = _ranged()
    budget = torch.tensor([0.3, 0.42, 0.55, 0.67, 0.8, 0.5], dtype=torch.float64).repeat(8)
    logits = net(x, budget=budget)
    batch = net.last
    assert torch.equal(batch.budget, budget)
    for i in range(len(x)):
        alone = net(x[i : i + 1], budget=float(budget[i]))
        assert _same_decisions(net.last, 0, batch, i), i
        assert torch.allclose(alone[0], logits[i], atol=1e-5), i
    # The budget decides: the same images at the range's two ends get different plans.
    net(x[:8], budget=0.3)
    cheap = net.last
    net(x[:8], budget=0.8)
    assert all(cheap.macs[i] <= net.last.macs[i] for i in range(8)) and bool((cheap.macs < net.last.macs).any())


def test_a_budget_outside_what_the_model_serves_is_a_one_line_error():
    net, x = _ranged()
    with pytest.raises(PranceError, match=r"budget 0.9 is outside .* budgets 0.3 to 0.8"):
        net.set_budget(0.9)
    with pytest.raises(PranceError, match=r"budget 0.2 is outside .* budgets 0.3 to 0.8"):
        net(x[:2], budget=torch.tensor([0.5, 0.2]))
    assert net.budget == 0.55  # a refused budget changes nothing
    fixed, _ = _adaptive()
    fixed.set_budget(0.5)  # its own budget is fine
    with pytest.raises(PranceError, match=r"budget 0.35 is outside .* one budget, 0.5 .*--budget-range"):
        fixed.set_budget(0.35)


def test_save_and_load_keep_the_budget_range_and_the_knob_curve(tmp_path):
    net, x = _ranged()
    budget = torch.linspace(0.3, 0.8, len(x), dtype=torch.float64)
    before = net(x, budget=budget)
    plan_before = net.last.plan
    loaded = AdaptiveViT.load(net.set_budget(0.4).save(tmp_path / "adaptive.pt"))
    assert loaded.budget_range == RANGE and loaded.budget == 0.4
    assert loaded.calibration["knob_curve"] == {"budgets": [0.3, 0.55, 0.8], "knobs": [-0.4, 0.0, 0.3]}
    assert torch.equal(loaded(x, budget=budget), before)
    assert all(loaded.last.plan.key(i) == plan_before.key(i) for i in range(len(x)))


def test_a_fixed_budget_file_written_before_budget_ranges_still_loads(tmp_path):
    net, x = _adaptive()
    net.selector.knob.fill_(0.1)
    before = net(x)
    ckpt = net.checkpoint()
    del ckpt["selector"]["config"]["budget_range"]  # records of that time had no such field
    ckpt["calibration"] = {"knob": 0.1, "holdout_macs_ratio": 0.5}
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = AdaptiveViT.load(tmp_path / "old.pt")
    assert loaded.budget_range == (0.5, 0.5) and loaded.selector.knob_curve is None
    assert torch.equal(loaded(x), before)


def test_a_file_from_before_knob_mode_keeps_the_shift_it_was_calibrated_with(tmp_path):
    net, x = _adaptive(knob_mode="shift")
    net.selector.knob.fill_(0.15)
    before = net(x)
    ckpt = net.checkpoint()
    del ckpt["selector"]["config"]["knob_mode"]  # what files written before the tilt hold
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = AdaptiveViT.load(tmp_path / "old.pt")
    assert loaded.selector.cfg.knob_mode == "shift"
    assert torch.equal(loaded(x), before)
    assert AdaptiveViT.load(net.save(tmp_path / "new.pt")).selector.cfg.knob_mode == "shift"
    assert _adaptive()[0].selector.cfg.knob_mode == "tilt"  # the default of new selectors
