"""The selector as the engine's policy: valid per-image decisions, batch independence, the knob, its cost."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from prance.accounting import macs_per_sample
from prance.engine import DynamicExecutor
from prance.selector.selector import Selector, SelectorConfig
from tests.conftest import tiny_config, tiny_space


def _setup(encoder: str = "keys", **space):
    torch.manual_seed(0)
    from prance.model import MetaViT

    cfg = tiny_config()
    model = MetaViT(cfg, tiny_space(cfg, **space)).eval()
    selector = Selector(cfg, model.space, SelectorConfig(encoder=encoder, hidden=16)).eval()
    return model, selector, torch.randn(12, cfg.in_chans, cfg.img_size, cfg.img_size)


def test_selector_decides_every_stage_per_image_and_its_plans_validate():
    for encoder in ("keys", "cls"):
        model, selector, x = _setup(encoder)
        engine = DynamicExecutor(model)
        states = []
        engine.run(x, policy=lambda s: (states.append(s), selector(s))[1])
        selector.fit_features(states)  # standardise on these states, as training does once
        gen = torch.Generator().manual_seed(0)
        # Sampled decisions differ between images; every executed plan is valid.
        sampled = []
        logits, plan = engine.run(x, policy=lambda s: (sampled.append(selector.sample(s, gen)), sampled[-1].plan)[1])
        plan.validate(model.config, model.space)
        assert len(sampled) == model.config.num_stages - 1
        assert len({plan.key(i) for i in range(len(x))}) > 1
        assert sampled[0].features.shape == (len(x), selector.norm.mean.shape[0])
        assert torch.isfinite(sampled[0].log_prob).all() and not sampled[0].log_prob.requires_grad


def test_an_images_decisions_do_not_depend_on_its_batch():
    model, selector, x = _setup()
    engine = DynamicExecutor(model)
    logits, plan = engine.run(x, policy=selector)
    macs = macs_per_sample(model.config, plan)
    for i in (0, 5, 11):
        alone_logits, alone = engine.run(x[i : i + 1], policy=selector)
        # The discrete choices and the compute they run are identical; the continuous keep ratios agree to
        # float32 rounding (a matrix product's kernel, and so its last bit, may change with the batch size).
        for name in ("widths", "mlp_ratios", "heads"):
            assert torch.equal(getattr(alone, name)[0], getattr(plan, name)[i])
        for name in ("keep", "merge_keep"):
            assert torch.allclose(getattr(alone, name)[0], getattr(plan, name)[i], rtol=0, atol=1e-6)
        assert int(macs_per_sample(model.config, alone)[0]) == int(macs[i])
        assert torch.allclose(alone_logits[0], logits[i], atol=1e-5)


def test_the_knob_never_buys_less_compute_when_raised():
    model, selector, x = _setup()
    engine = DynamicExecutor(model)
    means = []
    for knob in (-1.0, -0.3, 0.0, 0.3, 1.0):
        selector.knob.fill_(knob)
        _, plan = engine.run(x, policy=selector)
        means.append(float(macs_per_sample(model.config, plan).double().mean()))
    assert means == sorted(means) and means[0] < means[-1]
    assert means[-1] == float(macs_per_sample(model.config, model.full_plan))  # +1 shifts every part to its top


def _width_choices_over_knobs(knob_mode: str, knobs: torch.Tensor) -> torch.Tensor:
    """``[K, B]`` stage-1 widths a selector with confident, image-dependent choices picks at each knob."""
    from prance.model import MetaViT
    from prance.policy import StageState

    torch.manual_seed(0)
    cfg = tiny_config()
    model = MetaViT(cfg, tiny_space(cfg)).eval()
    selector = Selector(cfg, model.space, SelectorConfig(hidden=16, knob_mode=knob_mode)).eval()
    with torch.no_grad():  # a trained-like policy: large, image-dependent logit margins
        for p in selector.agent.actor.parameters():
            p.mul_(30.0)
    b = 256
    state = StageState(1, torch.randn(b, cfg.embed_dim), torch.randn(b, cfg.num_patches + 1),
                       torch.full((b,), cfg.num_patches + 1), torch.full((b,), cfg.embed_dim),
                       torch.full((b,), float("nan"), dtype=torch.float64))
    widths = []
    for knob in knobs.tolist():
        selector.knob.fill_(knob)
        widths.append(selector(state).widths[:, 1])
    return torch.stack(widths)


def test_the_knob_tilts_discrete_choices_so_images_move_one_by_one():
    """The tilt moves unsure images first: along a fine knob grid each image's width only grows,
    and no step moves most images at once. Shifting raw actions (older files) moves every image
    across its choice's bin edge at the same knob value: the test's control."""
    knobs = torch.linspace(-0.5, 0.5, 257)
    for mode in ("tilt", "shift"):
        widths = _width_choices_over_knobs(mode, knobs)
        assert bool((widths[1:] >= widths[:-1]).all()), mode  # never less compute for a larger knob
        assert widths[0].float().mean() < widths[-1].float().mean(), mode
        moved = (widths[1:] != widths[:-1]).float().mean(1)  # fraction of images moved by each step
        if mode == "tilt":
            assert float(moved.max()) < 0.2, float(moved.max())
        else:
            assert float(moved.max()) > 0.6, float(moved.max())


def test_at_knob_zero_the_tilt_is_the_plain_mode():
    knobs = torch.zeros(1)
    assert torch.equal(_width_choices_over_knobs("tilt", knobs), _width_choices_over_knobs("shift", knobs))


def test_selector_macs_match_the_flop_counter():
    model, selector, _ = _setup()
    feats = torch.randn(1, selector.norm.mean.shape[0])
    with FlopCounterMode(display=False) as counter:
        selector.agent.actor(feats)
    assert counter.get_total_flops() == 2 * selector.macs_per_decision()
    assert selector.macs_per_image() == selector.macs_per_decision() * (model.config.num_stages - 1)


def test_the_budget_is_the_last_feature_standardised_by_its_range():
    """Uniform budgets in [0.3, 0.8] map to zero mean and unit variance (the ends to ∓√3), whatever was fitted."""
    from prance.model import MetaViT

    torch.manual_seed(0)
    cfg = tiny_config()
    model = MetaViT(cfg, tiny_space(cfg)).eval()
    x = torch.randn(12, cfg.in_chans, cfg.img_size, cfg.img_size)
    engine = DynamicExecutor(model)
    for cfg_kw, budgets, want in ((dict(budget=0.55, budget_range=(0.3, 0.8)), [0.3, 0.55, 0.8], [-3**0.5, 0, 3**0.5]),
                                  (dict(budget=0.5), [0.5], [0.0])):
        selector = Selector(cfg, model.space, SelectorConfig(hidden=16, **cfg_kw)).eval()
        states = []
        engine.run(x, policy=lambda s: (states.append(s), selector(s))[1], budget=torch.linspace(0.3, 0.8, 12))
        selector.fit_features(states)
        for b, w in zip(budgets, want):
            seen = []
            engine.run(x[:2], policy=lambda s: (seen.append(selector.features(s)), selector(s))[1], budget=b)
            assert torch.allclose(seen[0][:, -1], torch.full((2,), float(w)), atol=1e-5), (cfg_kw, b)


@pytest.mark.parametrize("encoder", ["keys", "cls"])
def test_features_are_the_signal_the_stage_one_hot_tokens_width_and_budget(encoder):
    """Reference: the feature vector written out entry by entry, NaN budget slots taking the default."""
    from prance.policy import StageState
    from prance.selector.features import raw_features

    cfg = tiny_config()
    g = torch.Generator().manual_seed(0)
    b, stage = 5, 2
    state = StageState(stage, torch.randn(b, cfg.embed_dim, generator=g),
                       torch.randn(b, cfg.num_patches + 1, generator=g),
                       torch.tensor([17, 9, 3, 12, 5]), torch.tensor([32, 16, 24, 32, 16]),
                       torch.tensor([0.3, float("nan"), 0.55, 0.8, float("nan")], dtype=torch.float64))
    got = raw_features(state, encoder, cfg, default_budget=0.5)
    for i in range(b):
        signal = (state.key_means if encoder == "keys" else state.cls)[i].tolist()
        onehot = [1.0 if s == stage - 1 else 0.0 for s in range(cfg.num_stages - 1)]
        budget = 0.5 if i in (1, 4) else float(state.budget[i])
        want = torch.tensor(signal + onehot + [int(state.tokens[i]) / (cfg.num_patches + 1),
                                               int(state.widths[i]) / cfg.embed_dim, budget], dtype=torch.float32)
        assert torch.equal(got[i], want), i
