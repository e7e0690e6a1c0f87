"""EViT and ToMe reducers: token counts, what they keep, and their extra MACs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from prance.errors import PranceError
from prance.plan import kept_count
from prance.tokens import EViTReducer, TokenState, ToMeReducer, bipartite_soft_matching, merge_state

FAST = settings(max_examples=25, deadline=None)
HEADS, HEAD_DIM = 2, 3


def inputs(state: TokenState, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random attention probabilities and keys for the current tokens."""
    g = torch.Generator().manual_seed(seed)
    b, n, _ = state.x.shape
    attn = torch.softmax(torch.randn(b, HEADS, n, n, generator=g) * 3, -1)
    return attn, torch.randn(b, HEADS, n, HEAD_DIM, generator=g)


def start(b: int, n: int, seed: int, c: int = 4) -> TokenState:
    return TokenState.start(torch.randn(b, n + 1, c, generator=torch.Generator().manual_seed(seed)), track_source=True)


def run(reducer, state: TokenState, seed: int, depth: int = 12):
    """Call the reducer after every block; yield (block, tokens in, state out, attn)."""
    for block in range(depth):
        attn, keys = inputs(state, seed + block)
        n = state.x.shape[1]
        out = reducer(block, state, attn if reducer.needs_attn(block) else None, keys)
        yield block, n, out, attn, state
        state = out


def check_coverage(state: TokenState, n_patches: int) -> None:
    torch.testing.assert_close(state.size[:, 1:].sum(1), torch.full((state.x.shape[0],), float(n_patches)))
    assert (state.source[:, 1:].sum(1) == 1).all()


# ----------------------------------------------------------------------------- EViT
@FAST
@given(b=st.integers(1, 3), n=st.integers(1, 40), keep=st.floats(0.05, 1.0), fuse=st.booleans(),
       blocks=st.sets(st.integers(0, 11), max_size=4), seed=st.integers(0, 2**31))
def test_evit_tokens_after_equals_the_real_count(b, n, keep, fuse, blocks, seed):
    reducer = EViTReducer(keep, blocks=tuple(blocks), fuse=fuse)
    for block, n_in, out, attn, before in run(reducer, start(b, n, seed), seed):
        assert out.x.shape[1] == reducer.tokens_after(block, n_in)
        assert out.x.shape[1] >= 2 and torch.equal(out.x[:, 0], before.x[:, 0])
        if fuse:
            check_coverage(out, n)
        if block not in blocks:
            assert out is before


def test_evit_keeps_the_most_attended_tokens_and_fuses_the_rest():
    state = start(2, 10, seed=0)
    attn, _ = inputs(state, 1)
    imp = attn[:, :, 0, 1:].mean(1)
    k = int(kept_count(10, 0.5))
    top = imp.topk(k).indices.sort().values + 1
    out = EViTReducer(0.5, blocks=(3,))(3, state, attn, None)
    assert torch.equal(out.x[:, 1:], state.x.gather(1, top[..., None].expand(-1, -1, 4)))
    fused = EViTReducer(0.5, blocks=(3,), fuse=True)(3, state, attn, None)
    assert fused.x.shape[1] == k + 2 and torch.equal(fused.x[:, :-1], out.x)
    for i in range(2):
        drop = [j for j in range(1, 11) if j not in top[i].tolist()]
        w = imp[i, [j - 1 for j in drop]]
        torch.testing.assert_close(fused.x[i, -1], (w[:, None] * state.x[i, drop]).sum(0) / w.sum())
        assert fused.size[i, -1] == len(drop)
    check_coverage(fused, 10)


def test_evit_keep_rate_one_is_a_noop_without_attention():
    reducer = EViTReducer(1.0, fuse=True)
    assert not any(reducer.needs_attn(i) for i in range(12))
    state = start(2, 16, seed=0)
    assert reducer(3, state, None, None) is state
    assert reducer.tokens_after(3, 17) == 17 and reducer.extra_macs(3, 17, 4, HEAD_DIM) == 0
    assert EViTReducer(0.7).needs_attn(3) and not EViTReducer(0.7).needs_attn(4)


# ----------------------------------------------------------------------------- ToMe
@FAST
@given(b=st.integers(1, 3), n=st.integers(1, 60), r=st.integers(0, 12), seed=st.integers(0, 2**31))
def test_tome_tokens_after_equals_the_real_count(b, n, r, seed):
    reducer = ToMeReducer(r)
    assert not any(reducer.needs_attn(i) for i in range(12))
    for block, n_in, out, _, before in run(reducer, start(b, n, seed), seed):
        assert out.x.shape[1] == reducer.tokens_after(block, n_in) == n_in - min(r, (n_in - 1) // 2)
        assert out.x.shape[1] >= min(n_in, 2) and torch.equal(out.x[:, 0], before.x[:, 0])
        check_coverage(out, n)


def test_tome_caps_r_at_half_the_patch_tokens():
    reducer = ToMeReducer(8)
    assert [reducer.tokens_after(0, t) for t in (17, 12, 9, 5, 3, 2)] == [9, 7, 5, 3, 2, 2]


# ----------------------------------------------------------------------------- shared
@pytest.mark.parametrize("reducer, costs", [(EViTReducer(0.3, blocks=(0, 1)), False),
                                            (EViTReducer(0.3, blocks=(0, 1), fuse=True), True),
                                            (ToMeReducer(4), True), (ToMeReducer(40), True)], ids=repr)
def test_extra_macs_equal_the_counted_matmuls(reducer, costs):
    b, width = 3, 4
    state = start(b, 20, seed=0, c=width)
    for block in range(3):
        attn, keys = inputs(state, block)
        n = state.x.shape[1]
        with FlopCounterMode(display=False) as counter:
            state = reducer(block, state, attn, keys)
        assert counter.get_total_flops() == 2 * b * reducer.extra_macs(block, n, width, HEAD_DIM)
    assert (reducer.extra_macs(0, 21, width, HEAD_DIM) > 0) == costs


def test_reducers_reject_masked_states_and_bad_settings():
    masked = TokenState.start(torch.randn(2, 9, 4), masked=True)
    attn, keys = inputs(masked, 0)
    with pytest.raises(PranceError):
        EViTReducer(0.5, blocks=(0,))(0, masked, attn, keys)
    with pytest.raises(PranceError):
        ToMeReducer(2)(0, masked, attn, keys)
    with pytest.raises(PranceError):
        EViTReducer(0.0)
    with pytest.raises(PranceError):
        ToMeReducer(-1)
    with pytest.raises(PranceError):
        ToMeReducer(2).extra_macs(0, 9, 4)


def test_tome_matches_on_keys_averaged_over_heads():
    state = start(2, 15, seed=4)
    _, keys = inputs(state, 5)
    keys[:, 1] *= 4  # heads of unequal scale: a single head or a sum would match differently
    out = ToMeReducer(5)(0, state, None, keys)
    want = merge_state(bipartite_soft_matching(keys.mean(1), 5), state)
    assert torch.equal(out.x, want.x) and torch.equal(out.size, want.size)
    other = merge_state(bipartite_soft_matching(keys[:, 0], 5), state)
    assert not torch.equal(out.size, other.size) or not torch.equal(out.x, other.x)
