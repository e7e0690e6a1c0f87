"""The engine's fast paths give what its general paths give (DESIGN.md §5).

A lone image, or a batch that runs one plan, skips the grouping machinery (width groups,
attention grid, masked token reduction); the references are the masked path, image by
image, and the same images run inside a mixed batch, which takes the general paths.
"""

from __future__ import annotations

import pytest
import torch

from prance import MetaViT, Plan
from prance.engine import DynamicExecutor
from tests.conftest import tiny_config, tiny_space


def _model(token_mode: str, elastic_heads: bool = True, seed: int = 0) -> MetaViT:
    torch.manual_seed(seed)
    cfg = tiny_config(depth=8, stage_depth=2)
    model = MetaViT(cfg, tiny_space(cfg, token_mode=token_mode, elastic_heads=elastic_heads)).eval()
    with torch.no_grad():  # stage maps that are not the identity: running one where none belongs shows
        for m in model.stage_maps:
            m.weight.add_(0.2 * torch.randn_like(m.weight))
            m.bias.add_(0.1 * torch.randn_like(m.bias))
    return model


def _plans(model: MetaViT, b: int, seed: int) -> Plan:
    """Random per-image plans; every other image keeps one width from stage 1 on (no stage map)."""
    plan = Plan.random(model.config, model.space, b, generator=torch.Generator().manual_seed(seed),
                       keep_range=(0.2, 1.0))
    widths = plan.widths.clone()
    widths[::2, 2:] = widths[::2, 1:2]
    widths[1::4, 1:] = model.config.embed_dim  # full width: the stage maps never run
    return Plan(widths, plan.mlp_ratios, plan.heads, plan.keep, plan.merge_keep)


class _Recorder:
    """A policy that keeps every state it sees and replays the plan's decisions."""

    def __init__(self, model: MetaViT, plan: Plan) -> None:
        self.model, self.plan, self.states = model, plan, []

    def __call__(self, state):
        self.states.append(state)
        return self.plan


@pytest.mark.parametrize("elastic_heads", [True, False])
@pytest.mark.parametrize("token_mode", ["prune", "merge", "prune_merge"])
def test_a_lone_image_runs_as_it_runs_in_a_mixed_batch_and_on_the_masked_path(token_mode, elastic_heads):
    model = _model(token_mode, elastic_heads)
    b = 8
    x = torch.randn(b, 3, 16, 16)
    plan = _plans(model, b, seed=1)
    engine = DynamicExecutor(model, group_call_macs=0.0)
    together = _Recorder(model, plan)
    batch_logits, _ = engine.run(x, policy=together)
    with torch.inference_mode():
        masked = model(x, plan, mode="masked")
    assert (batch_logits - masked).abs().max() <= 1e-4
    _each_image_alone_matches(engine, model, x, plan, batch_logits, masked, together)


def _each_image_alone_matches(engine, model, x, plan, batch_logits, masked, together: _Recorder) -> None:
    """Each image run alone executes its plan, gives the masked path's and the batch's logits,
    and meets the states it met in the batch (key means zero past its tokens)."""
    for i in range(len(x)):
        alone = _Recorder(model, plan.select([i]))
        logits, executed = engine.run(x[i : i + 1], policy=alone)
        assert executed.key(0) == plan.key(i)
        assert (logits[0] - masked[i]).abs().max() <= 1e-4
        assert (logits[0] - batch_logits[i]).abs().max() <= 1e-5
        for s_all, s_one in zip(together.states, alone.states):
            assert int(s_one.tokens[0]) == int(s_all.tokens[i]) and int(s_one.widths[0]) == int(s_all.widths[i])
            assert (s_one.cls[0] - s_all.cls[i]).abs().max() <= 1e-5
            assert (s_one.key_means[0] - s_all.key_means[i]).abs().max() <= 1e-5
            n = int(s_one.tokens[0])
            assert bool((s_one.key_means[0, n:] == 0).all()) and bool((s_one.key_means[0, :n] != 0).any())
            assert not s_one.tokens.is_inference() and not s_one.key_means.is_inference()


