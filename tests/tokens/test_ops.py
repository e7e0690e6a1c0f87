"""Prune / merge / reduce: invariants, a loop reference, and masked == physical per sample."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from prance.errors import PranceError
from prance.plan import kept_count
from prance.tokens import (
    TokenState,
    cls_importance,
    merge,
    merge_macs,
    merge_masked,
    prune,
    prune_masked,
    reduce,
    reduce_masked,
    topk_split,
)

FAST = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- generators
def random_state(b: int, n: int, c: int, seed: int, masked: bool = False, p: int | None = None) -> TokenState:
    """A consistent state: ``n`` patch tokens partitioning ``p`` original patches (sizes = counts)."""
    g = torch.Generator().manual_seed(seed)
    p = p or n + int(torch.randint(0, 2 * n + 1, (), generator=g))
    x = torch.randn(b, n + 1, c, generator=g)
    owner = torch.empty(b, p, dtype=torch.long)
    for i in range(b):  # every token owns its first patch, the rest are spread at random
        perm = torch.randperm(p, generator=g)
        owner[i, perm[:n]] = torch.arange(n)
        owner[i, perm[n:]] = torch.randint(0, n, (p - n,), generator=g)
    source = F.one_hot(owner, n).transpose(1, 2).bool()  # [B, n, P]
    source = torch.cat([torch.zeros(b, 1, p, dtype=torch.bool), source], 1)
    size = source.sum(-1).to(x.dtype)
    size[:, 0] = 1
    alive = torch.ones(b, n + 1, dtype=torch.bool) if masked else None
    return TokenState(x, size, source, alive)


def random_importance(b: int, n: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    if ties:  # few distinct values: exercises the tie rule
        return torch.randint(0, 3, (b, n), generator=g).float() / 4
    return torch.rand(b, n, generator=g)


def kill(state: TokenState, seed: int) -> TokenState:
    """Mark random patch tokens dead (≥ 1 alive per sample) and poison their features."""
    g = torch.Generator().manual_seed(seed + 2)
    b, n1, _ = state.x.shape
    alive = torch.rand(b, n1, generator=g) < 0.6
    alive[:, 0] = True
    alive[torch.arange(b), torch.randint(1, n1, (b,), generator=g)] = True
    x = state.x.masked_fill(~alive[..., None], float("nan"))
    return TokenState(x, state.size, state.source, alive)


def sample(state: TokenState, i: int) -> tuple[TokenState, torch.Tensor]:
    """Sample ``i``'s alive tokens as a physical one-sample state, and their indices."""
    idx = state.alive[i].nonzero()[:, 0] if state.alive is not None else torch.arange(state.x.shape[1])
    return TokenState(state.x[i, idx][None], state.size[i, idx][None], state.source[i, idx][None]), idx


# ----------------------------------------------------------------------------- loop reference
def ranking(imp: list[float]) -> list[int]:
    return sorted(range(len(imp)), key=lambda i: (-imp[i], i))


def ref_prune(st_: TokenState, imp: torch.Tensor, k: int) -> TokenState:
    keep = [0] + [i + 1 for i in sorted(ranking(imp[0].tolist())[:k])]
    return TokenState(st_.x[:, keep], st_.size[:, keep], st_.source[:, keep])


def ref_merge(st_: TokenState, imp: torch.Tensor, k: int) -> TokenState:
    order = ranking(imp[0].tolist())
    keep, drop = sorted(order[:k]), sorted(order[k:])
    x, size, src = st_.x[0, 1:], st_.size[0, 1:], st_.source[0, 1:]
    xs = [x[j] * size[j] for j in keep]
    sizes = [size[j].clone() for j in keep]
    srcs = [src[j].clone() for j in keep]
    got = [False] * k
    for i in drop:
        sims = [float(F.normalize(x[i], dim=0) @ F.normalize(x[j], dim=0)) for j in keep]
        d = max(range(k), key=lambda t: (sims[t], -t))
        xs[d] = xs[d] + x[i] * size[i]
        sizes[d] = sizes[d] + size[i]
        srcs[d] = srcs[d] | src[i]
        got[d] = True
    out_x = torch.stack([xs[t] / sizes[t] if got[t] else x[keep[t]] for t in range(k)])
    return TokenState(torch.cat([st_.x[0, :1], out_x])[None], torch.cat([st_.size[0, :1], torch.stack(sizes)])[None],
                      torch.cat([st_.source[0, :1], torch.stack(srcs)])[None])


def assert_same(a: TokenState, b: TokenState, atol: float = 1e-6) -> None:
    assert a.x.shape == b.x.shape
    torch.testing.assert_close(a.x, b.x, atol=atol, rtol=1e-5)
    torch.testing.assert_close(a.size, b.size, atol=atol, rtol=1e-6)
    assert torch.equal(a.source, b.source)


