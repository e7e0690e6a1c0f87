"""Speed levers of an adaptive model (DESIGN.md §5): one MLP ratio per stage, a coarse keep grid,
decisions rounded up to K representatives — each kept through the deployed model and its file."""

from __future__ import annotations

import torch

from prance.accounting import macs_per_sample
from prance.adaptive import AdaptiveViT
from prance.engine import DynamicExecutor
from prance.model import MetaViT
from prance.selector.representatives import stage_decisions
from prance.selector.selector import Selector, SelectorConfig
from prance.training.checkpoint import load_checkpoint
from tests.conftest import tiny_config, tiny_space
from tests.selector.test_adaptive import _adaptive

CFG = tiny_config(depth=6, stage_depth=2)


def _levered(**selector) -> tuple[AdaptiveViT, torch.Tensor]:
    """A tiny adaptive model (2 blocks per stage, merge mode) whose selector depends on the image."""
    torch.manual_seed(0)
    model = MetaViT(CFG, tiny_space(CFG, token_mode="merge", elastic_heads=False, min_keep=0.2)).eval()
    sel = Selector(CFG, model.space, SelectorConfig(hidden=16, **selector))
    with torch.no_grad():
        for p in sel.agent.actor.parameters():
            p.mul_(30.0)
    x = torch.randn(48, CFG.in_chans, CFG.img_size, CFG.img_size)
    states = []
    DynamicExecutor(model).run(x, policy=lambda s: (states.append(s), sel(s))[1])
    sel.fit_features(states)
    return AdaptiveViT(model, sel.eval(), budget=0.5), x


def test_one_mlp_ratio_per_stage_and_a_coarse_keep_grid_reach_every_executed_plan_and_survive_the_file(tmp_path):
    net, x = _levered(mlp_per_stage=True, keep_grid=0.25)
    net(x)
    plan, k = net.last.plan, CFG.stage_depth
    for s in range(1, CFG.num_stages):
        ratios = plan.mlp_ratios[:, s * k : (s + 1) * k]
        assert bool((ratios == ratios[:, :1]).all())
        keep = plan.merge_keep[:, s]
        assert set(keep.tolist()) <= {0.25, 0.5, 0.75, 1.0}
    assert len({plan.key(i) for i in range(len(x))}) > 1  # still per-image decisions
    loaded = AdaptiveViT.load(net.save(tmp_path / "adaptive.pt"))
    assert loaded.selector.cfg.mlp_per_stage and loaded.selector.cfg.keep_grid == 0.25
    loaded(x)
    assert all(loaded.last.plan.key(i) == plan.key(i) for i in range(len(x)))
    # Without the levers the same weights' decisions are finer.
    free, _ = _levered()
    free(x)
    assert len(set(free.last.plan.merge_keep[:, 1:].flatten().tolist())) > 4


def test_rounded_decisions_are_batch_independent_exact_and_stored_with_the_model(tmp_path):
    net, holdout = _adaptive()
    reps = net.fit_representatives(list(holdout.split(32)), k=3)
    x = torch.randn(24, *holdout.shape[1:])
    logits = net(x)
    batch = net.last
    cfg = net.model.config
    for s in range(1, cfg.num_stages):
        assert len(stage_decisions(cfg, batch.plan, s).unique(dim=0)) <= 3
    assert (logits - net.model(x, batch.plan, mode="masked")).abs().max() <= 1e-4
    for i in (0, 7, 23):  # every image alone: the same decisions and logits
        alone = net(x[i : i + 1])
        assert net.last.plan.key(0) == batch.plan.key(i) and torch.allclose(alone[0], logits[i], atol=1e-5)
    assert torch.equal(batch.macs, macs_per_sample(cfg, batch.plan) + net.selector.macs_per_image())

    path = net.save(tmp_path / "adaptive.pt")
    loaded = AdaptiveViT.load(path)
    assert loaded.representatives.k == 3 and all(torch.equal(loaded.representatives.stages[s], t)
                                                 for s, t in reps.stages.items())
    assert torch.equal(loaded(x), logits)
    # A file from before representatives existed loads and runs the selector's own decisions.
    old = load_checkpoint(path, kind="adaptive")
    del old["representatives"]
    plain = AdaptiveViT.from_checkpoint(old)
    assert plain.representatives is None
    assert torch.equal(net.set_representatives(None)(x), plain(x))


def test_one_representative_runs_every_image_at_full_size():
    net, holdout = _adaptive()
    net.fit_representatives(list(holdout.split(32)), k=1)
    net(holdout[:10])
    dense = macs_per_sample(net.model.config, net.model.full_plan)[0]
    assert bool((net.last.macs == dense + net.selector.macs_per_image()).all())