@pytest.mark.parametrize("seed", range(4))
def test_packed_reduction_equals_the_masked_ops_bit_for_bit(seed):
    """Reference: the masked token ops on the images padded to the longest, survivors compacted.
    Counts equal and unequal, pruning and merging, ties in importance and in similarity."""
    from prance.engine.reduce import reduce_packed
    from prance.tokens import ops as token_ops
    from prance.tokens.state import TokenState

    g = torch.Generator().manual_seed(seed)
    for trial in range(40):
        images, channels = int(torch.randint(1, 10, (), generator=g)), int(torch.randint(4, 33, (), generator=g))
        counts = torch.randint(2, 26, (images,), generator=g)
        if trial % 3 == 0:
            counts[:] = counts[0]
        n = int(counts.max())
        x = torch.randn(int(counts.sum()), channels, generator=g)
        if trial % 5 == 0:
            x[1::3] = x[0]  # equal tokens: equally similar destinations
        size = torch.rand(len(x), generator=g) * 3 + 0.5
        importance = torch.rand(images, n - 1, generator=g)
        if trial % 4 == 0:
            importance = (importance * 4).round()  # equally important tokens
        prune_k = counts - 1 if trial % 2 else torch.stack(
            [torch.randint(1, int(c), (), generator=g) for c in counts]).clamp(max=counts - 1)
        merge_k = torch.stack([torch.randint(1, int(p) + 1, (), generator=g) for p in prune_k])
        valid = torch.arange(n) < counts[:, None]
        padded, padded_size = x.new_zeros(images, n, channels), size.new_ones(images, n)
        padded[valid], padded_size[valid] = x, size
        want = token_ops.reduce_masked(TokenState(padded, padded_size, alive=valid), importance, prune_k, merge_k)
        got_x, got_size = reduce_packed(x, size, counts, importance, prune_k, merge_k)
        assert torch.equal(got_x, want.x[want.alive]) and torch.equal(got_size, want.size[want.alive]), trial
        assert len(got_x) == int((merge_k + 1).sum())


@pytest.mark.parametrize("token_mode", ["prune", "merge", "prune_merge"])
def test_a_few_distinct_decisions_run_as_plain_groups_exactly(token_mode, monkeypatch):
    """Rounded-up plans (a few distinct decisions per stage, two of them at one width) run every
    block group by group, with no attention grid, and give what the masked path and each image
    alone give."""
    import prance.engine.executor as executor

    model = _model(token_mode)
    cfg, b = model.config, 12
    reps = Plan.random(cfg, model.space, 3, generator=torch.Generator().manual_seed(3), keep_range=(0.2, 1.0))
    full, k = model.full_plan, cfg.stage_depth
    fields = {n: getattr(reps, n).clone() for n in ("widths", "mlp_ratios", "heads", "keep", "merge_keep")}
    for name, f in fields.items():  # stage 0 is never decided: every image runs it at full size
        first = 1 if name in ("widths", "keep", "merge_keep") else k
        f[:, :first] = getattr(full, name)[:, :first]
    fields["widths"][1, 1:] = fields["widths"][0, 1:]  # two decisions at one width: still two groups
    fields["mlp_ratios"][1, k:] = min(model.space.mlp_ratios)
    fields["mlp_ratios"][0, k:] = max(model.space.mlp_ratios)
    reps = Plan(**fields).validate(cfg, model.space)
    plan = reps.select(torch.randperm(b, generator=torch.Generator().manual_seed(0)) % 3)
    x = torch.randn(b, 3, 16, 16)
    engine = DynamicExecutor(model, group_call_macs=float("inf"))  # the cost model would pad into one group

    grid_calls = []
    packed = executor.packed_attention
    monkeypatch.setattr(executor, "packed_attention", lambda *a, **kw: (grid_calls.append(1), packed(*a, **kw))[1])
    together = _Recorder(model, plan)
    batch_logits, _ = engine.run(x, policy=together)
    assert not grid_calls
    with torch.inference_mode():
        masked = model(x, plan, mode="masked")
    assert (batch_logits - masked).abs().max() <= 1e-4
    _each_image_alone_matches(engine, model, x, plan, batch_logits, masked, together)