shapes = dict(b=st.integers(1, 4), n=st.integers(1, 24), c=st.integers(2, 8), seed=st.integers(0, 2**31),
              ties=st.booleans(), frac=st.floats(0.0, 1.0))


def count(n: int, frac: float) -> int:
    return max(1, min(n, math.ceil(frac * n)))


# ----------------------------------------------------------------------------- importance
def test_cls_importance_is_the_cls_row_averaged_over_heads():
    attn = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    imp = cls_importance(attn)
    assert imp.shape == (2, 4)
    torch.testing.assert_close(imp, attn[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(imp[1, 2], attn[1, :, 0, 3].sum() / 3)


def test_cls_importance_averages_only_active_heads():
    attn = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    attn[:, :, 0][~mask] = float("nan")  # inactive heads may hold anything
    imp = cls_importance(attn, mask)
    torch.testing.assert_close(imp[0], attn[0, [0, 2], 0, 1:].mean(0))
    torch.testing.assert_close(imp[1], attn[1, 3, 0, 1:])


# ----------------------------------------------------------------------------- physical
@FAST
@given(**shapes)
def test_prune_keeps_cls_and_the_most_important_tokens_in_order(b, n, c, seed, ties, frac):
    state = random_state(b, n, c, seed)
    imp = random_importance(b, n, seed, ties)
    k = count(n, frac)
    out = prune(state, imp, k)
    assert out.x.shape == (b, k + 1, c) and out.alive is None
    assert torch.equal(out.x[:, 0], state.x[:, 0])
    for i in range(b):
        assert_same(TokenState(out.x[i:i + 1], out.size[i:i + 1], out.source[i:i + 1]),
                    ref_prune(sample(state, i)[0], imp[i:i + 1], k), atol=0)
    keep, drop = topk_split(imp, k)
    if k < n:
        assert (imp.gather(1, keep).min(1).values >= imp.gather(1, drop).max(1).values).all()
    torch.testing.assert_close(out.size[:, 1:].sum(1), state.size[:, 1:].gather(1, keep).sum(1))


@FAST
@given(**shapes)
def test_merge_matches_loop_reference_and_conserves_patches(b, n, c, seed, ties, frac):
    state = random_state(b, n, c, seed)
    imp = random_importance(b, n, seed, ties)
    k = count(n, frac)
    out = merge(state, imp, k)
    assert out.x.shape == (b, k + 1, c)
    assert torch.equal(out.x[:, 0], state.x[:, 0]) and (out.size[:, 0] == 1).all()
    assert not out.source[:, 0].any()  # nothing merged into cls
    for i in range(b):
        assert_same(TokenState(out.x[i:i + 1], out.size[i:i + 1], out.source[i:i + 1]),
                    ref_merge(sample(state, i)[0], imp[i:i + 1], k))
    untouched = (out.source[:, 1:, None] == state.source[:, None, 1:]).all(-1)  # [B, k, n]: same patches
    rows = untouched.any(-1)  # kept tokens that received nothing come back bit for bit
    same = state.x[:, 1:].gather(1, untouched.int().argmax(-1)[..., None].expand(-1, -1, c))
    assert torch.equal(out.x[:, 1:][rows], same[rows])
    p = state.source.shape[-1]
    torch.testing.assert_close(out.size[:, 1:].sum(1), torch.full((b,), float(p)))
    assert (out.source[:, 1:].sum(1) == 1).all()  # every original patch covered exactly once
    torch.testing.assert_close(out.size[:, 1:], out.source[:, 1:].sum(-1).float())


@FAST
@given(**shapes, frac2=st.floats(0.0, 1.0))
def test_reduce_is_prune_then_merge_on_the_survivors(b, n, c, seed, ties, frac, frac2):
    state = random_state(b, n, c, seed)
    imp = random_importance(b, n, seed, ties)
    keep_k = count(n, frac)
    merge_k = count(keep_k, frac2)
    out = reduce(state, imp, keep_k, merge_k)
    assert out.x.shape == (b, merge_k + 1, c)
    for i in range(b):
        one, one_imp = sample(state, i)[0], imp[i:i + 1]
        kept = ref_prune(one, one_imp, keep_k)
        kept_imp = one_imp[:, sorted(ranking(one_imp[0].tolist())[:keep_k])]
        assert_same(TokenState(out.x[i:i + 1], out.size[i:i + 1], out.source[i:i + 1]),
                    ref_merge(kept, kept_imp, merge_k))


def test_keep_ratio_one_is_an_exact_noop():
    state = random_state(3, 10, 4, seed=0)
    imp = random_importance(3, 10, 0, ties=True)
    k = int(kept_count(10, 1.0))
    for out in (prune(state, imp, k), merge(state, imp, k), reduce(state, imp, k, k)):
        assert out.x is state.x and out.size is state.size and out.source is state.source
    masked = random_state(3, 10, 4, seed=0, masked=True)
    masked.alive[0, 2:5] = False  # keeping every alive token is a no-op too
    k = masked.num_patches()
    for out in (prune_masked(masked, imp, k), merge_masked(masked, imp, k), reduce_masked(masked, imp, k, k)):
        for a, b in zip((out.x, out.size, out.source, out.alive), (masked.x, masked.size, masked.source, masked.alive)):
            assert torch.equal(a, b)


def test_ties_go_to_the_lower_index_in_both_paths():
    state = random_state(1, 6, 3, seed=1)
    imp = torch.tensor([[0.5, 0.2, 0.5, 0.5, 0.2, 0.5]])
    assert prune(state, imp, 3).source[0, 1:].equal(state.source[0, [1, 3, 4]])
    masked = TokenState(state.x, state.size, state.source, torch.ones(1, 7, dtype=torch.bool))
    assert prune_masked(masked, imp, 3).alive[0].tolist() == [True, True, False, True, True, False, False]


def test_merge_is_a_size_weighted_mean_into_the_most_similar_kept_token():
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.1], [0.2, 2.0]]])
    size = torch.tensor([[1.0, 1.0, 2.0, 3.0, 1.0]])
    state = TokenState(x, size)
    out = merge(state, torch.tensor([[0.9, 0.8, 0.1, 0.2]]), 2)
    torch.testing.assert_close(out.size, torch.tensor([[1.0, 4.0, 3.0]]))
    torch.testing.assert_close(out.x[0, 1], (x[0, 1] * 1 + x[0, 3] * 3) / 4)
    torch.testing.assert_close(out.x[0, 2], (x[0, 2] * 2 + x[0, 4] * 1) / 3)


def test_merge_passes_gradients_to_every_merged_token():
    state = random_state(2, 8, 4, seed=3)
    x = state.x.clone().requires_grad_()
    merge(state.with_x(x), random_importance(2, 8, 3, ties=False), 3).x.sum().backward()
    assert (x.grad[:, 1:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("k", [1, 7, 12])
def test_merge_macs_equal_the_counted_matmuls(k):
    from torch.utils.flop_counter import FlopCounterMode

    state = random_state(3, 12, 5, seed=2)
    with FlopCounterMode(display=False) as counter:
        merge(state, random_importance(3, 12, 2, ties=False), k)
    assert counter.get_total_flops() == 2 * 3 * merge_macs(12, k, 5)
    assert merge_macs(196, 100, 384) == 96 * 100 * 384


def test_invalid_counts_and_modes_raise():
    state = random_state(2, 5, 3, seed=0)
    imp = random_importance(2, 5, 0, ties=False)
    for op in (prune, merge):
        with pytest.raises(PranceError):
            op(state, imp, 0)
        with pytest.raises(PranceError):
            op(state, imp, 6)
    with pytest.raises(PranceError):
        reduce(state, imp, 3, 4)
    with pytest.raises(PranceError):
        prune(state, imp[:, 1:], 2)
    masked = kill(random_state(2, 5, 3, seed=0, masked=True), seed=0)
    with pytest.raises(PranceError):
        merge_masked(masked, imp, masked.num_patches() + 1)
    with pytest.raises(PranceError):
        prune(masked, imp, 2)
    with pytest.raises(PranceError):
        prune_masked(state, imp, 2)


# ----------------------------------------------------------------------------- masked == physical
@settings(max_examples=60, deadline=None)
@given(**shapes, op=st.sampled_from(["prune", "merge", "reduce"]), data=st.data())
def test_masked_ops_equal_physical_ops_per_sample(b, n, c, seed, ties, frac, op, data):
    state = kill(random_state(b, n, c, seed, masked=True), seed)
    imp = random_importance(b, n, seed, ties)
    imp = imp.masked_fill(~state.alive[:, 1:], 10.0)  # dead tokens look most important: must be ignored
    alive_n = state.num_patches().tolist()
    k1 = torch.tensor([data.draw(st.integers(1, m)) for m in alive_n])
    k2 = torch.tensor([data.draw(st.integers(1, int(k))) for k in k1])
    if op == "prune":
        out = prune_masked(state, imp, k1)
    elif op == "merge":
        out = merge_masked(state, imp, k1)
    else:
        out = reduce_masked(state, imp, k1, k2)
    assert out.alive[:, 0].all()
    assert not (out.alive & ~state.alive).any()  # dead tokens stay dead
    for i in range(b):
        one, idx = sample(state, i)
        one_imp = imp[i, idx[1:] - 1][None]
        want = {"prune": lambda: prune(one, one_imp, int(k1[i])),
                "merge": lambda: merge(one, one_imp, int(k1[i])),
                "reduce": lambda: reduce(one, one_imp, int(k1[i]), int(k2[i]))}[op]()
        got, _ = sample(out, i)
        assert got.x.shape[1] == 1 + int(k2[i] if op == "reduce" else k1[i])
        assert_same(got, want)
